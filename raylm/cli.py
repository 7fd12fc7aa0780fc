"""`raylm`: one subcommand per stage.

Each subcommand is a module with `main(argv) -> int`, so `raylm pretrain ...` and
`python -m raylm.training.pretrain ...` are the same program (the second form is what a Ray job with
`--working-dir .` runs). Modules are imported only when their subcommand runs, so `raylm --help`
stays fast.
"""

from __future__ import annotations

import importlib
import sys

from raylm.core.commands import COMMANDS
from raylm.core.errors import RunFailed, RunStopped, UserError


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: raylm <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Run `raylm <command> --help` for a command's options."]
    return "\n".join(lines)

def run_subcommand(name: str, argv: list[str]) -> int:
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(argv) or 0)
    except UserError as err:
        print(f"raylm {name}: error: {err}", file=sys.stderr)
        return 2
    except RunFailed as err:
        print(f"raylm {name}: error: {err}", file=sys.stderr)
        return err.exit_code
    except RunStopped as err:
        print(f"raylm {name}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"raylm {name}: interrupted", file=sys.stderr)
        return 130

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        from raylm import __version__

        print(f"raylm {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"raylm: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return run_subcommand(argv[0], argv[1:])

if __name__ == "__main__":
    sys.exit(main())
