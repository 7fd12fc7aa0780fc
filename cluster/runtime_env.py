"""What a submitted stage carries to the cluster: the project as working_dir, and the environment.

Ray zips `working_dir` and uploads it through the head (100 MiB at most), so everything that is
output, cache or virtual environment stays behind. Credentials the stages read (W&B, Hugging Face,
object storage) travel as env vars when they are set here; `--env KEY=VALUE` adds more.
"""

from __future__ import annotations

import os
from pathlib import Path

from raylm.errors import UserError

# gitignore-style patterns, relative to the project root. Leading "/" anchors a pattern at the
# root: `data/` alone would also drop the `data` package, which is code the job needs.
WORKING_DIR_EXCLUDES: list[str] = [
    ".git/",
    ".venv/",
    "venv/",
    "__pycache__/",
    "*.pyc",
    ".pytest_cache/",
    "*.egg-info/",
    "build/",
    "dist/",
    "/runs/",
    "/out/",
    "/outputs/",
    "/datasets/",
    "/wandb/",
    "/checkpoints/",
    "/.cache/",
    "/.whl/",
    "/.gl/",
    "/.briefs/",
]

# Variables a stage reads when they are set on the submitting machine: tracking, model hub and
# object-storage credentials, the serving API key, and the settings that choose the device and
# the trainer.
PASSED_THROUGH_ENV: list[str] = [
    "RAYLM_API_KEY",
    "WANDB_API_KEY",
    "WANDB_MODE",
    "WANDB_PROJECT",
    "WANDB_ENTITY",
    "WANDB_BASE_URL",
    "HF_TOKEN",
    "HF_ENDPOINT",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "DS_ACCELERATOR",
    "RAY_TRAIN_V2_ENABLED",
]


def project_root() -> Path:
    """The source checkout this package runs from: what every job needs on the cluster."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise UserError(
            f"raylm submit ships the project's source as the job's working_dir, but {root} is not a "
            "source checkout (no pyproject.toml); run it from a clone installed with `pip install -e .`"
        )
    return root


def parse_env_assignments(assignments: list[str]) -> dict[str, str]:
    """`KEY=VALUE` strings from `--env` → a dict; a malformed one is named."""
    env: dict[str, str] = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not key or not key.replace("_", "").isalnum() or key[0].isdigit():
            raise UserError(f"--env {item!r}: expected KEY=VALUE with KEY a variable name")
        env[key] = value
    return env


def passed_through_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The pass-through variables that are set (and not empty) in `environ`."""
    environ = os.environ if environ is None else environ
    return {key: environ[key] for key in PASSED_THROUGH_ENV if environ.get(key)}


def build_runtime_env(extra_env: dict[str, str], working_dir: Path | None = None) -> dict:
    """The job's runtime_env: the project as working_dir, and env vars (`extra_env` wins)."""
    return {
        "working_dir": str(working_dir or project_root()),
        "excludes": list(WORKING_DIR_EXCLUDES),
        "env_vars": {**passed_through_env(), **extra_env},
    }
