"""Where a worker resumes from: Ray Train's latest checkpoint, open for as long as it is being read.

Ray Train hands a worker its run's latest reported checkpoint after a worker-group restart or a
re-run of the command. One written at another world size or ZeRO stage is first converted to a
DeepSpeed universal checkpoint (training/checkpoint.py), which is deleted again once loaded.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import ray.train

from raylm.training.checkpoint import (
    convert_to_universal,
    needs_universal,
    read_train_state,
)


@dataclass
class ResumePoint:
    checkpoint_dir: Path  # the checkpoint as Ray Train hands it over: RNG states, raylm_state.json
    load_dir: Path  # what DeepSpeed loads: checkpoint_dir, or its universal conversion
    saved: dict  # raylm_state.json, as written by the attempt that saved it
    universal: bool  # load_dir is a universal checkpoint, which DeepSpeed must be configured for


@contextlib.contextmanager
def latest_checkpoint(world_size: int, zero_stage: int) -> Iterator[ResumePoint | None]:
    """The run's latest checkpoint, ready to load at this world size and stage; None on a fresh start."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as path:
        checkpoint_dir = Path(path)
        saved = read_train_state(checkpoint_dir)
        universal = needs_universal(saved, world_size, zero_stage)
        load_dir = convert_to_universal(checkpoint_dir, saved["zero_stage"]) if universal else checkpoint_dir
        try:
            yield ResumePoint(checkpoint_dir, load_dir, saved, universal)
        finally:
            if universal:
                shutil.rmtree(load_dir, ignore_errors=True)
