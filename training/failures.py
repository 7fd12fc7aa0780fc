"""A dead worker is one console line, not pages of Ray tracebacks; the details go to the run dir.

When a worker dies, Ray Train's controller logs its failure decision with the whole error (the
actor's death, every rank's traceback) and then a warning with another traceback as it shuts the
group down, and the surviving ranks log the collective that failed under them: about a hundred
lines per death on two workers, many more on a cluster. Instead:

    [raylm] worker rank 1 died (pid 31394, last logged step 9); restarting from checkpoint step 8 (restart 1 of 2); details in RUN_DIR/worker-failures.log

`FailureReporter` is a Ray Train `UserCallback` (it runs in the controller): on a worker group's
errors it writes that line (also to RUN_DIR/raylm.log) and every rank's error in full to
RUN_DIR/worker-failures.log. Two logging filters, on the console handler of Ray Train's own
`ray.train` logger only, drop what that line replaces: in the controller, the failure decision
and the shutdown warning; in the workers, a failed collective's traceback (a consequence of the
peer's death), which goes to worker-failures.log instead. Ray's own log files in its session dir
keep everything; a worker's error of its own (a bug, a bad input) still prints its traceback.
"""

from __future__ import annotations

import datetime
import json
import logging
from pathlib import Path

import ray.train

from raylm.training.checkpoint_store import checkpoint_folders, records_verdict
from raylm.training.faults import WORKERS_DIR
from raylm.training.run_log import say
from raylm.training.tracking import METRICS_FILE

FAILURES_LOG = "worker-failures.log"

# A collective that failed because a peer went away (gloo, NCCL, or DeepSpeed's group torn down under it).
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "DistBackendError", "DeepSpeed backend not set",
             "NCCL communicator was aborted", "ProcessGroupGloo", "Broken pipe")


def append_details(run_dir: Path, title: str, text: str) -> None:
    stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    with open(run_dir / FAILURES_LOG, "a") as f:
        f.write(f"==== {stamp} {title}\n{text.rstrip()}\n\n")


def console_handlers() -> list[logging.Handler]:
    """The console handler(s) of Ray Train's `ray.train` logger in this process (Ray's PlainRayHandler)."""
    return [h for h in logging.getLogger("ray.train").handlers if type(h).__name__ == "PlainRayHandler"]


def add_console_filter(flt: logging.Filter) -> None:
    for handler in console_handlers():
        if not any(type(f) is type(flt) for f in handler.filters):
            handler.addFilter(flt)


class ControllerNoise(logging.Filter):
    """In the controller: the decision on a worker group's failure (its error in full; FailureReporter
    has said it in one line) and the shutdown warning after a death. Other decisions (the controller's
    own errors, which FailureReporter does not see) stay on the console."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        decision = message.startswith("[FailurePolicy]") and "Source: worker group" in message
        return not (decision or message.startswith("Graceful shutdown of backend failed"))


class PeerGone(logging.Filter):
    """In a worker: the traceback of a collective that failed because a peer died goes to worker-failures.log."""

    def __init__(self, run_dir: Path, rank: int):
        super().__init__()
        self.run_dir, self.rank = run_dir, rank

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith("Error in training function") or not any(marker in message for marker in PEER_GONE):
            return True
        append_details(self.run_dir, f"rank {self.rank}: a collective failed under it (a peer died)", message)
        return False


def quiet_peer_failures(run_dir: Path, rank: int) -> None:
    """Called in each worker: a failed collective's traceback goes to the run dir, not the console."""
    add_console_filter(PeerGone(run_dir, rank))


def last_logged_step(run_dir: Path) -> int | None:
    try:
        lines = (run_dir / METRICS_FILE).read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else None
    except (OSError, ValueError, KeyError):
        return None


def newest_complete_step(run_dir: Path) -> int | None:
    """What the restart will most likely resume from (it checks the files again, and says so if it goes back further)."""
    for step, folder in checkpoint_folders(run_dir):
        if records_verdict(folder, step)[1] is None:
            return step
    return None


def worker_pid(run_dir: Path, rank: int) -> int | None:
    try:
        return json.loads((run_dir / WORKERS_DIR / f"rank_{rank}.json").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def died(error: Exception) -> bool:
    """Whether the worker's process is gone (Ray's health check found the actor dead), not that it raised."""
    return isinstance(getattr(error, "health_check_failure", None), ray.exceptions.RayActorError) or isinstance(
        error, ray.exceptions.RayActorError)


def first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"[:200]


class FailureReporter(ray.train.UserCallback):
    """Ray Train callback (runs in the controller): one line per failure of the worker group."""

    def __init__(self, run_dir: str, max_failures: int):
        self.run_dir, self.max_failures, self.failures = run_dir, max_failures, 0

    def after_report(self, run_context, metrics, checkpoint) -> None:
        add_console_filter(ControllerNoise())

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        add_console_filter(ControllerNoise())
        run_dir = Path(self.run_dir)
        self.failures += 1
        dead = sorted(rank for rank, error in worker_exceptions.items() if died(error))
        step = last_logged_step(run_dir)
        at = [f"last logged step {step}"] if step is not None else []
        if dead:
            pids = [f"pid {pid}" for pid in (worker_pid(run_dir, r) for r in dead) if pid]
            who = f"worker rank {dead[0]}" if len(dead) == 1 else f"worker ranks {', '.join(map(str, dead))}"
            what = f"{who} died" + (f" ({', '.join(pids + at)})" if pids + at else "")
        else:
            rank = min(worker_exceptions)
            error = worker_exceptions[rank]
            verb = "lost a peer" if any(marker in str(error) for marker in PEER_GONE) else "failed"
            what = f"worker rank {rank} {verb}" + (f" ({at[0]})" if at else "") + f": {first_line(error)}"
        if self.max_failures == -1 or self.failures <= self.max_failures:
            ckpt = newest_complete_step(run_dir)
            start = f"checkpoint step {ckpt}" if ckpt is not None else "step 0 (no checkpoint yet)"
            limit = "unlimited" if self.max_failures == -1 else str(self.max_failures)
            then = f"restarting from {start} (restart {self.failures} of {limit})"
        else:
            then = f"no restarts left (scaling.max_failures={self.max_failures}): the run stops"
        line = f"{what}; {then}; details in {run_dir / FAILURES_LOG}"
        say(run_dir, line)
        for rank, error in sorted(worker_exceptions.items()):
            append_details(run_dir, f"rank {rank}", str(error))
