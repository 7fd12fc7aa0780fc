"""`raylm finetune`: chat SFT of a Llama-format model dir on the one train loop.

    raylm finetune --config sft-tiny --base RUN/model --data chat.jsonl|CHAT_DATASET_DIR --out RUN_DIR [key=value ...]

What differs from pretraining is only the dataset and the starting weights: the chat records
become packed rows of `input_ids` + `loss_mask` + `segment_ids` in a chat dataset dir, on Ray Data
(data/chat_dataset.py; a JSONL file is turned into RUN_DIR/chat-data first, training/sft_data.py),
which the workers read as they read a pretraining dataset; the weights and the
model config come from `--base` (any Hugging Face Llama-format dir: ours, or an open model on disk),
and the tokenizer is the base's own. The loop, DeepSpeed, checkpoints, exact resume and W&B are
pretraining's, through `raylm.training.pretrain.run_training(..., kind="finetune")`.

Around the training run, on the driver: the held-out SFT loss of the base and of the result, and
greedy answers of both to a few fixed prompts. They go to RUN_DIR/finetune.json and the run's
report.md (with the data counts: skipped lines, truncated and dropped conversations).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raylm.core import storage
from raylm.core.cli_args import add_config_flags, config_values, parse_command_line
from raylm.core.entry import run_main
from raylm.core.errors import UserError
from raylm.core.files import write_json_atomic
from raylm.training.config import (
    FLAG_SHORTCUTS,
    ConfigDraft,
    TrainConfig,
    draft_train_config,
    recipe_names,
)
from raylm.training.row_source import ParquetRows, first_rows
from raylm.training.sft_data import SftDataConfig, chat_dataset_for_run

DEFAULT_PROMPTS = [
    "What does `json.dumps` do?",
    "What does `os.path.join` do?",
    "What is the `with` statement?",
]


@dataclass
class FinetuneConfig(TrainConfig):
    sft: SftDataConfig = field(default_factory=SftDataConfig)  # chat file -> rows: split, over-long rule
    eval_prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))  # answered by the base and the result, into the report
    eval_max_tokens: int = 64  # longest greedy answer to each eval prompt
    eval_batch: int = 8  # rows per forward when measuring the held-out loss on the driver
    eval_max_rows: int = 256  # held-out rows the driver scores before and after (the driver may be CPU-only)

    def validate(self) -> None:
        super().validate()
        for name in ("eval_max_tokens", "eval_batch", "eval_max_rows"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")


def train_config(cfg: FinetuneConfig) -> TrainConfig:
    """The TrainConfig part that the loop's workers rebuild (they know no fine-tuning keys)."""
    return TrainConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig)})


def finetune_settings(cfg: FinetuneConfig) -> dict[str, Any]:
    """The fine-tuning-only keys, for finetune.json and the report (run.json holds the rest)."""
    shared = {f.name for f in dataclasses.fields(TrainConfig)}
    return {name: value for name, value in dataclasses.asdict(cfg).items() if name not in shared}


# ---- evaluation on the driver ---------------------------------------------------------------------


def eval_device():
    import torch

    return ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)


def heldout_loss(model_dir: str | Path, rows: dict | None, batch: int) -> float | None:
    """Mean loss per trained token of a model dir over the val rows (None when there are none)."""
    import torch

    from raylm.model.model_dir import load_model_dir
    from raylm.training.data_order import micro_batches
    from raylm.training.losses import next_token_loss

    if not rows:
        return None
    device, dtype = eval_device()
    model, _ = load_model_dir(model_dir, device=device, dtype=dtype)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows["input_ids"]), batch):
            micro = micro_batches({name: array[start : start + batch] for name, array in rows.items()}, batch, 1, device)[0]
            loss_sum, n = next_token_loss(model, micro)
            total, count = total + float(loss_sum), count + int(n)
    return total / max(count, 1)


def answers(model_dir: str | Path, prompts: list[str], max_tokens: int) -> list[str]:
    from raylm.inference.generate import generate_texts

    if not prompts:
        return []
    return generate_texts(str(model_dir), prompts, max_tokens=max_tokens, temperature=0.0, chat=True)


def evaluate(model_dir: str | Path, val_rows: dict | None, cfg: FinetuneConfig) -> dict[str, Any]:
    return {
        "val_loss": heldout_loss(model_dir, val_rows, cfg.eval_batch),
        "answers": answers(model_dir, cfg.eval_prompts, cfg.eval_max_tokens),
    }


# ---- the command ------------------------------------------------------------------------------------


def report_sections(before: dict, after: dict, stats: dict, settings: dict) -> dict[str, dict[str, Any]]:
    def loss_and_ppl(value):
        return (value, math.exp(min(value, 50.0))) if value is not None else (None, None)

    (lb, pb), (la, pa) = loss_and_ppl(before["val_loss"]), loss_and_ppl(after["val_loss"])
    evaluation = {"held-out SFT loss, base": lb, "held-out SFT loss, fine-tuned": la,
                  "held-out perplexity, base": pb, "held-out perplexity, fine-tuned": pa}
    data = {"records": stats["records"], **{f"skipped: {k}": v for k, v in stats["skipped_lines"].items()}}
    for split in ("train", "val"):
        data.update({f"{split} {k}": v for k, v in stats[split].items()})
    return {"Fine-tuning evaluation (held-out chat records)": evaluation, "Chat data": data, "Fine-tuning settings": settings}


def data_stats(manifest: dict) -> dict[str, Any]:
    """The chat dataset's counts, as finetune.json and the report show them."""
    return {
        "records": manifest["records"],
        "skipped_lines": manifest["skipped_lines"],
        "skipped_examples": manifest["skipped_examples"],
        **{split: {k: v for k, v in manifest["splits"][split].items() if k not in ("shards", "sequences")} for split in ("train", "val")},
    }


def finetune(cfg: FinetuneConfig, base: str, data: str, out: str, address: str | None = None):
    """Fine-tune `base` (a model dir: a path, or a URI each process copies locally) on `data` (a chat
    dataset dir, or chat JSONL records) into the run dir `out`; returns run_training's result."""
    from raylm.core.ray_cluster import init_ray
    from raylm.data.chat_dataset import shard_paths
    from raylm.training.pretrain import check_writable, run_home_of, run_training
    from raylm.training.report import write_report
    from raylm.training.run_home import send_run_files, work_dir

    home = run_home_of(out)
    check_writable(home)
    base_here = storage.local_dir(base)  # what the driver reads: tokenizer, config, the "before" evaluation
    init_ray(address)
    data_dir, manifest = chat_dataset_for_run(data, base_here, cfg.data.seq_len, cfg.sft, home, address)
    stats = data_stats(manifest)
    train = ParquetRows(shard_paths(data_dir, manifest, "train"))
    val = ParquetRows(shard_paths(data_dir, manifest, "val")) if manifest["splits"]["val"]["rows"] else None
    print(f"finetune: {stats['train']['rows']} train rows, {stats['val']['rows']} val rows from {data_dir} "
          f"({stats['train']['truncated'] + stats['val']['truncated']} truncated, {sum(stats['skipped_lines'].values())} bad lines skipped)")
    val_rows = first_rows(val, cfg.eval_max_rows) if val is not None else None
    before = evaluate(base_here, val_rows, cfg)
    result = run_training(
        train_config(cfg),
        train=train,
        val=val,
        tokenizer_dir=base,
        out=out,
        init_model_dir=base,
        kind="finetune",
        source={"base_model_dir": storage.join(base), "chat_data": storage.join(data), "chat_dataset_dir": storage.join(data_dir)},
        write_run_report=False,  # written below, with the evaluation and the samples
    )
    after = evaluate(result.local_model_dir, val_rows, cfg)
    run_dir = work_dir(home)
    summary = {"base": str(base), "data": str(data), "before": before, "after": after,
               "prompts": cfg.eval_prompts, "settings": finetune_settings(cfg), "data_stats": stats}
    write_json_atomic(run_dir / "finetune.json", summary)
    samples = [{"prompt": p, "base": b, "fine-tuned": a} for p, b, a in zip(cfg.eval_prompts, before["answers"], after["answers"])]
    write_report(run_dir, samples=samples, sections=report_sections(before, after, stats, summary["settings"]))
    send_run_files(home)
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"finetune: held-out loss {fmt(before['val_loss'])} -> {fmt(after['val_loss'])}; "
          f"model dir {result.model_dir}; report {storage.child(home, 'report.md')}")
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="raylm finetune", description="Chat SFT of a Llama-format model dir on the shared train loop.")
    recipes = ", ".join(name for name in recipe_names() if name.startswith("sft-"))
    parser.add_argument("--config", required=True, help=f"a recipe name ({recipes}) or a YAML path; the settings below and key=value override it")
    parser.add_argument("--base", required=True, help="the starting model dir (Hugging Face Llama format; its tokenizer is used): a path or an s3://, gs:// URI")
    parser.add_argument("--data", required=True, help="a chat dataset dir (`raylm prepare-chat --tokenizer BASE`), or chat records: "
                        "a JSONL file, dir or glob ({'messages': [...]} or {'prompt', 'response'})")
    parser.add_argument("--out", required=True, help="the run dir (checkpoints, metrics, report.md, model/)")
    parser.add_argument("--address", help="a Ray cluster to join (default: RAY_ADDRESS, else a local one)")
    add_config_flags(parser, FinetuneConfig, FLAG_SHORTCUTS, note="a default shown applies where the recipe does not set the key")
    return parse_command_line(parser, argv)


def finetune_config(path: str, base: str, overrides: list[str | tuple[str, Any]]) -> ConfigDraft:
    """A recipe + overrides, the `model` section taken from the base model dir's config.json, and
    data.seq_len fitted to the base's context. Build the FinetuneConfig with `.build()`.

    The architecture is the base's, so a recipe that sets `model.*` would only mislead: refused.
    data.seq_len is the recipe's row length, capped at the base's context (max_position_embeddings)
    unless the user set it; a user's data.seq_len past that context is refused.
    """
    from raylm.model.model_dir import read_model_config

    draft = draft_train_config(path, overrides, cls=FinetuneConfig)
    model_keys = sorted(key for key in draft.user_keys if key.split(".")[0] == "model") + ["model"] * ("model" in draft.tree)
    if model_keys:
        raise UserError(f"config key {model_keys[0]!r}: fine-tuning takes the model from --base's config.json; leave model.* out")
    model = read_model_config(base)  # refuses other architectures and RoPE kinds
    draft.tree["model"] = dataclasses.asdict(model)
    return fit_to_base_context(draft, model.max_seq_len, f"{base}/config.json")


def fit_to_base_context(draft: ConfigDraft, context: int, where: str) -> ConfigDraft:
    asked = draft.value("data.seq_len")
    if asked <= context:
        return draft
    if draft.user_set("data.seq_len"):
        raise UserError(
            f"data.seq_len={asked} asked for a base model whose context is {context} tokens ({where}: "
            f"max_position_embeddings); set data.seq_len={context} or less, or leave it out (the recipe's, capped at the base's context)"
        )
    draft.adapt("data.seq_len", context, "= the base model's context")
    return draft


def fit_to_chat_dataset(draft: ConfigDraft, data: str, base: str) -> None:
    """data.seq_len follows a chat dataset dir's rows unless the user set it (then they must agree)."""
    from raylm.data.chat_dataset import is_chat_dataset, read_chat_dataset

    if not is_chat_dataset(data):
        return
    seq_len = read_chat_dataset(data)["seq_len"]
    if draft.user_set("data.seq_len") or seq_len == draft.value("data.seq_len"):
        return  # a disagreement is named when the run checks the dir (sft_data.check_chat_dataset)
    context = draft.value("model.max_seq_len")
    if seq_len > context:
        raise UserError(f"{data} holds rows of seq_len {seq_len}, past the base model's context of {context} tokens "
                        f"({base}/config.json); rebuild it with `raylm prepare-chat --seq-len {context}` or less")
    draft.adapt("data.seq_len", seq_len, "from the chat dataset's rows")


def load_finetune_config(path: str, base: str, overrides: list[str | tuple[str, Any]]) -> FinetuneConfig:
    """`finetune_config(...).build()`: the validated FinetuneConfig."""
    return finetune_config(path, base, overrides).build()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = storage.local_dir(args.base)  # a model dir on object storage: copied to a local cache once
    draft = finetune_config(args.config, base, [*args.overrides, *config_values(args).items()])
    fit_to_chat_dataset(draft, args.data, base)
    cfg = draft.build()
    if draft.adapted:
        print(draft.adapted_line())
    finetune(cfg, args.base, args.data, args.out, args.address)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
