"""A run stopped by a signal: a checkpoint first, then one line that says how to go on.

SIGTERM (what `ray job stop`, Kubernetes and a spot reclaim send) and a first Ctrl-C ask the run to
stop. The driver writes RUN_DIR/.stop-requested; rank 0 sees it at the next step boundary, every
rank learns it in the step's vote (training/trainer.py), writes a checkpoint there, and the loop
ends without exporting, rank 0 writing RUN_DIR/.stopped-at. The command then prints

    stopped by SIGTERM at step 17 with checkpoint_step00000017; rerun the same command to resume

and exits with 128 + the signal's number. If the workers have not stopped within
`checkpoint.stop_grace_s`, or at a second Ctrl-C, the command stops at once and names the newest
complete checkpoint instead: still nothing lost but the steps after it.

The request travels as a file in the run dir's home (training/run_home.py) because that is already
where every rank and the driver meet, on one machine or on several with no disk in common; rank 0
looks for it once per step on a local disk, at most once every STOP_POLL_S on object storage.
"""

from __future__ import annotations

import _thread
import signal
import threading
import time
from pathlib import Path

from raylm.core import storage
from raylm.core.errors import RunStopped
from raylm.training.checkpoint_store import checkpoint_name
from raylm.training.failures import last_logged_step, newest_complete_step
from raylm.training.run_home import work_dir
from raylm.training.run_log import say

STOP_REQUEST = ".stop-requested"  # written by the driver: stop at the next step with a checkpoint
STOPPED_AT = ".stopped-at"  # written by rank 0: the step the run stopped at, its checkpoint complete
SIGNALS = (signal.SIGINT, signal.SIGTERM)
STOP_POLL_S = 2.0  # on object storage a look is a request: one per step would slow fast steps


class StopRequests:
    """Rank 0's view of the stop request: `asked()` once per step."""

    def __init__(self, home: str | Path):
        self.path = storage.join(home, STOP_REQUEST)
        self.poll_s = STOP_POLL_S if storage.is_uri(home) else 0.0
        self.last_look = -float("inf")

    def asked(self) -> bool:
        now = time.monotonic()
        if now - self.last_look < self.poll_s:
            return False
        self.last_look = now
        return storage.exists(self.path)


def mark_stopped(home: str | Path, step: int) -> None:
    storage.write_bytes(storage.join(home, STOPPED_AT), f"{step}\n")


class StopOnSignal:
    """While training runs (`with StopOnSignal(home, grace_s) as stop:`), SIGINT and SIGTERM ask it to stop.

    Signal handlers live in the main thread only; elsewhere (a notebook's worker thread) the
    signals keep their usual meaning.
    """

    def __init__(self, home: str | Path, grace_s: float):
        self.home, self.run_dir, self.grace_s = home, work_dir(home), grace_s
        self.signum: int | None = None  # the signal that asked to stop
        self.at_once_why: str | None = None  # why the command stopped without waiting for the checkpoint
        self.timer: threading.Timer | None = None
        self.previous: dict = {}

    def __enter__(self) -> StopOnSignal:
        for stale in (STOP_REQUEST, STOPPED_AT):  # a command killed while stopping left them behind
            storage.remove(storage.join(self.home, stale))
        if threading.current_thread() is threading.main_thread():
            self.previous = {signum: signal.signal(signum, self.handle) for signum in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        if self.timer is not None:
            self.timer.cancel()
        storage.remove(storage.join(self.home, STOP_REQUEST))

    def handle(self, signum: int, frame) -> None:
        if self.signum is not None:  # a second Ctrl-C, or the grace period is over (grace_over)
            self.at_once_why = self.at_once_why or "at a second signal"
            raise KeyboardInterrupt
        self.signum = signum
        storage.write_bytes(storage.join(self.home, STOP_REQUEST), f"{signal.Signals(signum).name}\n")
        say(self.run_dir, f"{signal.Signals(signum).name}: stopping at the next step with a checkpoint "
                          f"(up to {self.grace_s:g}s; Ctrl-C again to stop at once)")
        self.timer = threading.Timer(self.grace_s, self.grace_over)
        self.timer.daemon = True
        self.timer.start()

    def grace_over(self) -> None:
        self.at_once_why = f"as no checkpoint came within checkpoint.stop_grace_s={self.grace_s:g}"
        _thread.interrupt_main(signal.SIGINT)  # runs `handle` in the main thread, which now stops at once

    def outcome(self) -> None:
        """After training returned: raise RunStopped if it stopped on the request (it may have finished first)."""
        stopped_at = storage.join(self.home, STOPPED_AT)
        if self.signum is None or not storage.is_file(stopped_at):
            return
        step = int(storage.read_text(stopped_at))
        storage.remove(stopped_at)
        name = signal.Signals(self.signum).name
        raise RunStopped(f"stopped by {name} at step {step} with {checkpoint_name(step)}; rerun the same command to resume",
                         128 + self.signum)

    def stopped_at_once(self) -> RunStopped:
        """The RunStopped for a KeyboardInterrupt out of training: where the run was, and what it resumes from."""
        signum = self.signum or signal.SIGINT
        step, complete = last_logged_step(self.run_dir), newest_complete_step(self.home)
        where = f" at step {step}" if step is not None else ""
        why = f" {self.at_once_why}" if self.at_once_why else ""
        resume = (f"the newest complete checkpoint is {checkpoint_name(complete)}; rerun the same command to resume from it"
                  if complete is not None else "no checkpoint was complete: a rerun starts from step 0")
        return RunStopped(f"stopped by {signal.Signals(signum).name}{where}{why}; {resume}", 128 + signum)
