"""The model and its DeepSpeed engine: built alike on every rank, and the knobs a step turns.

The model is initialised from the seed, or loaded from a model dir (fine-tuning), or, under
ZeRO-3 from scratch, built already partitioned so that no rank ever holds it whole. DeepSpeed is
imported inside the functions: the worker chooses its accelerator (DS_ACCELERATOR) first.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys

import torch

from raylm.model.transformer import ModelConfig, Transformer, init_module_weights
from raylm.training.config import TrainConfig
from raylm.training.deepspeed_config import build_ds_config


def torch_extensions_dir() -> str:
    """Where DeepSpeed's JIT-compiled ops of this environment live: ~/.cache/torch_extensions/raylm-<key>.

    torch's default, ~/.cache/torch_extensions/py311_cpu, is one folder per Python version and
    accelerator, shared by every virtualenv of the user: a second venv (another torch) rebuilds the
    ops there (minutes) and the first then finds a build that is not its own and rebuilds again.
    Keyed on the interpreter's environment (sys.prefix) and the torch version, each venv keeps its own.
    """
    key = f"{sys.prefix}|{sys.version_info.major}.{sys.version_info.minor}|{torch.__version__}"
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "torch_extensions", "raylm-" + hashlib.sha256(key.encode()).hexdigest()[:12])


def use_own_torch_extensions_dir() -> str:
    """Set TORCH_EXTENSIONS_DIR to this environment's folder unless the user set it; return it.

    torch reads it when an op is compiled or loaded, so call it before DeepSpeed builds one: in the
    driver and in each Ray Train worker (whose environment is not the driver's on other nodes).
    """
    return os.environ.setdefault("TORCH_EXTENSIONS_DIR", torch_extensions_dir())


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
    """ZeRO-3: the model built partitioned, then initialised one gathered module at a time (see build_model)."""
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


def init_engine(cfg: TrainConfig, world: int, use_gpu: bool, init_model_dir: str | None, load_universal: bool):
    """The DeepSpeed engine around a freshly built model; `load_universal` when a universal checkpoint will be loaded."""
    import deepspeed

    ds_config = build_ds_config(cfg, world, use_gpu, load_universal=load_universal)
    model = build_model(cfg.model, cfg.seed, init_model_dir, cfg.deepspeed.activation_checkpointing,
                        zero3_ds_config=ds_config if cfg.deepspeed.zero_stage == 3 else None)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.optimizer.weight_decay), config=ds_config, dist_init_required=False
    )
    return engine


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def grad_norm_of(module: torch.nn.Module) -> float:
    """Global gradient norm where DeepSpeed does not compute one (ZeRO-0 fp32 without clipping)."""
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
