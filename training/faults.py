"""Fault injection for the resume tests: a configured rank dies hard at a configured step, once per run dir."""

from __future__ import annotations

import os
import time
from pathlib import Path

from raylm.training.config import FaultConfig

FAULT_MARKER_DIR = ".faults"


def maybe_inject_fault(faults: FaultConfig, rank: int, step: int, run_dir: Path) -> None:
    """Exit this process (os._exit(1)) if it is the configured rank at the configured step, the first time only."""
    if faults.kill_at_step != step or faults.kill_rank != rank:
        return
    marker = run_dir / FAULT_MARKER_DIR / f"killed-rank{rank}-step{step}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("injected\n")
    # Ray Train's controller learns of reported checkpoints by polling the workers (every
    # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default); a checkpoint reported moments before a
    # crash can be lost with the worker group, and the restart then resumes from the one before.
    # Wait out a few polls so the test exercises a resume from the latest checkpoint.
    time.sleep(3 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2.0")))
    print(f"[raylm] fault injection: rank {rank} exits at step {step}", flush=True)
    os._exit(1)
