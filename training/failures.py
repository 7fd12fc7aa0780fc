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
and the shutdown warning; in the workers, the training function's traceback (a failed
collective's, a consequence of the peer's death, is written to worker-failures.log right there).
Ray's own log files in its session dir keep everything.

When the restarts are spent, `run_failed` makes the command's one `error:` line, the whole error
going to RUN_DIR/error.log. Either log falls back to a temporary file when the run dir cannot be
written (a full disk is a failure to report, not a second one).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import tempfile
import traceback
from pathlib import Path

import ray.train

from raylm.core.errors import RunFailed
from raylm.training.checkpoint_store import checkpoint_folders, records_verdict
from raylm.training.faults import WORKERS_DIR
from raylm.training.run_log import say
from raylm.training.tracking import METRICS_FILE

FAILURES_LOG = "worker-failures.log"

# A collective that failed because a peer went away (gloo, NCCL, or DeepSpeed's group torn down under it).
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "DistBackendError", "DeepSpeed backend not set",
             "NCCL communicator was aborted", "ProcessGroupGloo", "Broken pipe")


def append_log(path: Path, entries: list[tuple[str, str]]) -> Path:
    """Append (title, text) entries to the log at `path`; where that cannot be written (a full or
    read-only disk: often the very failure being logged), to a new temporary file. Returns the file."""
    stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    text = "".join(f"==== {stamp} {title}\n{body.rstrip()}\n\n" for title, body in entries)
    try:
        with open(path, "a") as f:
            f.write(text)
        return path
    except OSError:
        with contextlib.suppress(OSError):
            if path.stat().st_size == 0:
                path.unlink()
        fd, name = tempfile.mkstemp(prefix=f"raylm-{path.stem}-", suffix=".log")
        with open(fd, "w") as f:
            f.write(text)
        return Path(name)


def append_details(run_dir: Path, title: str, text: str) -> Path:
    return append_log(run_dir / FAILURES_LOG, [(title, text)])


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


class WorkerErrors(logging.Filter):
    """In a worker: the traceback of its training function's error leaves the console. A collective
    that failed because a peer died goes to worker-failures.log here (a consequence, not the cause);
    an error of the worker's own (a bug, a full disk) FailureReporter writes there with every rank's."""

    def __init__(self, run_dir: Path, rank: int):
        super().__init__()
        self.run_dir, self.rank = run_dir, rank

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith("Error in training function"):
            return True
        if any(marker in message for marker in PEER_GONE):
            append_details(self.run_dir, f"rank {self.rank}: a collective failed under it (a peer died)", message)
        return False


def quiet_worker_errors(run_dir: Path, rank: int) -> None:
    """Called in each worker: its error's traceback goes to the run dir, not the console."""
    add_console_filter(WorkerErrors(run_dir, rank))


def last_logged_step(run_dir: Path) -> int | None:
    try:
        lines = (run_dir / METRICS_FILE).read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else None
    except (OSError, ValueError, KeyError):
        return None


def newest_complete_step(home: str | Path) -> int | None:
    """What the restart will most likely resume from (it checks the files again, and says so if it goes back further)."""
    for step, folder in checkpoint_folders(home):
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


def causing_rank(worker_exceptions: dict[int, Exception]) -> int:
    """The first rank whose error is its own, not a collective that failed under it because another rank went."""
    own = [rank for rank, error in worker_exceptions.items() if not any(marker in str(error) for marker in PEER_GONE)]
    return min(own or worker_exceptions)


def first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"[:200]


class FailureReporter(ray.train.UserCallback):
    """Ray Train callback (runs in the controller): one line per failure of the worker group."""

    def __init__(self, home: str, run_dir: str, max_failures: int):
        # run_dir: the driver's copy of the run's files (run_home.py). Ray Train V2 places the
        # controller on the driver's node, so its lines join the driver's log, which goes home at the end.
        self.home, self.run_dir, self.max_failures, self.failures = home, run_dir, max_failures, 0

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
            rank = causing_rank(worker_exceptions)
            error = worker_exceptions[rank]
            verb = "lost a peer" if any(marker in str(error) for marker in PEER_GONE) else "failed"
            what = f"worker rank {rank} {verb}" + (f" ({at[0]})" if at else "") + f": {first_line(error)}"
        if self.max_failures == -1 or self.failures <= self.max_failures:
            ckpt = newest_complete_step(self.home)
            start = f"checkpoint step {ckpt}" if ckpt is not None else "step 0 (no checkpoint yet)"
            limit = "unlimited" if self.max_failures == -1 else str(self.max_failures)
            then = f"restarting from {start} (restart {self.failures} of {limit})"
        else:
            then = f"no restarts left (scaling.max_failures={self.max_failures}): the run stops"
        details = append_log(run_dir / FAILURES_LOG, [(f"rank {rank}", str(error)) for rank, error in sorted(worker_exceptions.items())])
        say(run_dir, f"{what}; {then}; details in {details}")


# ---- the run's end, when it failed ---------------------------------------------------------------

ERROR_LOG = "error.log"


def what_to_do(error: BaseException) -> str:
    """The advice for a failure, by its kind: a full disk and a read-only dir are the user's to fix."""
    text = str(error)
    if "No space left on device" in text or "Errno 28" in text:
        return "free space on that disk (or point --out at another), then rerun the same command to resume"
    if "Permission denied" in text or "Read-only file system" in text or "Errno 13" in text or "Errno 30" in text:
        return "make the run dir writable (or point --out at another), then rerun the same command to resume"
    return "fix the cause, then rerun the same command to resume from the newest complete checkpoint"


def run_failed(run_dir: Path, error: BaseException) -> RunFailed:
    """The one line that ends a failed run; its details (the whole error, with every traceback) go to RUN_DIR/error.log."""
    log = append_log(run_dir / ERROR_LOG, [("the run failed", "".join(traceback.format_exception(error)))])
    if isinstance(error, ray.train.WorkerGroupError) and error.worker_failures:
        rank = causing_rank(error.worker_failures)
        what = f"training failed: worker rank {rank}: {first_line(error.worker_failures[rank])}"
    else:
        what = f"training failed: {first_line(error)}"
    return RunFailed(f"{what}; {what_to_do(error)}; details in {log}")
