"""The core floor: errors, typed config loading, atomic writes, Ray start-up. Imports nothing of raylm's."""
