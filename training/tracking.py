"""Where a run's numbers go: the console, RUN_DIR/metrics.jsonl and Weights & Biases.

Only world rank 0 tracks (Ray Train V2 rejects W&B's callback and `setup_wandb` does not filter
ranks, so we call wandb.init/log/finish ourselves). W&B runs offline when there is no API key, and
`WANDB_MODE` is honoured. The W&B run id lives in the checkpoint, so a resumed run (after a
worker failure or a re-run of the command) continues the same W&B run.

metrics.jsonl holds one JSON object per logged step. A resumed run first drops the lines past
the step it resumes from, so the file tells one history, not a history with replays in it.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import string
from pathlib import Path
from typing import TYPE_CHECKING

from raylm.core.files import write_atomic

if TYPE_CHECKING:  # the Train controller imports this module (through failures.py); the config brings torch
    from raylm.training.config import LoggingConfig

METRICS_FILE = "metrics.jsonl"


def wandb_mode(cfg: LoggingConfig) -> str:
    if cfg.wandb_mode != "auto":
        return cfg.wandb_mode
    env = os.environ.get("WANDB_MODE")
    if env:
        return env
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def new_wandb_id() -> str:
    """A W&B-style run id (8 of [a-z0-9]); made by us so that it exists before wandb.init and goes in the checkpoint."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the lines of metrics.jsonl up to `last_step` (the step a resumed run starts after)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= last_step]
    write_atomic(path, "".join(line + "\n" for line in kept))


def format_line(row: dict, max_steps: int) -> str:
    parts = [f"step {row['step']}/{max_steps}"]
    if row.get("loss") is not None:
        parts += [f"loss {row['loss']:.4f}", f"lr {row['lr']:.2e}"]
    if row.get("grad_norm") is not None:
        parts.append(f"gnorm {row['grad_norm']:.3f}")
    if row.get("tokens_per_s") is not None:
        parts.append(f"{row['tokens_per_s']:,.0f} tok/s")
    if row.get("mfu") is not None:
        parts.append(f"mfu {100 * row['mfu']:.1f}%")
    if row.get("mem_gb") is not None:
        parts.append(f"mem {row['mem_gb']:.2f} GB")
    if "val_loss" in row:
        parts.append(f"val {row['val_loss']:.4f} (ppl {row['val_ppl']:.1f})")
    return "[raylm] " + " | ".join(parts)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


class Tracker:
    """Rank 0's sink for metrics. Other ranks get a Tracker with `active=False` that drops everything."""

    def __init__(self, run_dir: Path, cfg: LoggingConfig, active: bool, max_steps: int):
        self.run_dir, self.cfg, self.active, self.max_steps = run_dir, cfg, active, max_steps
        self.metrics_path = run_dir / METRICS_FILE
        self.wandb_run = None

    def start(self, *, resumed_step: int, wandb_id: str, config: dict, run_name: str) -> None:
        if not self.active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        truncate_metrics(self.metrics_path, resumed_step)
        mode = wandb_mode(self.cfg)
        if mode == "disabled":
            return
        import wandb

        self.wandb_run = wandb.init(
            project=self.cfg.wandb_project,
            entity=self.cfg.wandb_entity,
            id=wandb_id,
            name=run_name,
            resume="allow",
            mode=mode,
            dir=str(self.run_dir),
            config=config,
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )

    def log(self, row: dict) -> None:
        if not self.active:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(format_line(row, self.max_steps), flush=True)
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in row.items() if k != "step" and v is not None}, step=row["step"])

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
