"""The DeepSpeed config dict, built from the typed TrainConfig (and an optional user JSON on top).

Choices:
- The optimizer is DeepSpeed's "AdamW". Without offload it is plain `torch.optim.AdamW`
  (`torch_adam`), so the CPU path compiles nothing and matches a bare PyTorch loop; with optimizer
  offload DeepSpeed picks its DeepSpeedCPUAdam.
- The learning rate is set by the loop at every step from a pure function of the step (see
  training/schedule.py), so there is no scheduler state to save: resuming the step resumes the curve.
- ZeRO-3 gathers 16-bit weights on save so `save_16bit_model` works; our HF export gathers fp32
  weights itself.
- `checkpoint.load_universal` is switched on by the loop when it resumes a checkpoint written at a
  different world size (after converting it with ds_to_universal).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from raylm.core.errors import UserError
from raylm.training.config import TrainConfig, grad_accum


def resolve_precision(precision: str, use_gpu: bool) -> str:
    """"auto" -> bf16 on GPU, fp32 on CPU; fp16 is refused on CPU (DeepSpeed's CPU accelerator has no fp16)."""
    if precision == "auto":
        return "bf16" if use_gpu else "fp32"
    if precision == "fp16" and not use_gpu:
        raise UserError("deepspeed.precision=fp16 needs GPUs; use fp32 or bf16 on CPU")
    return precision


def deep_merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_user_ds_config(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"deepspeed.ds_config_json {path!r}: not a readable JSON file ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"deepspeed.ds_config_json {path!r}: must hold a JSON object")
    return data


def zero_section(cfg: TrainConfig, use_gpu: bool) -> dict:
    ds = cfg.deepspeed
    zero: dict = {"stage": ds.zero_stage}
    if ds.zero_stage >= 2:
        zero.update(overlap_comm=use_gpu, contiguous_gradients=True, reduce_scatter=True)
    if ds.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    return zero


def build_ds_config(cfg: TrainConfig, world_size: int, use_gpu: bool, load_universal: bool = False) -> dict:
    """The DeepSpeed config for `world_size` workers."""
    precision = resolve_precision(cfg.deepspeed.precision, use_gpu)
    accum = grad_accum(cfg, world_size)
    opt = cfg.optimizer
    config = {
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch,
        "gradient_accumulation_steps": accum,
        "train_batch_size": cfg.data.micro_batch * accum * world_size,
        "gradient_clipping": cfg.deepspeed.grad_clip,
        "zero_optimization": zero_section(cfg, use_gpu),
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16, "loss_scale_window": 500},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": opt.lr,
                "betas": [opt.beta1, opt.beta2],
                "eps": opt.eps,
                "weight_decay": opt.weight_decay,
                **({} if cfg.deepspeed.offload_optimizer else {"torch_adam": True}),
            },
        },
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 2**31 - 1,  # the loop does its own logging
        "wall_clock_breakdown": False,
    }
    if cfg.deepspeed.ds_config_json:
        config = deep_merge(config, read_user_ds_config(cfg.deepspeed.ds_config_json))
    return config
