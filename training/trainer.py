"""One Ray Train worker's run, as an object: `setup` builds and resumes, `train` steps, `finish` exports.

`train` walks the data order (training/data_order.py), epoch after epoch, until max_steps, or
until rank 0 votes the time limit reached. Each step is `train_step` (forward/backward over `grad_accum`
micro-batches and one optimizer step), then `log_step` (train metrics and, when due, `evaluate`)
and, when due, `save_checkpoint` (training/checkpoint_store.py: every rank's part, then its
completion record) and `ray.train.report`. What a resume needs is one TrainState, written into
every checkpoint.

Pretraining and fine-tuning run this same code. They differ in their rows (with or without
`loss_mask`), their loss (training/losses.py, chosen by the run kind) and their starting weights
(`init_model_dir`).
"""

from __future__ import annotations

import contextlib
import io
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from raylm.core import storage
from raylm.core.config import from_dict
from raylm.model.model_dir import save_model_dir
from raylm.model.transformer import flops_per_token
from raylm.training import checkpoint, checkpoint_store, run_home
from raylm.training.config import TrainConfig, global_batch, grad_accum
from raylm.training.data_order import epoch_batches, eval_micro_batches, micro_batches
from raylm.training.engine import grad_norm_of, init_engine, set_lr
from raylm.training.failures import quiet_worker_errors
from raylm.training.faults import maybe_inject_fault, record_worker
from raylm.training.losses import loss_for, target_count
from raylm.training.measure import Throughput, memory_gb, peak_flops
from raylm.training.resume import ResumePoint, latest_checkpoint
from raylm.training.run_log import say
from raylm.training.schedule import learning_rate
from raylm.training.stop_request import StopRequests, mark_stopped
from raylm.training.tracking import Tracker, new_wandb_id, perplexity


@dataclass
class TrainState:
    """Where a run stands: what a checkpoint carries from one attempt to the next."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the data order's current epoch
    rows_in_epoch: int = 0  # rows of that epoch already trained on
    tokens: int = 0  # tokens trained on, over all attempts
    elapsed_before: float = 0.0  # seconds trained by earlier attempts
    wandb_id: str | None = None  # the W&B run that every attempt logs to

    def advance(self, rows: int, tokens: int) -> None:
        self.step += 1
        self.rows_in_epoch += rows
        self.tokens += tokens

    def next_epoch(self) -> None:
        self.epoch, self.rows_in_epoch = self.epoch + 1, 0

    def to_saved(self, elapsed_s: float, world_size: int, zero_stage: int, global_batch: int) -> dict:
        """raylm_state.json; the layout it was saved at tells a resume whether to convert (checkpoint.needs_universal)."""
        return {
            "step": self.step, "epoch": self.epoch, "rows_in_epoch": self.rows_in_epoch, "tokens": self.tokens,
            "world_size": world_size, "zero_stage": zero_stage, "global_batch": global_batch, "wandb_id": self.wandb_id,
            "elapsed_s": elapsed_s,
        }

    @classmethod
    def from_saved(cls, saved: dict) -> TrainState:
        return cls(step=saved["step"], epoch=saved["epoch"], rows_in_epoch=saved["rows_in_epoch"], tokens=saved["tokens"],
                   elapsed_before=saved["elapsed_s"], wandb_id=saved.get("wandb_id"))


@dataclass
class StepResult:
    lr: float  # the learning rate the step used
    loss: float  # the global batch's mean token loss (over every rank)
    grad_norm: float | None  # the global gradient norm, where known


def due(step: int, every: int, is_last: bool) -> bool:
    """Whether a periodic action (every N steps; 0 = never) runs at `step`; all of them run at the last step."""
    return is_last or (every > 0 and step % every == 0)


def all_reduce_sum(values: list[float], device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


class Trainer:
    """One worker's run. `train_loop_per_worker` calls setup(), train(), finish()."""

    def __init__(self, loop_config: dict):
        self.loop_config = loop_config
        self.cfg = from_dict(TrainConfig, loop_config["config"])
        self.kind = loop_config["kind"]
        self.loss_fn = loss_for(self.kind)
        self.home = loop_config["run_dir"]  # the run dir as given: a local path, or a URI (run_home.py)
        self.run_dir = run_home.work_dir(self.home)  # this machine's copy: logs, metrics, the exported model
        self.use_gpu = loop_config["use_gpu"]
        self.state = TrainState()
        self.throughput = Throughput()
        self.last_row: dict = {}
        self.stopped = False  # stopped on a signal's request (training/stop_request.py)

    # ---- setup -----------------------------------------------------------------------------------

    def setup(self) -> None:
        """Join the process group, build the engine, resume from the latest checkpoint if any, start tracking."""
        import deepspeed  # only now: train_loop_per_worker has chosen its accelerator

        cfg = self.cfg
        # On CPU, DeepSpeed prints "DeepSpeed ...shm_comm_op built successfully" from every worker as it loads its op.
        with contextlib.redirect_stdout(io.StringIO()):
            deepspeed.init_distributed(dist_backend="nccl" if self.use_gpu else "gloo")
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.accum, self.batch_rows = grad_accum(cfg, self.world), global_batch(cfg, self.world)
        self.zero_stage = cfg.deepspeed.zero_stage
        quiet_worker_errors(self.run_dir, self.rank)  # first: whatever fails next is one line, not a traceback
        record_worker(self.run_dir, self.rank)

        with latest_checkpoint(self.home, self.rank, self.world, self.zero_stage, self.device) as resume_point:
            checkpoint.seed_everything(cfg.seed + self.rank)
            universal = resume_point is not None and resume_point.universal
            init_dir = self.loop_config.get("init_model_dir")
            init_dir = storage.local_dir(init_dir) if init_dir else None  # a model dir on object storage: copied to this node
            self.engine = init_engine(cfg, self.world, self.use_gpu, init_dir, universal)
            if resume_point is not None:
                self.resume(resume_point)
        self.state.wandb_id = self.state.wandb_id or (new_wandb_id() if self.rank == 0 else None)
        self.stop_requests = StopRequests(self.home) if self.rank == 0 else None
        if self.rank == 0:
            run_home.fetch_metrics(self.home)  # the run's metrics so far, wherever they were written

        self.tracker = Tracker(self.run_dir, cfg.logging, active=self.rank == 0, max_steps=cfg.max_steps)
        self.tracker.start(resumed_step=self.state.step, wandb_id=self.state.wandb_id,
                           config=self.loop_config["config"] | {"kind": self.kind}, run_name=storage.name_of(self.home))
        self.train_source = self.loop_config["train_source"]  # this rank reads its own rows (data_order.py)
        self.readers: list = []  # each epoch's RankReader: what this rank read
        self.eval_batches = eval_micro_batches(self.loop_config["eval_rows"], cfg.data.micro_batch, self.rank, self.world, self.device)
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak_flops = peak_flops(self.device.type, cfg.logging.peak_tflops_per_worker)
        self.attempt_start = time.perf_counter()

    def resume(self, point: ResumePoint) -> None:
        """Weights, optimizer, RNGs and position from a checkpoint: the run goes on as if it had never stopped."""
        checkpoint.load_checkpoint(self.engine, point.load_dir)
        # A rank that did not exist when the checkpoint was written has no saved RNG states.
        checkpoint.restore_rng(point.checkpoint_dir, self.rank, self.cfg.seed + self.rank + point.saved["step"], self.device)
        self.state = TrainState.from_saved(point.saved)
        if self.rank == 0:
            saved = point.saved
            how = f", universal: was {saved['world_size']} workers, ZeRO-{saved['zero_stage']}" if point.universal else ""
            say(self.run_dir, f"resuming from step {self.state.step} ({point.checkpoint_dir.name}{how})")

    def elapsed_s(self) -> float:
        """Seconds trained over all attempts."""
        return self.state.elapsed_before + time.perf_counter() - self.attempt_start

    # ---- training --------------------------------------------------------------------------------

    def train(self) -> None:
        """Step through the data order until the last step: max_steps, or the time limit."""
        if self.state.step == 0 and self.cfg.eval.at_start:
            val_loss = self.evaluate()
            if val_loss is not None:
                self.tracker.log({"step": 0, "val_loss": val_loss, "val_ppl": perplexity(val_loss), "elapsed_s": 0.0})
        if self.state.step >= self.cfg.max_steps:
            return
        data = self.cfg.data
        batches = epoch_batches(self.train_source, data.shuffle_window, data.shuffle_seed, self.batch_rows,
                                self.state.epoch, self.state.rows_in_epoch, self.rank, self.world, self.readers)
        for epoch, batch in batches:
            if epoch != self.state.epoch:
                self.state.next_epoch()
            maybe_inject_fault(self.cfg.faults, self.rank, self.state.step, self.home)
            result = self.train_step(batch)
            out_of_time, asked_to_stop = self.stop_vote()
            is_last = self.state.step == self.cfg.max_steps or out_of_time
            self.stopped = asked_to_stop and not is_last  # a run at its last step finishes (and exports) instead
            row = self.log_step(result, is_last)
            if due(self.state.step, self.cfg.checkpoint.every, is_last or self.stopped):
                metrics = {"step": self.state.step, "loss": result.loss}
                if "val_loss" in row:
                    metrics["val_loss"] = row["val_loss"]
                self.save_checkpoint(metrics)
            if self.stopped and self.rank == 0:
                mark_stopped(self.home, self.state.step)  # the checkpoint is complete: the driver may say so
            if is_last or self.stopped:
                return

    def train_step(self, rows: dict[str, np.ndarray]) -> StepResult:
        """One optimizer step on this rank's rows of a global batch: `grad_accum` forward/backwards, one update.

        Each micro-batch backpropagates its summed token loss divided by the target count of the
        whole global batch, times world x accum to undo DeepSpeed's averaging over micro-batches
        (backward scales by 1/accum) and ranks (the gradient all-reduce averages): the gradient is
        that of the global batch's mean token loss, however the batch is split.
        """
        start = time.perf_counter()
        lr = learning_rate(self.state.step, self.cfg)
        set_lr(self.engine, lr)
        targets = max(self.global_target_count(rows), 1)
        scale = self.world * self.accum / targets
        loss_sum, own_norm = 0.0, None
        for i, micro in enumerate(micro_batches(rows, self.cfg.data.micro_batch, self.accum, self.device)):
            total, _ = self.loss_fn(self.engine, micro)
            self.engine.backward(total * scale)
            loss_sum += float(total.detach())
            # Measured before the update, which clears the gradients; used only if DeepSpeed reports none.
            if i == self.accum - 1 and self.zero_stage == 0 and self.engine.get_global_grad_norm() is None:
                own_norm = grad_norm_of(self.engine.module)
            self.engine.step()  # DeepSpeed updates at the last micro-batch only
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # time the step, not its kernel launches
        seconds = time.perf_counter() - start
        tokens = self.batch_rows * self.cfg.data.seq_len
        self.throughput.add(tokens, seconds)
        self.state.advance(self.batch_rows, tokens)
        ds_norm = self.engine.get_global_grad_norm()
        loss = all_reduce_sum([loss_sum], self.device)[0] / targets
        return StepResult(lr=lr, loss=loss, grad_norm=float(ds_norm) if ds_norm is not None else own_norm)

    def global_target_count(self, rows: dict[str, np.ndarray]) -> int:
        """The target tokens of the whole global batch: every rank's count, summed (a pretraining row
        always has seq_len of them, so there it needs no communication)."""
        if "loss_mask" not in rows:
            return target_count(rows) * self.world
        return int(all_reduce_sum([float(target_count(rows))], self.device)[0])

    def rows_read(self) -> int:
        """Rows every rank read from the split in this attempt. A rank reads a window's rows before it
        trains on them, so over whole epochs this equals the rows trained when each is read once."""
        return int(all_reduce_sum([float(sum(r.rows_read for r in self.readers))], self.device)[0])

    def stop_vote(self) -> tuple[bool, bool]:
        """(out of time, a stop was requested): only rank 0 reads the clock and the run dir, and all
        ranks learn its answers, so they stop at the same step."""
        out_of_time = self.rank == 0 and self.cfg.max_time_s > 0 and self.elapsed_s() >= self.cfg.max_time_s
        asked = self.rank == 0 and self.stop_requests.asked()
        votes = all_reduce_sum([float(out_of_time), float(asked)], self.device)
        return votes[0] > 0, votes[1] > 0

    def evaluate(self) -> float | None:
        """The mean token loss over the fixed eval set (summed over ranks, then divided); None when there is none."""
        if not self.eval_batches:
            return None
        self.engine.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for micro in self.eval_batches:
                loss_sum, n = self.loss_fn(self.engine, micro)
                total, count = total + float(loss_sum), count + int(n)
        self.engine.train()
        total, count = all_reduce_sum([total, float(count)], self.device)
        return total / max(count, 1.0)

    # ---- logging ---------------------------------------------------------------------------------

    def log_step(self, result: StepResult, is_last: bool) -> dict:
        """Log the step's row and return it ({} when nothing is due).

        Train metrics every `logging.every` steps and at the first and last; the val loss every
        `eval.every` steps and at the last (an eval-only row carries no throughput figures).
        """
        step = self.state.step
        row: dict = {}
        if due(step, self.cfg.logging.every, is_last) or step == 1:
            row = self.train_row(result)
        if due(step, self.cfg.eval.every, is_last):
            val_loss = self.evaluate()
            if val_loss is not None:
                row = row or self.loss_row(result)
                row.update(val_loss=val_loss, val_ppl=perplexity(val_loss))
        if row:
            row["elapsed_s"] = self.elapsed_s()
            self.tracker.log(row)
            self.last_row = row
        return row

    def loss_row(self, result: StepResult) -> dict:
        return {"step": self.state.step, "loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
                "tokens_per_s": None, "mfu": None, "mem_gb": None}

    def train_row(self, result: StepResult) -> dict:
        tokens_per_s = self.throughput.take()
        return self.loss_row(result) | {
            "tokens_per_s": tokens_per_s, "mfu": self.flops_per_token * tokens_per_s / (self.peak_flops * self.world) if self.peak_flops else None,
            "mem_gb": memory_gb(self.device), "tokens": self.state.tokens, "epoch": self.state.epoch,
            "rows_read": self.rows_read(),
        }

    # ---- checkpoints and export ------------------------------------------------------------------

    def save_checkpoint(self, metrics: dict) -> None:
        """Every rank writes its part of a checkpoint locally, copies it into the run dir and records it
        complete; once every rank has, rank 0 prunes old checkpoints and all report to Ray Train.

        The checkpoint goes to Ray as metrics only: raylm finds its checkpoints on storage itself
        (training/checkpoint_store.py says why).
        """
        part = checkpoint.save_checkpoint(self.engine, self.saved_state(), self.rank, self.device)
        if self.cfg.checkpoint.export_hf:
            self.export_model(part / checkpoint.MODEL_SUBDIR)
        step = self.state.step
        folder = storage.child(self.home, checkpoint_store.checkpoint_name(step))
        checkpoint_store.publish_part(part, folder, self.rank, self.world, step)
        shutil.rmtree(part, ignore_errors=True)
        dist.barrier()  # every rank's record is written: the checkpoint is complete
        if self.rank == 0:
            checkpoint_store.prune(self.home, self.cfg.checkpoint.keep)
            run_home.send_metrics(self.home)  # a resume on another machine goes on from these
        ray.train.report(metrics)

    def saved_state(self) -> dict:
        return self.state.to_saved(self.elapsed_s(), world_size=self.world, zero_stage=self.zero_stage, global_batch=self.batch_rows)

    def export_model(self, target: Path) -> None:
        """The weights as a Hugging Face model dir, written by rank 0 (every rank takes part in ZeRO-3's gathers)."""
        weights = checkpoint.full_state_dict(self.engine, self.zero_stage, self.rank)
        if self.rank == 0:
            source = {"kind": self.kind, "step": self.state.step, "run_dir": str(self.home)}
            tokenizer = storage.local_dir(self.loop_config["tokenizer_dir"])  # a dataset on object storage: copied here
            save_model_dir(target, weights, self.cfg.model, tokenizer, source=source)

    def finish(self) -> None:
        """The model dir of the run (not of one stopped on request: it is not done), and the tracker closed."""
        if self.stopped:
            self.tracker.finish()
            return
        self.export_model(self.run_dir / run_home.MODEL_SUBDIR)
        self.tracker.finish()
        if self.rank == 0:
            run_home.send_model(self.run_dir / run_home.MODEL_SUBDIR, self.home)
            run_home.send_metrics(self.home)
            print(f"[raylm] rank 0 done at step {self.state.step}; last logged: {self.last_row}", flush=True)
