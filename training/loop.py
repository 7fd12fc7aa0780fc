"""The one train loop, run by every Ray Train worker: pretraining and fine-tuning both come here.

Per worker: join the process group DeepSpeed-style, build the model (random init from the seed,
or the weights of a model dir), wrap it in a DeepSpeed engine, resume from Ray Train's latest
checkpoint when there is one, then step: forward/backward over `grad_accum` micro-batches, an
optimizer step, metrics, an eval every `eval.every` steps and a checkpoint every
`checkpoint.every` steps through `ray.train.report`. At the end: a last checkpoint and the model
exported as a Hugging Face model dir.

The data order is a pure function of (data.shuffle_seed, epoch) and independent of the worker
count: every worker reads the whole split (Ray Data, not split across workers), in file order,
permutes it window by window with a seeded RNG, and the global batch of step s is the next
`global_batch` rows of that stream; worker r takes its contiguous slice of the global batch.
Resuming skips the rows already consumed. This trades reading the split once per worker for
exactness: identical batches on a restart, a re-run, or at another worker count with the same
global batch, and equal step counts on every rank by construction. (The driver materializes small
splits in Ray's object store, so "reading" is then a memory copy.)

The learning rate is a pure function of the step, so resuming the step resumes the schedule.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from raylm.core.config import from_dict
from raylm.model.transformer import (
    ModelConfig,
    Transformer,
    flops_per_token,
    init_module_weights,
)
from raylm.training.config import (
    TrainConfig,
    global_batch,
    grad_accum,
    schedule_total_steps,
)
from raylm.training.tracking import Tracker, new_wandb_id, perplexity

FAULT_MARKER_DIR = ".faults"

# bf16 dense peaks (FLOP/s) of GPUs we may meet, for MFU; others are measured.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


# ---- schedule ------------------------------------------------------------------------------------


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


# ---- data ----------------------------------------------------------------------------------------


def as_columns(batch: dict) -> dict[str, np.ndarray]:
    """A Ray Data numpy batch -> 2-D int arrays for input_ids and (when present) loss_mask."""
    columns = {"input_ids": np.stack(list(batch["input_ids"])).astype(np.int64)}
    if "loss_mask" in batch:
        columns["loss_mask"] = np.stack(list(batch["loss_mask"])).astype(bool)
    return columns


def shuffled_rows(shard, window: int, seed: int, epoch: int) -> Iterator[dict[str, np.ndarray]]:
    """The epoch's rows in windows of `window` rows, each permuted by (seed, epoch, window index)."""
    for index, batch in enumerate(shard.iter_batches(batch_size=window, batch_format="numpy", drop_last=False)):
        columns = as_columns(batch)
        order = np.random.default_rng([seed, epoch, index]).permutation(len(columns["input_ids"]))
        yield {name: array[order] for name, array in columns.items()}


def global_batches(shard, window: int, seed: int, epoch: int, size: int, skip_rows: int) -> Iterator[dict[str, np.ndarray]]:
    """Consecutive `size`-row global batches of the epoch's stream, after skipping `skip_rows` rows.

    The tail shorter than a global batch is dropped, so every rank sees the same step count.
    """
    pending: dict[str, np.ndarray] | None = None
    for chunk in shuffled_rows(shard, window, seed, epoch):
        if skip_rows:
            drop = min(skip_rows, len(chunk["input_ids"]))
            chunk = {name: array[drop:] for name, array in chunk.items()}
            skip_rows -= drop
        pending = chunk if pending is None else {n: np.concatenate([pending[n], chunk[n]]) for n in chunk}
        while len(pending["input_ids"]) >= size:
            yield {name: array[:size] for name, array in pending.items()}
            pending = {name: array[size:] for name, array in pending.items()}


def rank_micro_batches(batch: dict[str, np.ndarray], rank: int, micro_batch: int, accum: int, device) -> list[dict]:
    """This rank's contiguous slice of a global batch, cut into `accum` micro-batches of model inputs."""
    start = rank * micro_batch * accum
    micro = []
    for i in range(accum):
        lo = start + i * micro_batch
        ids = torch.from_numpy(batch["input_ids"][lo : lo + micro_batch]).to(device)
        inputs = {"tokens": ids[:, :-1], "targets": ids[:, 1:]}
        if "loss_mask" in batch:
            inputs["loss_mask"] = torch.from_numpy(batch["loss_mask"][lo : lo + micro_batch, 1:]).to(device)
        micro.append(inputs)
    return micro


def eval_micro_batches(eval_rows: dict[str, np.ndarray] | None, micro_batch: int, rank: int, world: int, device) -> list[dict]:
    """This rank's equal, contiguous share of the fixed eval set, in micro-batches of model inputs."""
    if not eval_rows:
        return []
    per_rank = len(eval_rows["input_ids"]) // world
    # A copy: the rows may be read-only Arrow buffers, which torch.from_numpy warns about.
    mine = {name: array[rank * per_rank : (rank + 1) * per_rank].copy() for name, array in eval_rows.items()}
    micro = []
    for lo in range(0, per_rank, micro_batch):
        ids = torch.from_numpy(mine["input_ids"][lo : lo + micro_batch]).to(device)
        inputs = {"tokens": ids[:, :-1], "targets": ids[:, 1:]}
        if "loss_mask" in mine:
            inputs["loss_mask"] = torch.from_numpy(mine["loss_mask"][lo : lo + micro_batch, 1:]).to(device)
        micro.append(inputs)
    return micro


# ---- model and engine ----------------------------------------------------------------------------


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (embeddings, projections), never norm weights."""
    decay, no_decay = [], []
    for param in model.parameters():
        (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_model(model_cfg: ModelConfig, seed: int, init_model_dir: str | None, activation_checkpointing: bool,
                zero3_ds_config: dict | None = None) -> Transformer:
    """The model, initialised the same on every rank (or loaded from a model dir).

    With `zero3_ds_config` (ZeRO-3, from scratch) it is built under `deepspeed.zero.Init`: each
    module's parameters are partitioned across ranks as soon as it is constructed, so no rank
    ever holds the whole model (a 7B model is 27 GB in fp32). Its weights are then initialised one
    module at a time, gathered, on rank 0 and scattered: on CPU the very weights of the plain build
    (tested); on GPU the draws come from the CUDA generator instead.
    """
    torch.manual_seed(seed)  # the same init on every rank
    if init_model_dir:
        from raylm.model.model_dir import load_model_dir

        model, _ = load_model_dir(init_model_dir)
        model.train()
    elif zero3_ds_config is not None:
        model = build_partitioned_model(model_cfg, zero3_ds_config)
    else:
        model = Transformer(model_cfg)
    if activation_checkpointing:
        model.activation_checkpoint = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    return model


def build_partitioned_model(model_cfg: ModelConfig, ds_config: dict) -> Transformer:
    import deepspeed

    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        # The submodules' default inits ran before DeepSpeed partitioned them, drawing what they
        # draw in a plain build; the model's own init then ran on empty shards and drew nothing,
        # so the generator stands where the plain build's init starts. Redone here, gathered.
        model = Transformer(model_cfg)
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if own:
            with deepspeed.zero.GatheredParameters(own, modifier_rank=0):
                if torch.distributed.get_rank() == 0:
                    init_module_weights(module, name, model_cfg)
    return model


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def grad_norm_of(module: torch.nn.Module) -> float:
    """Global gradient norm where DeepSpeed does not compute one (ZeRO-0 fp32 without clipping)."""
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


# ---- measurement ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def peak_flops(device_type: str, configured_tflops: float) -> float:
    """FLOP/s one worker could reach: configured, a known GPU's bf16 peak, else a measured fp32 matmul rate."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if device_type == "cuda":
        name = torch.cuda.get_device_name()
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops
    device = torch.device(device_type)
    a = torch.randn(512, 512, device=device)
    b = torch.randn(512, 512, device=device)
    a @ b
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.2:
        a @ b
        reps += 1
    if device_type == "cuda":
        torch.cuda.synchronize()
    return 2 * 512**3 * reps / (time.perf_counter() - start)


def memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # peak RSS (Linux reports KiB)


# ---- the loop ------------------------------------------------------------------------------------


def all_reduce_mean(values: list[float], device) -> list[float]:
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    dist.all_reduce(tensor)
    return (tensor / dist.get_world_size()).tolist()


def maybe_inject_fault(cfg: TrainConfig, rank: int, step: int, run_dir: Path) -> None:
    """Testing: the configured rank dies hard at the configured step, once per run dir."""
    if cfg.faults.kill_at_step != step or cfg.faults.kill_rank != rank:
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


def evaluate(engine, batches: list[dict], device) -> float | None:
    if not batches:
        return None
    engine.eval()
    with torch.no_grad():
        losses = [float(engine(**inputs)) for inputs in batches]
    engine.train()
    return all_reduce_mean([sum(losses) / len(losses)], device)[0]


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train's per-worker entry. `loop_config` is built by training.pretrain.run_training."""
    use_gpu = loop_config["use_gpu"]
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import ray.train
    import ray.train.torch

    from raylm.model.model_dir import save_model_dir
    from raylm.training.checkpoint import (
        MODEL_SUBDIR,
        convert_to_universal,
        full_state_dict,
        load_checkpoint,
        needs_universal,
        read_train_state,
        restore_rng,
        save_checkpoint,
        seed_everything,
    )
    from raylm.training.deepspeed_config import build_ds_config

    cfg = from_dict(TrainConfig, loop_config["config"])
    model_cfg = cfg.model
    run_dir = Path(loop_config["run_dir"])
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    accum, batch_rows = grad_accum(cfg, world), global_batch(cfg, world)
    stage = cfg.deepspeed.zero_stage

    # Resume point: Ray Train's latest checkpoint (after a worker-group restart or a re-run).
    checkpoint = ray.train.get_checkpoint()
    exits = contextlib.ExitStack()  # keeps a downloaded checkpoint dir alive until it is loaded
    ckpt_dir = Path(exits.enter_context(checkpoint.as_directory())) if checkpoint is not None else None
    state = read_train_state(ckpt_dir) if ckpt_dir else None
    universal = bool(state) and needs_universal(state, world, stage)
    load_dir = (convert_to_universal(ckpt_dir, state["zero_stage"]) if universal else ckpt_dir) if ckpt_dir else None

    seed_everything(cfg.seed + rank)
    ds_config = build_ds_config(cfg, world, use_gpu, load_universal=universal)
    model = build_model(model_cfg, cfg.seed, loop_config.get("init_model_dir"), cfg.deepspeed.activation_checkpointing,
                        zero3_ds_config=ds_config if stage == 3 else None)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.optimizer.weight_decay), config=ds_config, dist_init_required=False
    )
    del model

    step, epoch, rows_in_epoch, tokens_seen, elapsed_before = 0, 0, 0, 0, 0.0
    wandb_id = None
    if state:
        load_checkpoint(engine, load_dir)
        restore_rng(ckpt_dir, rank, cfg.seed + rank + state["step"])
        step, epoch, rows_in_epoch = state["step"], state["epoch"], state["rows_in_epoch"]
        tokens_seen, elapsed_before, wandb_id = state["tokens"], state["elapsed_s"], state.get("wandb_id")
        if rank == 0:
            how = f"universal checkpoint (was {state['world_size']} workers, ZeRO-{state['zero_stage']})" if universal else "checkpoint"
            print(f"[raylm] resuming from step {step} ({how})", flush=True)
    if universal:
        shutil.rmtree(load_dir, ignore_errors=True)
    exits.close()
    wandb_id = wandb_id or (new_wandb_id() if rank == 0 else None)

    tracker = Tracker(run_dir, cfg.logging, active=rank == 0, max_steps=cfg.max_steps)
    tracker.start(resumed_step=step, wandb_id=wandb_id, config=loop_config["config"] | {"kind": loop_config["kind"]}, run_name=run_dir.name)

    train_shard = ray.train.get_dataset_shard("train")
    val_batches = eval_micro_batches(loop_config["eval_rows"], cfg.data.micro_batch, rank, world, device)
    seq_len = cfg.data.seq_len
    flops_token = flops_per_token(model_cfg, seq_len)
    peak = peak_flops(device.type, cfg.logging.peak_tflops_per_worker)
    attempt_start = time.perf_counter()

    def train_state() -> dict:
        return {
            "step": step, "epoch": epoch, "rows_in_epoch": rows_in_epoch, "tokens": tokens_seen,
            "world_size": world, "zero_stage": stage, "global_batch": batch_rows, "wandb_id": wandb_id,
            "elapsed_s": elapsed_before + time.perf_counter() - attempt_start,
        }

    def export_model(target: Path) -> None:
        weights = full_state_dict(engine, stage)  # collective under ZeRO-3
        if rank == 0:
            save_model_dir(target, weights, model_cfg, loop_config["tokenizer_dir"], source={"kind": loop_config["kind"], "step": step, "run_dir": str(run_dir)})

    def report_checkpoint(metrics: dict) -> None:
        folder = save_checkpoint(engine, train_state(), rank)
        if cfg.checkpoint.export_hf:
            export_model(folder / MODEL_SUBDIR)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)), checkpoint_dir_name=f"checkpoint_step{step:08d}")
        shutil.rmtree(folder, ignore_errors=True)

    if step == 0 and cfg.eval.at_start:
        val_loss = evaluate(engine, val_batches, device)
        if val_loss is not None:
            tracker.log({"step": 0, "val_loss": val_loss, "val_ppl": perplexity(val_loss), "elapsed_s": 0.0})
    last_checkpoint_step = step
    window_tokens, window_time = 0, 0.0
    last_row: dict = {}
    while step < cfg.max_steps:
        batches = global_batches(train_shard, cfg.data.shuffle_window, cfg.data.shuffle_seed, epoch, batch_rows, rows_in_epoch)
        stepped_this_epoch = False
        for batch in batches:
            maybe_inject_fault(cfg, rank, step, run_dir)
            t0 = time.perf_counter()
            lr = learning_rate(step, cfg)
            set_lr(engine, lr)
            micro = rank_micro_batches(batch, rank, cfg.data.micro_batch, accum, device)
            loss_sum, norm = 0.0, None
            for i, inputs in enumerate(micro):
                loss = engine(**inputs)
                engine.backward(loss)
                loss_sum += float(loss.detach())
                if i == accum - 1 and stage == 0 and engine.get_global_grad_norm() is None:
                    norm = grad_norm_of(engine.module)
                engine.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            window_time += time.perf_counter() - t0
            step, rows_in_epoch = step + 1, rows_in_epoch + batch_rows
            tokens_seen += batch_rows * seq_len
            window_tokens += batch_rows * seq_len
            stepped_this_epoch = True
            # One all-reduce carries the loss and rank 0's time-limit verdict, so all ranks stop together.
            out_of_time = rank == 0 and cfg.max_time_s > 0 and train_state()["elapsed_s"] >= cfg.max_time_s
            loss_mean, stop_vote = all_reduce_mean([loss_sum / accum, float(out_of_time)], device)
            ds_norm = engine.get_global_grad_norm()
            norm = float(ds_norm) if ds_norm is not None else norm

            is_last = step == cfg.max_steps or stop_vote > 0
            row: dict = {}
            if step % cfg.logging.every == 0 or step == 1 or is_last:
                tokens_per_s = window_tokens / max(window_time, 1e-9)
                row = {
                    "step": step, "loss": loss_mean, "lr": lr, "grad_norm": norm, "tokens_per_s": tokens_per_s,
                    "mfu": flops_token * tokens_per_s / (peak * world), "mem_gb": memory_gb(device), "tokens": tokens_seen,
                    "epoch": epoch,
                }
                window_tokens, window_time = 0, 0.0
            if (cfg.eval.every and step % cfg.eval.every == 0) or is_last:
                val_loss = evaluate(engine, val_batches, device)
                if val_loss is not None:
                    row = row or {"step": step, "loss": loss_mean, "lr": lr, "grad_norm": norm, "tokens_per_s": None, "mfu": None, "mem_gb": None}
                    row.update(val_loss=val_loss, val_ppl=perplexity(val_loss))
            if row:
                row["elapsed_s"] = train_state()["elapsed_s"]
                tracker.log(row)
                last_row = row
            if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or is_last:
                report_checkpoint({"step": step, "loss": loss_mean, **({"val_loss": row["val_loss"]} if "val_loss" in row else {})})
                last_checkpoint_step = step
            if is_last:
                break
        else:
            if not stepped_this_epoch:
                raise RuntimeError("the train split has fewer rows than one global batch")
            epoch, rows_in_epoch = epoch + 1, 0
            continue
        break

    if last_checkpoint_step != step:  # only when resumed at or past max_steps with a newer step (never in practice)
        report_checkpoint({"step": step})
    export_model(run_dir / MODEL_SUBDIR)
    tracker.finish()
    if rank == 0:
        print(f"[raylm] rank 0 done at step {step}; last logged: {last_row}", flush=True)
