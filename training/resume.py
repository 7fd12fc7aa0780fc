"""Where a worker resumes from: the newest sound checkpoint on storage, open for as long as it is read.

World rank 0 looks through the run dir's checkpoints (training/checkpoint_store.py), newest first,
removes the partial folders and moves the broken ones aside (one line each), and tells every rank
the one it chose; so after a worker's death or a re-run of the command the run goes on from the
newest checkpoint that is complete on storage, whatever Ray's controller had registered. One
written at another world size or ZeRO stage is first converted to a DeepSpeed universal
checkpoint (training/checkpoint.py), which is deleted again once loaded. A checkpoint on object
storage is first copied to a local temp folder by every rank (DeepSpeed loads from a path).
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch.distributed as dist

from raylm.core import storage
from raylm.training.checkpoint import (
    convert_to_universal,
    needs_universal,
    read_train_state,
)
from raylm.training.checkpoint_store import (
    checkpoint_folders,
    choose_resume_folder,
    remove_leftovers,
)
from raylm.training.run_home import fetch_checkpoint, is_remote, work_dir
from raylm.training.run_log import say


@dataclass
class ResumePoint:
    checkpoint_dir: Path  # the checkpoint's folder (a local copy when the run dir is on object storage): RNG states, raylm_state.json
    load_dir: Path  # what DeepSpeed loads: checkpoint_dir, or its universal conversion
    saved: dict  # raylm_state.json, as written by the attempt that saved it
    universal: bool  # load_dir is a universal checkpoint, which DeepSpeed must be configured for


def chosen_by_rank_zero(home: str | Path, rank: int, device) -> str | Path | None:
    """Rank 0 chooses, and tidies the run dir while no rank writes to it; every rank learns its choice."""
    choice: list[str | None] = [None]
    if rank == 0:
        tell = lambda line: say(work_dir(home), line)  # noqa: E731
        leftovers = remove_leftovers(home)
        if leftovers:
            tell(f"removed what interrupted writes left: {', '.join(leftovers)}")
        had_any = bool(checkpoint_folders(home))
        folder = choose_resume_folder(home, tell)
        choice[0] = storage.name_of(folder) if folder else None
        if folder is None and had_any:
            tell("no sound checkpoint left in the run dir: starting from step 0")
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(choice, src=0, device=device)
    return storage.child(home, choice[0]) if choice[0] else None


@contextlib.contextmanager
def latest_checkpoint(home: str | Path, rank: int, world_size: int, zero_stage: int, device) -> Iterator[ResumePoint | None]:
    """The run's newest sound checkpoint, ready to load at this world size and stage; None on a fresh start."""
    chosen = chosen_by_rank_zero(home, rank, device)
    if chosen is None:
        yield None
        return
    checkpoint_dir = fetch_checkpoint(chosen, rank) if is_remote(home) else Path(chosen)
    try:
        saved = read_train_state(checkpoint_dir)
        universal = needs_universal(saved, world_size, zero_stage)
        if universal and is_remote(home):  # the conversion reads every rank's shards
            shutil.rmtree(checkpoint_dir.parent, ignore_errors=True)
            checkpoint_dir = fetch_checkpoint(chosen)
        load_dir = convert_to_universal(checkpoint_dir, saved["zero_stage"]) if universal else checkpoint_dir
        try:
            yield ResumePoint(checkpoint_dir, load_dir, saved, universal)
        finally:
            if universal:
                shutil.rmtree(load_dir, ignore_errors=True)
    finally:
        if is_remote(home):
            shutil.rmtree(checkpoint_dir.parent, ignore_errors=True)
