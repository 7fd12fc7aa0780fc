"""Benchmark of pretraining, each figure next to its baseline, in one run.

    python bench/train.py [--data DATASET_DIR] [--minutes 5] [--max-docs 1500] [--out DIR] [--peer]
    python bench/train.py --peer-only [--threads N]      # parts 4 and 5 only (about 3 minutes)

1. Throughput: tokens/s of a bare single-process PyTorch loop (the `tiny` model, the same global
   batch, torch AdamW, all cores) and of `raylm pretrain` (2 workers, ZeRO-2), steady state:
   the loop's per-step timing after the first 10 steps, start-up excluded. Target >= 0.9x.
2. Memory: per-rank bytes of parameters, gradients and Adam state under ZeRO 0-3 at 2 workers,
   counted from the DeepSpeed engines after one step, on every rank; the figure is the largest
   rank's (ranks can differ: a ZeRO-1/2 rank holds whole gradient buffers for every parameter
   that touches its partition). Target: <= 0.55x of stage 0 for each part the stage shards
   (1: Adam state, 2: + gradients, 3: + parameters).
   Then ZeRO-3's export: each rank's RSS rise while the full fp32 weights are gathered, raylm's way
   (one module at a time, only rank 0 keeps a copy) next to gathering the whole model on every rank,
   for a 30M-parameter model (the tiny recipe widened) on 2 workers.
3. Learning: val loss of `tiny` on the stdlib corpus at init and after `--minutes` of
   `raylm pretrain` on this machine. Target: >= 40% below the value at init.
4. One worker against Hugging Face `Trainer` (`--peer`, or alone with `--peer-only`): the same
   model (`tiny`, as a LlamaForCausalLM), rows, global batch, AdamW and clipping, fp32, at the same
   torch thread count (raylm's worker gets `scaling.cpus_per_worker` = that many CPUs, and Ray sets
   its OMP_NUM_THREADS from them). Both are timed by the wall clock between step ends, steps 10 to
   30 of 40, so data loading and logging count for both. Target >= 0.95x. Then command to first
   step, warm (DeepSpeed's ops already built): `raylm pretrain --config debug` on 1 worker against
   a script that builds the same debug model and starts `Trainer`, each timed from process start
   to the end of its first step. Target <= 15 s.
5. SFT real-token share: tokens of conversations / tokens processed, for the embedded chat set
   encoded with a real tokenizer (the one `raylm prepare` trained) at sft-tiny's seq_len, packed
   and one conversation per row. Target >= 0.9 packed.
6. Ingest (`--ingest`, or alone with `--ingest-only`): one epoch of the train split at 2 workers,
   the `tiny` global batch. raylm's data order, each rank reading its own row groups: rows read by
   all ranks per row trained, and each rank's seconds of reading and shuffling. Beside it the
   previous design, in which every worker streamed the whole split through Ray Data
   (`read_parquet`, order preserved) and kept its slice of each global batch, timed the same way.
   Target: 1.0 rows read per row trained (the previous design: one per worker).

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


# ---- 2b. ZeRO-3 export memory ---------------------------------------------------------------------

EXPORT_MODEL = ["model.dim=512", "model.n_layers=8", "model.n_heads=8", "model.n_kv_heads=8", "model.ffn_dim=1536"]


def peak_rss_during(fn) -> tuple[object, int]:
    """fn()'s result and the most this process's RSS rose above its level at the call, sampled every 2 ms."""
    import threading

    import psutil

    proc, stop = psutil.Process(), threading.Event()
    base = peak = proc.memory_info().rss

    def sample():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        out = fn()
    finally:
        stop.set()
        thread.join()
    return out, max(peak, proc.memory_info().rss) - base


def export_memory_worker(loop_config: dict) -> None:
    """Ray Train worker: a ZeRO-3 engine, then each rank's RSS rise while exporting the full weights,
    raylm's way (one module at a time, rank 0 keeps them) and gathering the whole model on every rank."""
    import gc

    import deepspeed
    import ray.train

    from raylm.core.config import from_dict
    from raylm.training.checkpoint import full_state_dict
    from raylm.training.config import TrainConfig
    from raylm.training.engine import init_engine

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    cfg = from_dict(TrainConfig, loop_config["config"])
    engine = init_engine(cfg, world, False, None, False)
    module = engine.module

    def whole_model_on_every_rank():
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {name: p.detach().to("cpu", torch.float32).clone() for name, p in module.state_dict().items()}

    ours, ours_peak = peak_rss_during(lambda: full_state_dict(engine, 3, rank))
    kept = sum(t.numel() * t.element_size() for t in ours.values())
    del ours
    gc.collect()
    whole, whole_peak = peak_rss_during(whole_model_on_every_rank)
    model_bytes = sum(t.numel() * t.element_size() for t in whole.values())
    Path(loop_config["out"], f"export-rank{rank}.json").write_text(json.dumps(
        {"raylm_peak": ours_peak, "raylm_kept": kept, "gather_all_peak": whole_peak, "model_bytes": model_bytes}))


def export_memory(work: Path) -> list[dict]:
    import ray.train
    from ray.train.torch import TorchTrainer

    from raylm.core.config import to_dict
    from raylm.training.config import load_train_config

    cfg = load_train_config("tiny", ["deepspeed.zero_stage=3", *EXPORT_MODEL])
    out = work / "export-memory"
    out.mkdir(parents=True, exist_ok=True)
    TorchTrainer(export_memory_worker, train_loop_config={"config": to_dict(cfg), "out": str(out)},
                 scaling_config=ray.train.ScalingConfig(num_workers=MEMORY_WORKERS),
                 run_config=ray.train.RunConfig(name="export-memory", storage_path=str(work / "ray"))).fit()
    return [json.loads((out / f"export-rank{r}.json").read_text()) for r in range(MEMORY_WORKERS)]


def print_export_memory(ranks: list[dict]) -> None:
    mb = 2**20
    print(f"ZeRO-3 export, {MEMORY_WORKERS} workers, a {ranks[0]['model_bytes'] / mb:,.0f} MB fp32 model: RSS rise per rank while exporting")
    for r, m in enumerate(ranks):
        print(f"            rank {r}: whole model gathered on every rank {m['gather_all_peak'] / mb:>7,.0f} MB   "
              f"raylm (module by module, rank 0 keeps) {m['raylm_peak'] / mb:>7,.0f} MB   ratio {m['raylm_peak'] / max(m['gather_all_peak'], 1):.2f}x")


# ---- 3. raylm pretrain ----------------------------------------------------------------------------


def pretrain(dataset_dir: Path, out: Path, minutes: float, expected_steps: int) -> list[dict]:
    from raylm.training.pretrain import main

    main(["--config", "tiny", "--data", str(dataset_dir), "--out", str(out), "--num-workers", "2", "--zero-stage", "2",
          "max_steps=100000", f"max_time_s={minutes * 60}", f"schedule.total_steps={expected_steps}",
          "eval.at_start=true", "eval.every=100", "checkpoint.every=0", "logging.every=10"])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---- 4. one worker against Hugging Face Trainer ---------------------------------------------------

STEP_MARK = "RAYLM-BENCH-STEP "


def hf_peer(config: str, dataset_dir: str, threads: int, steps: int) -> None:
    """Run as a script (`--hf-peer`): HF Trainer on the recipe's model fitted to the dataset; prints
    STEP_MARK <step> <seconds since the process started> at the end of every step."""
    start = time.time()
    torch.set_num_threads(threads)
    import datasets
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from raylm.model.model_dir import hf_config
    from raylm.training.config import global_batch
    from raylm.training.pretrain import pretrain_config

    cfg = pretrain_config(config, [], dataset_dir).build()
    rows = train_rows(Path(dataset_dir))
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(LlamaConfig(**hf_config(cfg.model, "float32", {}))).train()
    model.config._attn_implementation = "sdpa"
    # Rows hold seq_len + 1 tokens; HF shifts the labels itself, so both models predict seq_len tokens per row.
    data = datasets.Dataset.from_dict({"input_ids": rows.tolist(), "labels": rows.tolist()}).with_format("torch")
    opt = cfg.optimizer

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            print(f"{STEP_MARK}{state.global_step} {time.time() - start:.3f}", flush=True)

    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="raylm-bench-hf-"), max_steps=steps, per_device_train_batch_size=cfg.data.micro_batch,
        gradient_accumulation_steps=global_batch(cfg, 1) // cfg.data.micro_batch, learning_rate=opt.lr,
        weight_decay=opt.weight_decay, adam_beta1=opt.beta1, adam_beta2=opt.beta2, adam_epsilon=opt.eps,
        max_grad_norm=cfg.deepspeed.grad_clip, lr_scheduler_type="cosine", warmup_steps=cfg.schedule.warmup_steps,
        logging_steps=10**9, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=True, seed=cfg.seed,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=data, callbacks=[StepClock()]).train()


def step_times(command: list[str], pattern: str, env: dict | None = None) -> dict[int, float]:
    """Run `command`; seconds from its start to each line matching `pattern` (group 1: the step)."""
    import re
    import subprocess

    start, times = time.time(), {}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        for line in proc.stdout:
            match = re.search(pattern, line)
            if match:
                times.setdefault(int(match.group(1)), time.time() - start)
        if proc.wait() != 0:
            raise RuntimeError(f"{' '.join(command[:4])} ... exited with {proc.returncode}")
    return times


def rate(times: dict[int, float], tokens_per_step: int, first: int, last: int) -> float:
    return (last - first) * tokens_per_step / (times[last] - times[first])


def peer_command(config: str, dataset_dir: Path, threads: int, steps: int) -> list[str]:
    return [sys.executable, __file__, "--hf-peer", config, str(dataset_dir), str(threads), str(steps)]


# raylm logs every 10th step (and the first and last): a console line per step goes through Ray's
# log forwarding, which costs CPU on a small machine; both sides are timed between step 10 and the last.
def raylm_command(config: str, dataset_dir: Path, out: Path, threads: int, steps: int) -> list[str]:
    return [sys.executable, "-m", "raylm.cli", "pretrain", "--config", config, "--data", str(dataset_dir), "--out", str(out),
            "--num-workers", "1", "--zero-stage", "0", "--max-steps", str(steps), f"scaling.cpus_per_worker={threads}",
            "eval.every=0", "eval.at_start=false", "checkpoint.every=0", "logging.every=10"]  # fmt: skip


RAYLM_STEP = r"\[raylm\] step (\d+)/"
PEER_STEP = STEP_MARK + r"(\d+) "


def one_worker_vs_hf(dataset_dir: Path, work: Path, threads: int, steps: int = 40) -> dict:
    """Throughput of 1 raylm worker and of HF Trainer, then command-to-first-step of both on `debug`."""
    from raylm.training.config import global_batch
    from raylm.training.pretrain import pretrain_config

    env = os.environ | {"RAY_ADDRESS": ""}  # each raylm command starts (and ends) its own local cluster
    tokens = {name: global_batch(cfg, 1) * cfg.data.seq_len
              for name, cfg in ((c, pretrain_config(c, [], str(dataset_dir)).build()) for c in ("tiny", "debug"))}
    result = {"threads": threads}
    ours = step_times(raylm_command("tiny", dataset_dir, work / "one-worker", threads, steps), RAYLM_STEP, env)
    peer = step_times(peer_command("tiny", dataset_dir, threads, steps), PEER_STEP)
    # Steps 10 to steps-10: past the warm-up, and short of raylm's last step, which also runs the
    # final eval, checkpoint and export (HF's last step end comes before its own wrap-up).
    window = (10, steps - 10)
    result |= {"raylm_tokens_per_s": rate(ours, tokens["tiny"], *window), "hf_tokens_per_s": rate(peer, tokens["tiny"], *window)}
    ours = step_times(raylm_command("debug", dataset_dir, work / "first-step", threads, 2), RAYLM_STEP, env)
    peer = step_times(peer_command("debug", dataset_dir, threads, 2), PEER_STEP)
    return result | {"raylm_first_step_s": ours[1], "hf_first_step_s": peer[1], "one_worker_model_dir": str(work / "one-worker" / "model")}


def print_one_worker(r: dict) -> None:
    print(f"1 worker    HF Trainer ({r['threads']} threads)     {r['hf_tokens_per_s']:>10,.0f} tokens/s")
    print(f"            raylm pretrain (1w, {r['threads']} CPUs)  {r['raylm_tokens_per_s']:>8,.0f} tokens/s   "
          f"ratio {r['raylm_tokens_per_s'] / r['hf_tokens_per_s']:.2f}x  (target >= 0.95x)")
    print(f"first step  HF Trainer script         {r['hf_first_step_s']:>10.1f} s from process start (debug model)")
    print(f"            raylm pretrain --config debug {r['raylm_first_step_s']:>6.1f} s   "
          f"ratio {r['raylm_first_step_s'] / r['hf_first_step_s']:.2f}x  (target <= 15 s)")


# ---- 6. ingest: what each worker reads -----------------------------------------------------------


def ingest(dataset_dir: Path, world: int = 2) -> dict:
    """One epoch's reading at `world` workers: raylm's data order against every worker reading the whole split."""
    import ray.data

    from raylm.data.dataset_dir import shard_paths
    from raylm.training.config import global_batch, load_train_config
    from raylm.training.data_order import epoch_batches
    from raylm.training.row_source import ParquetRows

    cfg = load_train_config("tiny")
    batch = global_batch(cfg, world)
    paths = shard_paths(dataset_dir, "train")
    source = ParquetRows(paths)
    steps = source.num_rows // batch
    ours = {"rows_read": 0, "seconds": []}
    for rank in range(world):
        readers: list = []
        start = time.perf_counter()
        batches = epoch_batches(source, cfg.data.shuffle_window, cfg.data.shuffle_seed, batch, 0, 0, rank, world, readers)
        for _ in range(steps):
            next(batches)
        ours["seconds"].append(time.perf_counter() - start)
        ours["rows_read"] += sum(r.rows_read for r in readers)
    ray.data.DataContext.get_current().use_datasource_v2 = False
    before = {"rows_read": 0, "seconds": []}
    for _ in range(world):  # each worker streamed every row, in file order, and shuffled windows of them
        start = time.perf_counter()
        dataset = ray.data.read_parquet(paths).select_columns(["input_ids"])
        dataset.context.execution_options.preserve_order = True
        for part in dataset.iter_batches(batch_size=cfg.data.shuffle_window, batch_format="numpy"):
            rows = np.stack(list(part["input_ids"]))
            rows = rows[np.random.default_rng(0).permutation(len(rows))]
            before["rows_read"] += len(rows)
        before["seconds"].append(time.perf_counter() - start)
    trained = steps * batch
    return {"world": world, "rows": source.num_rows, "rows_trained": trained,
            "ours_read_per_trained": ours["rows_read"] / trained, "before_read_per_trained": before["rows_read"] / trained,
            "ours_seconds": ours["seconds"], "before_seconds": before["seconds"]}


def print_ingest(r: dict) -> None:
    print(f"ingest      {r['world']} workers, one epoch ({r['rows_trained']:,} of {r['rows']:,} rows trained)")
    print(f"            rows read per row trained: previous {r['before_read_per_trained']:.2f}, "
          f"raylm {r['ours_read_per_trained']:.3f}  (target 1.0)")
    print(f"            reading + shuffling per worker: previous {max(r['before_seconds']):.2f} s, "
          f"raylm {max(r['ours_seconds']):.2f} s   ratio {max(r['ours_seconds']) / max(r['before_seconds']):.3f}x "
          "(the previous time is mostly Ray Data starting a read each epoch)")


# ---- 5. SFT real-token share ----------------------------------------------------------------------


def sft_token_share(model_dir: str, work: Path) -> dict:
    """Real tokens / processed tokens of the embedded chat set at sft-tiny's seq_len, packed and not."""
    from raylm.core.config import read_yaml
    from raylm.data.chat import read_chat_jsonl
    from raylm.data.chat_corpus import build_chat_records, write_jsonl_atomically
    from raylm.data.chat_rows import encode_rows, load_base_tokenizer
    from raylm.training.config import recipe_path

    path = work / "chat.jsonl"
    write_jsonl_atomically(build_chat_records(), path)
    records, _ = read_chat_jsonl(str(path))
    tokenizer, pad_id = load_base_tokenizer(model_dir)
    seq_len = read_yaml(recipe_path("sft-tiny"))["data"]["seq_len"]
    shares = {}
    for pack in (True, False):
        counts = encode_rows(records, tokenizer, seq_len, pad_id, pack=pack).counts
        shares["packed" if pack else "one per row"] = {
            "rows": counts["rows"], "real_tokens": counts["tokens"], "processed": counts["rows"] * (seq_len + 1),
            "share": counts["tokens"] / (counts["rows"] * (seq_len + 1))}
    return {"seq_len": seq_len, "conversations": len(records), **shares}


def print_sft_share(r: dict) -> None:
    unpacked, packed = r["one per row"], r["packed"]
    print(f"SFT rows    one conversation per row  {unpacked['share']:>10.3f} real-token share ({unpacked['rows']:,} rows "
          f"of {r['seq_len'] + 1}, {r['conversations']:,} conversations)")
    print(f"            packed                    {packed['share']:>10.3f} ({packed['rows']:,} rows)   "
          f"ratio {packed['share'] / unpacked['share']:.2f}x  (target >= 0.9 packed)")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--hf-peer":
        config, dataset_dir, threads, steps = sys.argv[2:6]
        hf_peer(config, dataset_dir, int(threads), int(steps))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="a dataset dir (default: prepare the stdlib corpus into --out)")
    parser.add_argument("--minutes", type=float, default=5.0, help="training time of the learning figure")
    parser.add_argument("--max-docs", type=int, default=1500, help="stdlib documents to prepare when --data is not given")
    parser.add_argument("--out", default=None, help="work dir (default: a temp dir)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory-by-stage part")
    parser.add_argument("--memory-only", action="store_true", help="run only the memory-by-stage part")
    parser.add_argument("--peer", action="store_true", help="also run part 4 (1 worker vs HF Trainer) and 5 (SFT token share)")
    parser.add_argument("--peer-only", action="store_true", help="run only parts 4 and 5")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of part 4 (both sides)")
    parser.add_argument("--ingest", action="store_true", help="also run part 6 (what each worker reads)")
    parser.add_argument("--ingest-only", action="store_true", help="run only part 6")
    args = parser.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="raylm-bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.peer_only:
        dataset_dir = ensure_dataset(args.data, work, args.max_docs)
        print(f"\n== 4. one worker vs Hugging Face Trainer, {args.threads} threads ==", flush=True)
        one = one_worker_vs_hf(dataset_dir, work, args.threads)
        share = sft_token_share(one["one_worker_model_dir"], work)
        print("\n================ bench/train.py (parts 4, 5) ================")
        print_one_worker(one)
        print_sft_share(share)
        (work / "bench-train-peer.json").write_text(json.dumps({"one_worker": one, "sft_share": share}, indent=2))
        return 0

    from raylm.core.ray_cluster import init_ray
    from raylm.training.config import global_batch, load_train_config

    init_ray()  # as `raylm pretrain` does: join RAY_ADDRESS or start a local cluster
    if args.ingest_only:
        result = ingest(ensure_dataset(args.data, work, args.max_docs))
        print("\n================ bench/train.py (part 6) ================")
        print_ingest(result)
        (work / "bench-train-ingest.json").write_text(json.dumps(result, indent=2))
        return 0
    if args.memory_only:
        print_memory(memory_by_stage(load_train_config("tiny", ["data.micro_batch=2"]), work))
        print_export_memory(export_memory(work))
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
    export = [] if args.no_memory else export_memory(work)

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
    one = share = None
    if args.peer:
        print(f"\n== 4. one worker vs Hugging Face Trainer, {args.threads} threads ==", flush=True)
        one = one_worker_vs_hf(dataset_dir, work, args.threads)
        share = sft_token_share(one["one_worker_model_dir"], work)
    read = ingest(dataset_dir) if args.ingest else None
    val = [(r["step"], r["val_loss"]) for r in metrics if "val_loss" in r]
    (s0, v0), (s1, v1) = val[0], val[-1]

    print("\n================ bench/train.py ================")
    print(f"throughput  bare PyTorch loop        {bare:>10,.0f} tokens/s (mean of before and after)")
    print(f"            raylm pretrain (2w ZeRO-2) {ours:>8,.0f} tokens/s   ratio {ours / bare:.2f}x  (target >= 0.9x)")
    if mem:
        print_memory(mem)
        print_export_memory(export)
    print(f"learning    val loss at init (step {s0}) {v0:.3f} -> after {args.minutes:g} min (step {s1}) {v1:.3f}: "
          f"{100 * (1 - v1 / v0):.0f}% lower  (target >= 40%)")
    if one:
        print_one_worker(one)
        print_sft_share(share)
    if read:
        print_ingest(read)
    summary = {"ingest": read, "export_memory": export, "one_worker": one, "sft_share": share, "bare_tokens_per_s": bare, "bare_after_tokens_per_s": bare_after, "raylm_tokens_per_s": ours, "ratio": ours / bare, "memory": mem,
               "val_loss_init": v0, "val_loss_final": v1, "final_step": s1, "minutes": args.minutes}
    (work / "bench-train.json").write_text(json.dumps(summary, indent=2))
    print(f"(details: {work / 'bench-train.json'}, run dir {work / 'run'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
