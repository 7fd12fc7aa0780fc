"""The training config: one typed dataclass tree, loaded from a recipe YAML plus `key=value` overrides.

Pretraining and fine-tuning share it (they run the same loop). `load_train_config` is the one
way in: it rejects unknown or ill-typed keys by their dotted name (raylm.core.config) and checks the
sections against each other. Batch arithmetic lives here too, so the driver, the workers and the
docs agree on what "global batch" means.

The commands fit a recipe to its data before building it: `draft_train_config` merges the recipe
and the user's settings and records which keys the user set; `fit_to_dataset` then adapts the
recipe's defaults (vocab size, context) to the dataset and refuses only the user's settings that
cannot work with it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

from raylm.core.config import (
    apply_overrides,
    coerce,
    did_you_mean,
    from_dict,
    get_dotted,
    leaf_keys,
    load_config,
    override_keys,
    override_pairs,
    read_yaml,
)
from raylm.core.errors import UserError
from raylm.model.transformer import ModelConfig

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class DataConfig:
    seq_len: int = 256  # tokens per training sequence. Pretraining: the dataset's packed seq_len (a recipe's adapts;
    #   one you set must equal it). Fine-tuning: the padded row length, capped at the base model's context
    micro_batch: int = 8  # sequences per worker per forward/backward pass
    grad_accum: int = 1  # micro-batches accumulated per optimizer step (ignored when global_batch is set)
    global_batch: int = 0  # sequences per optimizer step over all workers; 0 = micro_batch*grad_accum*workers.
    #   Set it to keep the optimisation identical when the worker count changes (grad_accum is derived).
    shuffle_seed: int = 0  # seed of the deterministic data order: epoch e is permuted by (shuffle_seed, e)
    shuffle_window: int = 4096  # rows permuted together, over the global batch (training/data_order.py); larger mixes more, holds more rows in memory

    def validate(self) -> None:
        for name in ("seq_len", "micro_batch", "grad_accum", "shuffle_window"):
            if getattr(self, name) <= 0:
                raise UserError(f"data.{name} must be positive, got {getattr(self, name)}")
        if self.global_batch < 0:
            raise UserError(f"data.global_batch must be 0 (derived) or positive, got {self.global_batch}")


@dataclass
class OptimizerConfig:
    lr: float = 3e-4  # peak learning rate (AdamW)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW denominator epsilon
    weight_decay: float = 0.1  # decoupled weight decay on matrices (never on norms)

    def validate(self) -> None:
        if self.lr < 0 or self.weight_decay < 0 or self.eps <= 0:
            raise UserError("optimizer.lr and optimizer.weight_decay must be >= 0 and optimizer.eps > 0")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"optimizer.{name} must be in [0, 1), got {getattr(self, name)}")


@dataclass
class ScheduleConfig:
    kind: Literal["cosine", "wsd"] = "cosine"  # warmup then cosine decay, or warmup-stable-decay
    warmup_steps: int = 100  # linear warmup from 0 to optimizer.lr
    total_steps: int = 0  # steps the schedule spans; 0 = max_steps (set it to extend a run without changing its LR curve)
    min_lr_ratio: float = 0.1  # the final learning rate as a fraction of the peak
    decay_fraction: float = 0.2  # wsd only: the last fraction of total_steps that decays (linearly) to min_lr

    def validate(self) -> None:
        if self.warmup_steps < 0 or self.total_steps < 0:
            raise UserError("schedule.warmup_steps and schedule.total_steps must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise UserError(f"schedule.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 < self.decay_fraction <= 1:
            raise UserError(f"schedule.decay_fraction must be in (0, 1], got {self.decay_fraction}")


@dataclass
class DeepSpeedSection:
    zero_stage: int = 2  # ZeRO stage: 0 plain data parallel, 1 shards optimizer state, 2 + gradients, 3 + parameters
    offload_optimizer: bool = False  # keep optimizer state (and its step) on the CPU (DeepSpeedCPUAdam)
    offload_params: bool = False  # ZeRO-3 only: keep parameters on the CPU between uses
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto = bf16 on GPU, fp32 on CPU; fp16 needs a GPU
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 = no clipping
    activation_checkpointing: bool = False  # recompute each block in the backward pass to save memory
    ds_config_json: str | None = None  # a DeepSpeed JSON file deep-merged over the generated config (expert override)

    def validate(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise UserError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.offload_params and self.zero_stage != 3:
            raise UserError("deepspeed.offload_params needs deepspeed.zero_stage=3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise UserError("deepspeed.offload_optimizer needs deepspeed.zero_stage 1, 2 or 3")
        if self.grad_clip < 0:
            raise UserError(f"deepspeed.grad_clip must be >= 0, got {self.grad_clip}")
        if self.ds_config_json is not None and not Path(self.ds_config_json).is_file():
            raise UserError(f"deepspeed.ds_config_json: file {self.ds_config_json!r} does not exist")


@dataclass
class CheckpointSection:
    every: int = 500  # save a resumable checkpoint every N optimizer steps (and always at the end); 0 = only at the end
    keep: int = 3  # checkpoints kept in the run dir (the oldest are deleted)
    export_hf: bool = False  # also write a Hugging Face model dir (`model/`) inside every checkpoint
    # On SIGTERM or Ctrl-C: seconds to wait for the checkpoint at the next step before stopping at once
    # (keep it under the sender's own grace: Kubernetes' terminationGracePeriodSeconds, 30 by default).
    stop_grace_s: float = 25.0

    def validate(self) -> None:
        if self.every < 0 or self.keep <= 0:
            raise UserError("checkpoint.every must be >= 0 and checkpoint.keep >= 1")
        if self.stop_grace_s <= 0:
            raise UserError(f"checkpoint.stop_grace_s must be positive, got {self.stop_grace_s}")


@dataclass
class EvalConfig:
    every: int = 200  # evaluate on the val split every N steps (and at the end); 0 = only at the end
    rows: int = 0  # val rows scored in each evaluation (the split's first N, whatever the worker count); 0 = all
    at_start: bool = False  # also evaluate the initial weights (logged as step 0)

    def validate(self) -> None:
        if self.every < 0 or self.rows < 0:
            raise UserError(f"eval.every and eval.rows must be >= 0, got {self.every} and {self.rows}")


@dataclass
class LoggingConfig:
    every: int = 10  # console + W&B + metrics.jsonl every N steps (the first and last step always)
    wandb_project: str = "raylm"  # W&B project
    wandb_entity: str | None = None  # W&B entity (team); None = your default
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: WANDB_MODE, else online with an API key, else offline
    peak_tflops_per_worker: float = 0.0  # device peak for MFU; 0 = known GPU table, else a measured matmul peak

    def validate(self) -> None:
        if self.every <= 0:
            raise UserError(f"logging.every must be positive, got {self.every}")


@dataclass
class ScalingSection:
    num_workers: int = 2  # Ray Train workers (data-parallel ranks)
    use_gpu: bool | Literal["auto"] = "auto"  # auto = use GPUs when the cluster has any
    cpus_per_worker: float = 1.0  # CPUs reserved per worker
    gpus_per_worker: float = 1.0  # GPUs per worker when use_gpu
    resources_per_worker: dict[str, float] = field(default_factory=dict)  # extra custom resources per worker
    max_failures: int = 3  # worker-group restarts from the latest checkpoint before the run fails; -1 = unlimited

    def validate(self) -> None:
        if self.num_workers <= 0:
            raise UserError(f"scaling.num_workers must be positive, got {self.num_workers}")
        if self.cpus_per_worker <= 0:
            raise UserError(f"scaling.cpus_per_worker must be positive, got {self.cpus_per_worker}")


@dataclass
class FaultConfig:
    kill_rank: int = -1  # testing: this world rank exits hard (os._exit(1)) ...
    kill_at_step: int = 0  # ... when it reaches this step, on the run's first attempt only; 0 = never


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)  # the architecture (ignored for weights given by --base)
    data: DataConfig = field(default_factory=DataConfig)  # batches and data order
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)  # AdamW
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # the learning-rate curve
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)  # ZeRO, precision, clipping, offload
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)  # how often, how many
    eval: EvalConfig = field(default_factory=EvalConfig)  # validation loss / perplexity
    logging: LoggingConfig = field(default_factory=LoggingConfig)  # console, metrics.jsonl, W&B
    scaling: ScalingSection = field(default_factory=ScalingSection)  # Ray Train workers and resources
    faults: FaultConfig = field(default_factory=FaultConfig)  # fault injection for resume tests
    seed: int = 0  # seeds the weight init and every rank's RNGs
    max_steps: int = 1000  # optimizer steps to train
    max_time_s: float = 0.0  # also stop (evaluate, checkpoint, export) after this many seconds of training; 0 = no limit

    def validate(self) -> None:
        if self.max_steps <= 0:
            raise UserError(f"max_steps must be positive, got {self.max_steps}")
        if self.max_time_s < 0:
            raise UserError(f"max_time_s must be >= 0, got {self.max_time_s}")
        if self.data.seq_len > self.model.max_seq_len:
            raise UserError(f"data.seq_len ({self.data.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})")
        grad_accum(self, self.scaling.num_workers)  # a global batch the workers cannot split is an error now


def grad_accum(cfg: TrainConfig, world_size: int) -> int:
    """Micro-batches per step on each worker, honouring data.global_batch when it is set."""
    if not cfg.data.global_batch:
        return cfg.data.grad_accum
    per_pass = cfg.data.micro_batch * world_size
    if cfg.data.global_batch % per_pass:
        raise UserError(
            f"data.global_batch ({cfg.data.global_batch}) must be a multiple of data.micro_batch x workers "
            f"({cfg.data.micro_batch} x {world_size} = {per_pass})"
        )
    return cfg.data.global_batch // per_pass


def global_batch(cfg: TrainConfig, world_size: int) -> int:
    """Sequences per optimizer step over all workers."""
    return cfg.data.micro_batch * grad_accum(cfg, world_size) * world_size


def schedule_total_steps(cfg: TrainConfig) -> int:
    return cfg.schedule.total_steps or cfg.max_steps


# Command-line flags of `raylm pretrain` and `raylm finetune` for nested keys (raylm.core.cli_args).
FLAG_SHORTCUTS = {"num-workers": "scaling.num_workers", "zero-stage": "deepspeed.zero_stage"}


def recipe_names() -> list[str]:
    return sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))


def recipe_path(name_or_path: str) -> Path:
    """`tiny` -> training/configs/tiny.yaml; anything else is a path to an existing file."""
    builtin = CONFIG_DIR / f"{name_or_path}.yaml"
    if "/" not in name_or_path and not name_or_path.endswith((".yaml", ".yml")) and builtin.is_file():
        return builtin
    if not Path(name_or_path).is_file():
        raise UserError(
            f"config {name_or_path!r}: no such recipe or YAML file{did_you_mean(name_or_path, recipe_names())}; "
            f"the recipes in training/configs are {', '.join(recipe_names())}"
        )
    return Path(name_or_path)


def load_train_config(path: str | Path | None = None, overrides: Iterable[str | tuple[str, Any]] = ()) -> TrainConfig:
    """A recipe (file or built-in name) + overrides (`key=value` or (key, value)) -> a validated TrainConfig.

    As written: nothing is fitted to a dataset (the commands use `draft_train_config` + `fit_to_dataset`).
    """
    return load_config(TrainConfig, recipe_path(str(path)) if path is not None else None, list(overrides))


# ---- fitting a recipe to its data ----------------------------------------------------------------


def is_builtin_recipe(path: Path) -> bool:
    return path.resolve().parent == CONFIG_DIR.resolve()


@dataclass
class ConfigDraft:
    """A recipe merged with the user's settings, not yet built: what gets fitted to the data first.

    `user_keys` are the dotted keys the user set: `key=value` overrides and flags, and every key of
    a YAML file of their own given to --config. A built-in recipe's values (training/configs/) and
    the dataclass defaults are defaults: fitting may change them, and says so in `adapted`.
    """

    cls: type  # the config dataclass that `build` makes (TrainConfig, or fine-tuning's subclass)
    tree: dict[str, Any]  # the merged settings, nested like the YAML
    user_keys: frozenset[str]  # dotted keys the user set
    adapted: list[str] = field(default_factory=list)  # what fitting changed: "data.seq_len 32 -> 256 from ..."

    def user_set(self, key: str) -> bool:
        return key in self.user_keys

    def value(self, key: str, tp: Any = int) -> Any:
        """The draft's value at dotted `key` (the dataclass default when unset), checked against `tp`."""
        try:
            raw = get_dotted(self.tree, key)
        except (KeyError, TypeError, AttributeError):
            raw = get_dotted(self.cls(), key)
        return coerce(raw, tp, key)

    def adapt(self, key: str, value: Any, why: str) -> None:
        """Set a default to what the data needs, noting it when it changes."""
        old = self.value(key, type(value))
        if old != value:
            apply_overrides(self.tree, [(key, value)])
            self.adapted.append(f"{key} {old} -> {value} {why}")

    def build(self):
        """The validated config (unknown keys, types and cross-section checks as in `load_train_config`)."""
        return from_dict(self.cls, copy.deepcopy(self.tree))

    def adapted_line(self) -> str | None:
        """The one console line saying what fitting changed (None when nothing)."""
        return f"[raylm] {'; '.join(self.adapted)}" if self.adapted else None


def draft_train_config(path: str | Path | None, overrides: Iterable[str | tuple[str, Any]] = (), cls: type = TrainConfig) -> ConfigDraft:
    """A recipe (built-in name or YAML path) + overrides, merged, with the keys the user set."""
    recipe = recipe_path(str(path)) if path is not None else None
    pairs = override_pairs(overrides)
    file_tree = read_yaml(recipe) if recipe is not None else {}
    user = override_keys(pairs)
    if recipe is not None and not is_builtin_recipe(recipe):
        user |= leaf_keys(file_tree)  # the user's own file: its values are choices, not defaults
    return ConfigDraft(cls, apply_overrides(copy.deepcopy(file_tree), pairs), frozenset(user))


def fit_to_dataset(draft: ConfigDraft, *, seq_len: int, vocab_size: int, where: str) -> ConfigDraft:
    """Fit a pretraining draft to a dataset packed at `seq_len` whose tokenizer has `vocab_size` tokens.

    - data.seq_len must equal the dataset's: its rows hold exactly seq_len + 1 ids.
    - model.max_seq_len follows data.seq_len; set, it may be larger (a longer-context model trained
      on shorter rows), never smaller.
    - model.vocab_size follows the tokenizer; set, it may be larger (embedding rows no token id
      reaches: padding, e.g. to a multiple of 64), never smaller.
    A default adapts (noted in draft.adapted); a setting of the user's that conflicts is a UserError
    naming both numbers and what would fit. `where` names the dataset in messages.
    """
    asked = draft.value("data.seq_len")
    if draft.user_set("data.seq_len") and asked != seq_len:
        raise UserError(
            f"data.seq_len={asked} asked for a dataset packed at {seq_len} ({where}): its rows hold exactly "
            f"{seq_len} + 1 tokens; leave data.seq_len out (it follows the dataset) or re-prepare with --seq-len {asked}"
        )
    draft.adapt("data.seq_len", seq_len, "from the dataset's rows")

    context = draft.value("model.max_seq_len")
    if not draft.user_set("model.max_seq_len"):
        draft.adapt("model.max_seq_len", seq_len, "= data.seq_len")
    elif context < seq_len:
        raise UserError(
            f"model.max_seq_len={context} asked for a dataset packed at {seq_len} ({where}): the context must "
            f"hold a row; set model.max_seq_len={seq_len} or more, or leave it out (it follows data.seq_len)"
        )

    vocab = draft.value("model.vocab_size")
    if not draft.user_set("model.vocab_size"):
        draft.adapt("model.vocab_size", vocab_size, "from the dataset's tokenizer")
    elif vocab < vocab_size:
        raise UserError(
            f"model.vocab_size={vocab} asked for a dataset whose tokenizer has {vocab_size} tokens ({where}): "
            f"set model.vocab_size={vocab_size} or more, or leave it out (it follows the tokenizer)"
        )
    return draft
