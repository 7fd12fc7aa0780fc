"""Faults, for the resume tests: where each worker runs, and a configured rank that dies hard at a configured step.

`record_worker` writes RUN_DIR/.workers/rank_<r>.json (pid, host) at every attempt's start, so a
test (or a person) can find rank r's process and kill it from outside.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from raylm.core import storage
from raylm.core.files import write_json_atomic

if TYPE_CHECKING:  # not at run time: the Train controller imports this module (failures.py), and the config brings torch
    from raylm.training.config import FaultConfig

FAULT_MARKER_DIR = ".faults"
WORKERS_DIR = ".workers"


def record_worker(run_dir: Path, rank: int) -> None:
    write_json_atomic(run_dir / WORKERS_DIR / f"rank_{rank}.json", {"rank": rank, "pid": os.getpid(), "host": socket.gethostname()})


def maybe_inject_fault(faults: FaultConfig, rank: int, step: int, home: str | Path) -> None:
    """Exit this process (os._exit(1)) if it is the configured rank at the configured step, the first time only.

    No grace period: like a real fault, it may strike moments after a checkpoint, before Ray's
    controller has heard of it (the resume finds the checkpoint on storage regardless). The
    "first time" is marked in the run dir's home, where the restarted worker looks, on any machine.
    """
    if faults.kill_at_step != step or faults.kill_rank != rank:
        return
    marker = storage.join(home, FAULT_MARKER_DIR, f"killed-rank{rank}-step{step}")
    if storage.exists(marker):
        return
    storage.write_bytes(marker, "injected\n")
    print(f"[raylm] fault injection: rank {rank} exits at step {step}", flush=True)
    os._exit(1)
