"""Benchmark of pretraining, each figure next to its baseline, in one run.

    python bench/train.py [--data DATASET_DIR] [--minutes 5] [--max-docs 1500] [--out DIR]

1. Throughput: tokens/s of a bare single-process PyTorch loop (the `tiny` model, the same global
   batch, torch AdamW, all cores) and of `raylm pretrain` (2 workers, ZeRO-2), steady state:
   the loop's per-step timing after the first 10 steps, start-up excluded. Target >= 0.9x.
2. Memory: per-rank bytes of parameters, gradients and Adam state under ZeRO 0-3 at 2 workers,
   counted from the DeepSpeed engines after one step, on every rank; the figure is the largest
   rank's (ranks can differ: a ZeRO-1/2 rank holds whole gradient buffers for every parameter
   that touches its partition). Target: <= 0.55x of stage 0 for each part the stage shards
   (1: Adam state, 2: + gradients, 3: + parameters).
3. Learning: val loss of `tiny` on the stdlib corpus at init and after `--minutes` of
   `raylm pretrain` on this machine. Target: >= 40% below the value at init.

Counting memory reads DeepSpeed internals (the ZeRO optimizers' partitioned gradient buffers and
fp32 partitions), so it lives here and not in the library.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

# ---- the dataset -----------------------------------------------------------------------------------


def ensure_dataset(data: str | None, work: Path, max_docs: int) -> Path:
    if data:
        return Path(data)
    from raylm.data.prepare import main as prepare_main

    out = work / "stdlib"
    if not (out / "manifest.json").is_file():
        assert prepare_main(["--source", "stdlib", "--out", str(out), "--max-docs", str(max_docs)]) == 0
    return out


def train_rows(dataset_dir: Path) -> np.ndarray:
    import pyarrow.parquet as pq

    from raylm.data.dataset_dir import shard_paths

    tables = [pq.read_table(p, columns=["input_ids"]) for p in shard_paths(dataset_dir, "train")]
    return np.concatenate([np.stack(t.column("input_ids").to_pylist()) for t in tables]).astype(np.int64)


# ---- 1. a bare PyTorch loop -----------------------------------------------------------------------


def bare_loop_tokens_per_s(cfg, rows: np.ndarray, global_batch: int, steps: int = 14, warmup: int = 4) -> float:
    """Single process, all cores: the same model, batch, AdamW and clipping as raylm's fp32 CPU path."""
    from raylm.model.transformer import Transformer
    from raylm.training.engine import param_groups
    from raylm.training.schedule import learning_rate

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(cfg.seed)
    model = Transformer(cfg.model).train()
    opt = torch.optim.AdamW(param_groups(model, cfg.optimizer.weight_decay), lr=cfg.optimizer.lr,
                            betas=(cfg.optimizer.beta1, cfg.optimizer.beta2), eps=cfg.optimizer.eps)
    times = []
    for step in range(steps):
        batch = torch.from_numpy(rows[(step * global_batch) % (len(rows) - global_batch):][:global_batch])
        start = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, cfg)
        loss = model(batch[:, :-1], targets=batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.deepspeed.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return global_batch * cfg.data.seq_len / statistics.median(times[warmup:])


# ---- 2. memory by ZeRO stage ----------------------------------------------------------------------


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one buffer count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None and t.numel():
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def flat(values) -> list:
    out = []
    for v in values:
        out.extend(v if isinstance(v, (list, tuple)) else [v])
    return out


def count_engine_bytes(loop_config: dict) -> None:
    """Ray Train worker: build the engine, take one step, count this rank's bytes, write them to a file."""
    import deepspeed
    import ray.train

    from raylm.core.config import from_dict
    from raylm.training.config import TrainConfig
    from raylm.training.deepspeed_config import build_ds_config
    from raylm.training.engine import build_model, param_groups

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    cfg = from_dict(TrainConfig, loop_config["config"])
    ds_config = build_ds_config(cfg, world, use_gpu=False)
    model = build_model(cfg.model, cfg.seed, None, False, zero3_ds_config=ds_config if cfg.deepspeed.zero_stage == 3 else None)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.1), config=ds_config,
                                           dist_init_required=False)
    ids = torch.randint(cfg.model.vocab_size, (cfg.data.micro_batch, cfg.data.seq_len + 1))
    engine.backward(engine(ids[:, :-1], targets=ids[:, 1:]))
    opt = engine.optimizer
    grads = storage_bytes([p.grad for p in engine.module.parameters()]
                          + flat(getattr(opt, "averaged_gradients", {}).values())
                          + [getattr(opt, "grad_partitions_flat_buffer", None)])
    engine.step()
    params = storage_bytes([getattr(p, "ds_tensor", p) for p in engine.module.parameters()])
    inner = getattr(opt, "optimizer", opt)
    adam = storage_bytes([t for state in inner.state.values() for t in state.values() if torch.is_tensor(t) and t.numel() > 1])
    master = storage_bytes(flat(getattr(opt, "single_partition_of_fp32_groups", [])) + flat(getattr(opt, "fp32_partitioned_groups_flat", [])))
    Path(loop_config["out"], f"rank{rank}.json").write_text(json.dumps({"params": params, "grads": grads, "adam": adam, "fp32_master": master}))


MEMORY_WORKERS = 2


def memory_by_stage(cfg, work: Path) -> dict[int, dict]:
    import ray.train
    from ray.train.torch import TorchTrainer

    from raylm.core.config import to_dict

    results = {}
    for stage in (0, 1, 2, 3):
        cfg.deepspeed.zero_stage = stage
        out = work / f"memory-zero{stage}"
        out.mkdir(parents=True, exist_ok=True)
        TorchTrainer(count_engine_bytes, train_loop_config={"config": to_dict(cfg), "out": str(out)},
                     scaling_config=ray.train.ScalingConfig(num_workers=MEMORY_WORKERS),
                     run_config=ray.train.RunConfig(name=f"memory-zero{stage}", storage_path=str(work / "ray"))).fit()
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(MEMORY_WORKERS)]
        results[stage] = {part: max(r[part] for r in ranks) for part in ranks[0]} | {"per_rank": ranks}
    return results


def print_memory(mem: dict[int, dict]) -> None:
    print("memory      bytes, largest rank      params      grads       adam   fp32 master   (grads by rank)")
    for stage, m in mem.items():
        by_rank = " / ".join(f"{r['grads']:,}" for r in m["per_rank"])
        print(f"            ZeRO-{stage}               {m['params']:>10,} {m['grads']:>10,} {m['adam']:>10,} {m['fp32_master']:>10,}   ({by_rank})")
    for stage, parts in ((1, ["adam"]), (2, ["adam", "grads"]), (3, ["adam", "grads", "params"])):
        ratios = ", ".join(f"{p} {mem[stage][p] / mem[0][p]:.2f}x" for p in parts)
        print(f"            ZeRO-{stage} vs ZeRO-0 (sharded parts): {ratios}  (target <= 0.55x)")


# ---- 3. raylm pretrain ----------------------------------------------------------------------------


def pretrain(dataset_dir: Path, out: Path, minutes: float, expected_steps: int) -> list[dict]:
    from raylm.training.pretrain import main

    main(["--config", "tiny", "--data", str(dataset_dir), "--out", str(out), "--num-workers", "2", "--zero-stage", "2",
          "max_steps=100000", f"max_time_s={minutes * 60}", f"schedule.total_steps={expected_steps}",
          "eval.at_start=true", "eval.every=100", "checkpoint.every=0", "logging.every=10"])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="a dataset dir (default: prepare the stdlib corpus into --out)")
    parser.add_argument("--minutes", type=float, default=5.0, help="training time of the learning figure")
    parser.add_argument("--max-docs", type=int, default=1500, help="stdlib documents to prepare when --data is not given")
    parser.add_argument("--out", default=None, help="work dir (default: a temp dir)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory-by-stage part")
    parser.add_argument("--memory-only", action="store_true", help="run only the memory-by-stage part")
    args = parser.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="raylm-bench-train-"))
    work.mkdir(parents=True, exist_ok=True)

    from raylm.core.ray_cluster import init_ray
    from raylm.training.config import global_batch, load_train_config

    init_ray()  # as `raylm pretrain` does: join RAY_ADDRESS or start a local cluster
    if args.memory_only:
        print_memory(memory_by_stage(load_train_config("tiny", ["data.micro_batch=2"]), work))
        return 0
    dataset_dir = ensure_dataset(args.data, work, args.max_docs)
    cfg = load_train_config("tiny")
    rows = train_rows(dataset_dir)
    batch = global_batch(cfg, 2)

    print("\n== 1. throughput (tiny, fp32, CPU) ==", flush=True)
    bare = bare_loop_tokens_per_s(cfg, rows, batch)
    print(f"bare PyTorch loop, 1 process, {os.cpu_count()} threads: {bare:,.0f} tokens/s", flush=True)

    print("\n== 2. per-rank bytes by ZeRO stage (tiny, 2 workers, fp32) ==", flush=True)
    mem = {} if args.no_memory else memory_by_stage(load_train_config("tiny", ["data.micro_batch=2"]), work)

    print(f"\n== 3. raylm pretrain tiny, 2 workers, ZeRO-2, {args.minutes:g} minutes ==", flush=True)
    # The cosine curve spans the steps the bare loop's speed predicts for the time budget.
    expected_steps = max(50, int(args.minutes * 60 * bare / (batch * cfg.data.seq_len)))
    metrics = pretrain(dataset_dir, work / "run", args.minutes, expected_steps)
    steady = [r["tokens_per_s"] for r in metrics if r.get("tokens_per_s") and r["step"] > 10]
    ours = statistics.median(steady)
    # Measured again right after: on a shared machine the load changes, and the ratio should
    # compare like with like.
    bare_after = bare_loop_tokens_per_s(cfg, rows, batch)
    print(f"bare PyTorch loop again, after the run: {bare_after:,.0f} tokens/s", flush=True)
    bare = statistics.mean([bare, bare_after])
    val = [(r["step"], r["val_loss"]) for r in metrics if "val_loss" in r]
    (s0, v0), (s1, v1) = val[0], val[-1]

    print("\n================ bench/train.py ================")
    print(f"throughput  bare PyTorch loop        {bare:>10,.0f} tokens/s (mean of before and after)")
    print(f"            raylm pretrain (2w ZeRO-2) {ours:>8,.0f} tokens/s   ratio {ours / bare:.2f}x  (target >= 0.9x)")
    if mem:
        print_memory(mem)
    print(f"learning    val loss at init (step {s0}) {v0:.3f} -> after {args.minutes:g} min (step {s1}) {v1:.3f}: "
          f"{100 * (1 - v1 / v0):.0f}% lower  (target >= 40%)")
    summary = {"bare_tokens_per_s": bare, "bare_after_tokens_per_s": bare_after, "raylm_tokens_per_s": ours, "ratio": ours / bare, "memory": mem,
               "val_loss_init": v0, "val_loss_final": v1, "final_step": s1, "minutes": args.minutes}
    (work / "bench-train.json").write_text(json.dumps(summary, indent=2))
    print(f"(details: {work / 'bench-train.json'}, run dir {work / 'run'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
