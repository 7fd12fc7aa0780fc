"""`raylm pretrain`: train the model on a dataset dir with Ray Train + DeepSpeed; and `run_training`,
the driver side of the one train loop that fine-tuning calls too.

    raylm pretrain --config tiny --data DATASET_DIR --out RUN_DIR [--num-workers N] [--zero-stage S]
                   [--max-steps N] [--address RAY_ADDRESS] [key=value ...]

RUN_DIR is Ray Train's run (RunConfig(name=basename, storage_path=parent)); running the same
command again resumes from its latest checkpoint. RUN_DIR must be on storage every worker can
reach: a local disk on one machine; on a cluster, object storage (`s3://`, `gs://`; what goes
where is in training/run_home.py) or a filesystem every node mounts. It ends up holding:
    checkpoint_step*/   resumable DeepSpeed checkpoints (training/checkpoint.py), the last `keep`
    model/              the trained model as a Hugging Face Llama-format dir
    metrics.jsonl       one JSON object per logged step
    run_settings.json   the settings the last command asked for; a rerun keeps the run's global
                        batch and schedule length (training/run_settings.py) and prints what changed
    raylm.log           resumes, checkpoints found partial or broken, workers that died: one line each
    worker-failures.log every rank's error in full, each time the worker group failed
    run.json            the resolved config, kind, data, summary figures (written last)
    report.md, plots/   the run report (training/report.py)
    wandb/              the W&B run files (offline runs sync later with `wandb sync`)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from raylm.core import storage
from raylm.core.cli_args import add_config_flags, config_values, parse_command_line
from raylm.core.config import to_dict
from raylm.core.entry import run_main
from raylm.core.errors import UserError
from raylm.core.files import write_json_atomic
from raylm.training import run_home
from raylm.training.config import (
    FLAG_SHORTCUTS,
    ConfigDraft,
    TrainConfig,
    draft_train_config,
    fit_to_dataset,
    global_batch,
    recipe_names,
)
from raylm.training.deepspeed_config import resolve_precision
from raylm.training.row_source import ParquetRows, first_rows
from raylm.training.run_log import say
from raylm.training.run_settings import keep_run_settings, remember_run_settings
from raylm.training.tracking import METRICS_FILE

RUN_INFO_FILE = "run.json"


@dataclass
class TrainResult:
    run_dir: Path  # this machine's copy of the run dir's files (the run dir itself when local; run_home.py)
    home: str | Path  # the run dir as given: a local path, or a URI on object storage
    model_dir: str | Path  # HOME/model, the exported Hugging Face model dir
    local_model_dir: Path  # the same, on this machine (copied here when the home is a URI)
    final_train_loss: float | None  # the last logged train loss
    final_val_loss: float | None  # the last val loss (None without a val split)
    metrics: list[dict] = field(default_factory=list)  # metrics.jsonl, one dict per logged step
    summary: dict[str, Any] = field(default_factory=dict)  # steps, tokens, seconds, tokens/s


def resolve_use_gpu(setting: bool | str) -> bool:
    import ray

    if setting == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(setting)


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(metrics: list[dict]) -> dict[str, Any]:
    train = [m for m in metrics if m.get("loss") is not None]
    val = [m for m in metrics if m.get("val_loss") is not None]
    speeds = [m["tokens_per_s"] for m in metrics[1:] if m.get("tokens_per_s")]  # the first step includes warm-up
    last = metrics[-1] if metrics else {}
    return {
        "steps": last.get("step", 0),
        "tokens": last.get("tokens"),
        "seconds": last.get("elapsed_s"),
        "final_train_loss": train[-1]["loss"] if train else None,
        "first_train_loss": train[0]["loss"] if train else None,
        "final_val_loss": val[-1]["val_loss"] if val else None,
        "first_val_loss": val[0]["val_loss"] if val else None,
        "tokens_per_s": sum(speeds) / len(speeds) if speeds else None,
    }


def write_run_info(run_dir: Path, info: dict) -> None:
    write_json_atomic(run_dir / RUN_INFO_FILE, info)


def check_rows(name: str, count: int, needed: int, what: str) -> None:
    if count < needed:
        raise UserError(f"{name} split has {count} rows; {what} needs at least {needed}")


def fixed_eval_rows(val, rows: int) -> dict[str, np.ndarray] | None:
    """The eval set: the val split's first `rows` rows in file order (0 = all of them), read once here
    and shipped to the workers, which score every row once whatever their number
    (data_order.eval_micro_batches)."""
    return first_rows(val, rows)


def quiet_console() -> None:
    """Ray settings that keep a training run's console to one line per event (issue 12).

    Call before the trainer is built.
    """
    # Ray Train V2 patches `print` in its workers so that a print goes to stdout *and* to the root
    # logger, whose handler writes to stderr; Ray forwards both streams, so every step line reached
    # the console twice. Ray Train passes this variable from the driver's environment on to its
    # controller and workers when fit() starts them. A user who sets it keeps their value.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")


def run_training(
    cfg: TrainConfig,
    *,
    train,
    val=None,
    tokenizer_dir: str,
    out: str,
    init_model_dir: str | None = None,
    kind: str = "pretrain",
    source: dict | None = None,
    write_run_report: bool = True,
) -> TrainResult:
    """Train with Ray Train + DeepSpeed on `train`, a row source (training/row_source.py: a dataset
    dir's split or rows in memory; rows of input_ids [+ loss_mask, segment_ids], seq_len+1 long).

    Each worker reads its own rows of `train` (training/data_order.py); the first eval.rows rows of
    `val` are read here and shipped to them. `init_model_dir` starts from a HF Llama-format model
    dir's weights; its config replaces cfg.model. `source` is recorded in run.json (e.g. the
    dataset dir or the base model). Ray must be initialised.
    """
    import ray.train
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raylm.training.engine import use_own_torch_extensions_dir
    from raylm.training.failures import FailureReporter, run_failed
    from raylm.training.loop import train_loop_per_worker
    from raylm.training.stop_request import StopOnSignal

    home = run_home_of(out)
    if init_model_dir:
        from raylm.model.model_dir import read_model_config

        cfg.model = read_model_config(storage.local_dir(init_model_dir))
        if cfg.data.seq_len > cfg.model.max_seq_len:
            raise UserError(f"data.seq_len ({cfg.data.seq_len}) exceeds the base model's max_position_embeddings ({cfg.model.max_seq_len})")
    quiet_console()
    use_own_torch_extensions_dir()  # DeepSpeed's compiled ops: this venv's own cache (training/engine.py)
    use_gpu = resolve_use_gpu(cfg.scaling.use_gpu)
    resolve_precision(cfg.deepspeed.precision, use_gpu)
    world = cfg.scaling.num_workers
    check_writable(home)
    run_dir = run_home.fetch_run_files(home)  # this machine's copy: what an earlier run said and measured
    asked = to_dict(cfg)
    for line in keep_run_settings(cfg, home, world):  # a rerun keeps the run's global batch and schedule
        say(run_dir, line)
    check_rows("the train", train.num_rows, global_batch(cfg, world), f"a global batch of {world} workers")
    eval_rows = fixed_eval_rows(val, cfg.eval.rows) if val is not None else None

    resources = {"CPU": cfg.scaling.cpus_per_worker, **cfg.scaling.resources_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    remember_run_settings(run_dir, asked, cfg, world)
    trainer = trainer_keeping_our_ctrl_c(TorchTrainer)(
        train_loop_per_worker,
        train_loop_config={
            "config": to_dict(cfg), "run_dir": str(home), "tokenizer_dir": storage.join(tokenizer_dir),
            "init_model_dir": storage.join(init_model_dir) if init_model_dir else None,  # a URI: each worker copies it
            "use_gpu": use_gpu, "kind": kind, "eval_rows": eval_rows, "train_source": train,
        },
        scaling_config=ScalingConfig(num_workers=world, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=storage.name_of(home),
            storage_path=storage.parent_of(home),
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
            # No CheckpointConfig: the loop keeps its checkpoints itself (training/checkpoint_store.py).
            callbacks=[FailureReporter(str(home), str(run_dir), cfg.scaling.max_failures)],  # a dead worker is one line
        ),
    )
    started = time.time()
    try:
        with StopOnSignal(home, cfg.checkpoint.stop_grace_s) as stop:  # SIGTERM, Ctrl-C: a checkpoint, then stop
            try:
                trainer.fit()
            except KeyboardInterrupt:
                raise stop.stopped_at_once() from None
            except ray.train.TrainingFailedError as err:  # restarts spent (each failure said in one line already)
                raise run_failed(run_dir, err) from None
        stop.outcome()
    finally:  # finished, stopped or failed: the logs and metrics go home
        run_home.fetch_metrics(home)
        run_home.send_run_files(home)
    metrics = read_metrics(run_dir)
    summary = summarize(metrics) | {"driver_seconds": round(time.time() - started, 1)}
    write_run_info(run_dir, {
        "kind": kind,
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": source or {},
        "init_model_dir": init_model_dir,
        "num_workers": world,
        "use_gpu": use_gpu,
        "precision": resolve_precision(cfg.deepspeed.precision, use_gpu),
        "global_batch": global_batch(cfg, world),
        "summary": summary,
        "config": to_dict(cfg),
    })
    local_model_dir = run_home.fetch_model(home)
    if write_run_report:
        from raylm.training.report import write_report

        write_report(run_dir)
    run_home.send_run_files(home)
    return TrainResult(
        run_dir=run_dir,
        home=home,
        model_dir=storage.child(home, run_home.MODEL_SUBDIR),
        local_model_dir=local_model_dir,
        final_train_loss=summary["final_train_loss"],
        final_val_loss=summary["final_val_loss"],
        metrics=metrics,
        summary=summary,
    )


def trainer_keeping_our_ctrl_c(trainer_cls: type) -> type:
    """`trainer_cls` without Ray Train's own Ctrl-C handler, which `fit()` would install over ours and
    which aborts the workers without a checkpoint; ours (training/stop_request.py) asks for one at the
    next step. The hook is Ray-private: tests/test_pretrain.py's Ctrl-C test fails if a Ray upgrade
    renames it."""

    class Trainer(trainer_cls):
        def _register_sigint_handler(self, controller) -> None:
            pass

    return Trainer


def run_home_of(out: str) -> str | Path:
    """--out as the run's home: a URI as given (without a trailing slash), a local path made absolute."""
    if not storage.is_uri(out):
        return Path(out).expanduser().resolve()
    home = str(out).rstrip("/")
    if "/" not in home.split("://", 1)[1]:
        raise UserError(f"--out {out!r}: name a dir inside the bucket (e.g. {home}/runs/tiny), not the bucket itself")
    return home


def check_writable(out: str | Path) -> None:
    """A run dir that cannot be written is the user's to fix, said before any worker starts."""
    home = run_home_of(out)
    probe = storage.join(home, f".write-probe-{os.getpid()}")
    try:
        storage.make_dir(home)
        storage.write_bytes(probe, b"")
        storage.remove(probe)
    except OSError as err:
        raise UserError(f"cannot write the run dir {home}: {err.strerror or err}; choose a writable --out") from None
    except UserError as err:
        raise UserError(f"cannot write the run dir {home}: {str(err).split(': ', 1)[-1]}; choose a writable --out") from None


# ---- the dataset dir -----------------------------------------------------------------------------


def dataset_splits(data_dir: str) -> tuple[dict, list[str], list[str]]:
    """(manifest, train shard paths, val shard paths) of a dataset dir, checked by the data stage's reader."""
    from raylm.data.dataset_dir import read_dataset_manifest, shard_paths

    manifest = read_dataset_manifest(data_dir)
    return manifest, shard_paths(data_dir, "train"), shard_paths(data_dir, "val")


def pretrain_config(config: str, overrides: list, data_dir: str) -> ConfigDraft:
    """The recipe + the user's settings, fitted to the dataset dir (its manifest's seq_len and vocab_size).

    Build the TrainConfig with `.build()`; `.adapted_line()` says what was fitted.
    """
    from raylm.data.dataset_dir import read_dataset_manifest

    draft = draft_train_config(config, overrides)  # a wrong recipe is named before a wrong dataset dir
    manifest = read_dataset_manifest(data_dir)
    return fit_to_dataset(draft, seq_len=manifest["seq_len"], vocab_size=manifest["vocab_size"], where=f"{data_dir}/manifest.json")


def summary_line(s: dict, model_dir) -> str:
    """The run's last console line. Two times: the training time (over every attempt, from the
    metrics) and this command's wall time, which also holds start-up, restarts after a dead worker
    and the export; a run that restarted must not look as quick as one that did not."""
    val_text = f", val loss {s['first_val_loss']:.3f} -> {s['final_val_loss']:.3f}" if s["final_val_loss"] is not None else ""
    return (
        f"pretrained {s['steps']} steps ({s['tokens'] or 0:,} tokens) in {s['seconds'] or 0:.0f}s of training, "
        f"{s['driver_seconds']:.0f}s wall for this command: train loss "
        f"{s['first_train_loss']:.3f} -> {s['final_train_loss']:.3f}{val_text}; model dir {model_dir}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="raylm pretrain", description="Pretrain on a dataset dir with Ray Train + DeepSpeed ZeRO.")
    recipes = ", ".join(name for name in recipe_names() if not name.startswith("sft-"))
    parser.add_argument("--config", required=True, help=f"a recipe name ({recipes}) or a YAML path; the settings below and key=value override it")
    parser.add_argument("--data", required=True, help="dataset dir written by `raylm prepare` (a path, or an s3://, gs:// URI)")
    parser.add_argument("--out", required=True, help="run dir (a path, or an s3://, gs:// URI); re-running the command resumes it")
    parser.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a new local cluster)")
    add_config_flags(parser, TrainConfig, FLAG_SHORTCUTS, note="a default shown applies where the recipe does not set the key")
    return parse_command_line(parser, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    draft = pretrain_config(args.config, [*args.overrides, *config_values(args).items()], args.data)
    cfg = draft.build()
    if draft.adapted:
        print(draft.adapted_line())
    manifest, train_paths, val_paths = dataset_splits(args.data)
    check_writable(args.out)  # before a cluster starts

    from raylm.core.ray_cluster import init_ray
    from raylm.data.dataset_dir import tokenizer_dir

    init_ray(args.address)
    result = run_training(
        cfg, train=ParquetRows(train_paths), val=ParquetRows(val_paths) if val_paths else None,
        tokenizer_dir=tokenizer_dir(args.data), out=args.out,
        source={"dataset_dir": storage.join(args.data), "manifest_source": manifest.get("source")},
    )
    print(summary_line(result.summary, result.model_dir))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
