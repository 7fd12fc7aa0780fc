"""Run a stage module's `main` the way the CLI does, for `python -m <package>.<module>`.

Every stage module ends with `if __name__ == "__main__": sys.exit(run_main(main))`, so user
errors print one line there too.
"""

from __future__ import annotations

import sys
from typing import Callable

from raylm.core.errors import RunFailed, RunStopped, UserError


def run_main(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    try:
        return int(main(argv) or 0)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except RunStopped as err:
        print(str(err), file=sys.stderr)
        return err.exit_code
