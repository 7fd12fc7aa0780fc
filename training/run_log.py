"""RUN_DIR/raylm.log: what raylm said about a run, one timestamped line each, on top of the console.

Resumes, checkpoints found partial or broken, workers that died: each is one `[raylm] ...` line on
the console and the same line here, so the story of a run that restarted can be read after the
console is gone.
"""

from __future__ import annotations

import datetime
from pathlib import Path

RUN_LOG = "raylm.log"


def say(run_dir: Path, line: str) -> None:
    """Print `line` as a `[raylm]` console line and append it to the run dir's log."""
    print(f"[raylm] {line}", flush=True)
    stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / RUN_LOG, "a") as f:
            f.write(f"{stamp} {line}\n")
    except OSError:
        pass  # a full or read-only run dir: the console keeps the line, and the run's own error says why
