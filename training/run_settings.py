"""What a rerun of a run dir keeps from the run, and the lines that say what the command changed.

A run dir remembers the settings its last command asked for (RUN_SETTINGS, written just before
training starts), with the two numbers that shape the optimisation across steps: the global batch
(sequences per optimizer step) and the schedule's length (steps the learning-rate curve spans).

Rerunning the command on a run dir with checkpoints resumes it (training/resume.py). Then:
- every setting that differs from the last command's is printed, old and new side by side;
- unless the user changed the batch settings, the global batch stays the run's: resumed on fewer
  workers, each accumulates more micro-batches instead of the run taking smaller steps;
- unless the user changed `schedule.total_steps`, the curve keeps its length: a larger `max_steps`
  trains on at the curve's final rate instead of re-stretching the cosine under a half-done run
  (the learning rate would jump up at the resume).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raylm.core.config import to_dict
from raylm.core.errors import UserError
from raylm.core.files import write_json_atomic
from raylm.training.checkpoint_store import checkpoint_folders
from raylm.training.config import (
    TrainConfig,
    global_batch,
    grad_accum,
    schedule_total_steps,
)
from raylm.training.run_home import work_dir

RUN_SETTINGS = "run_settings.json"
# Settings whose change means the user chose a new global batch / schedule length.
BATCH_KEYS = ("data.global_batch", "data.micro_batch", "data.grad_accum")
SCHEDULE_KEYS = ("schedule.total_steps",)


@dataclass
class ResumedSettings:
    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # dotted key -> (the run's value, the command's)
    global_batch: int | None = None  # the run's global batch, to keep; None: the command's own applies
    schedule_steps: int | None = None  # the run's schedule length, to keep; None: the command's own applies


def flat_settings(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"data.micro_batch": 4, ...} from a nested config dict."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= flat_settings(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def compare_with_run(saved: dict, asked: dict) -> ResumedSettings:
    """What the command (`asked`, its config as a dict) changed, and what it keeps, against RUN_SETTINGS."""
    old, new = flat_settings(saved["asked"]), flat_settings(asked)
    changed = {key: (old.get(key), new.get(key)) for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)}
    keeps_batch = not any(key in changed for key in BATCH_KEYS)
    keeps_schedule = not any(key in changed for key in SCHEDULE_KEYS)
    return ResumedSettings(changed, saved["global_batch"] if keeps_batch else None,
                           saved["schedule_steps"] if keeps_schedule else None)


def keep_run_settings(cfg: TrainConfig, home: str | Path, world: int) -> list[str]:
    """Fit `cfg` to the run it resumes (a fresh run dir leaves it alone); the console lines saying so.

    Call on the driver before training starts, once the home's files are in this machine's work dir
    (run_home.fetch_run_files); then `remember_run_settings` with the config as asked.
    """
    path = work_dir(home) / RUN_SETTINGS
    if not path.is_file() or not checkpoint_folders(home):
        return []  # nothing to resume: the command's settings are the run's
    kept = compare_with_run(json.loads(path.read_text()), to_dict(cfg))
    lines = []
    if kept.changed:
        lines.append("changed on resume: " + "; ".join(f"{key} {old} -> {new}" for key, (old, new) in kept.changed.items()))
    if kept.global_batch is not None and kept.global_batch != global_batch(cfg, world):
        lines.append(keep_global_batch(cfg, kept.global_batch, world))
    if kept.schedule_steps is not None and kept.schedule_steps != schedule_total_steps(cfg):
        cfg.schedule.total_steps = kept.schedule_steps
        after = f"; steps after {kept.schedule_steps} train at its final rate" if cfg.max_steps > kept.schedule_steps else ""
        lines.append(f"the learning-rate schedule keeps the run's length of {kept.schedule_steps} steps{after} "
                     f"(set schedule.total_steps to change it)")
    return lines


def keep_global_batch(cfg: TrainConfig, rows: int, world: int) -> str:
    """Set cfg to the run's global batch of `rows` sequences at `world` workers; the line that says how."""
    micro = cfg.data.micro_batch
    if rows % (micro * world):
        raise UserError(
            f"the run trained with a global batch of {rows} sequences, which {world} workers with data.micro_batch={micro} "
            f"cannot split ({rows} is not a multiple of {micro} x {world}); use a worker count or data.micro_batch that "
            f"divides it, or set data.global_batch to change the run's global batch")
    cfg.data.global_batch = rows
    workers = f"{world} worker" if world == 1 else f"{world} workers, each"
    return (f"the global batch stays the run's {rows} sequences: {grad_accum(cfg, world)} micro-batches of {micro} "
            f"per step on {workers} (set data.global_batch to change it)")


def remember_run_settings(run_dir: Path, asked: dict, cfg: TrainConfig, world: int) -> None:
    """Write RUN_SETTINGS: the config as the command asked for it, and the global batch and schedule it trains with."""
    write_json_atomic(run_dir / RUN_SETTINGS, {
        "asked": asked, "global_batch": global_batch(cfg, world), "schedule_steps": schedule_total_steps(cfg)})
