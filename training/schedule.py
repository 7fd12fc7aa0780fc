"""The learning-rate schedule: a pure function of the optimizer step.

Nothing about it is saved in a checkpoint: resuming the step resumes the curve, and a run extended
with `schedule.total_steps` set keeps the curve it started on.
"""

from __future__ import annotations

import math

from raylm.training.config import TrainConfig, schedule_total_steps


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """LR of optimizer step `step` (0-based): linear warmup, then cosine or warmup-stable-decay to min_lr."""
    peak, sched = cfg.optimizer.lr, cfg.schedule
    total = schedule_total_steps(cfg)
    min_lr = peak * sched.min_lr_ratio
    if step < sched.warmup_steps:
        return peak * (step + 1) / sched.warmup_steps
    if sched.kind == "cosine":
        progress = min(1.0, (step - sched.warmup_steps) / max(1, total - sched.warmup_steps))
        return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * progress))
    decay_start = total - int(sched.decay_fraction * total)
    if step < decay_start:
        return peak
    progress = min(1.0, (step - decay_start) / max(1, total - decay_start))
    return peak - (peak - min_lr) * progress
