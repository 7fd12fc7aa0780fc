"""Serving benchmark: the engine and the HTTP endpoint against a no-cache, one-at-a-time baseline.

    python bench/serve.py [--model MODEL_DIR] [--requests-per-client 4] [--max-tokens 64] [--json OUT]
                          [--engine-only | --http-only] [--peer]

In one run:
1. decode step time at context 64 and 512 (batch 1, lower-quartile step, best of 3): the engine (KV cache) vs the
   baseline (a full forward over the whole sequence for every token). Target: engine(512) <= 1.5 x
   engine(64). Then the same at batch 8 (eight sequences with different prompts decoding
   together). Target: <= 1.3x. Beside it, interleaved: the same steps through SDPA instead of the
   C decode kernel (raylm/model/paged_attention.py), with a bfloat16 KV cache, and with one prompt
   for all eight, whose cached blocks they share (each then reads its keys from two places). Then
   the bytes a step reads (weights, and keys and values at each context): where memory bandwidth
   bounds a step, as on a CPU, their ratio is the least the 512/64 ratio can be.
   Then the engine's output tokens/s in process: 16 different prompts of 128 tokens, 64 new
   tokens each, batch 8.
2. output tokens/s of the baseline generating one request after another.
3. a bounded load (asyncio + httpx, 127.0.0.1 only, a fixed number of streaming requests) against
   the Serve app at concurrency 1, 8 and 32: output tokens/s and time to first token p50/p99.
   Target: tokens/s at 32 >= 6 x at 1. The app's defaults apply (its stream write budget
   included) unless --stream-interval-s / --stream-writes-per-s say otherwise.
4. with --peer, the same load against `transformers serve --continuous-batching` on the same model
   dir (bench/serve_peer.py), at concurrency 1 and 32, side by side with part 3's figures.
   Target: raylm >= 1.5 x the peer's output tokens/s at 32, and no lower at 1.

Without --model, a random model dir (dim 384, 6 layers, GQA, 1024 context, the test suite's tiny
tokenizer) is written to a temp dir: the figures are about the engine, not about what it says.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import torch  # noqa: E402

from raylm.inference.engine import Engine, EngineConfig  # noqa: E402
from raylm.inference.sampling import SamplingParams  # noqa: E402

CONTEXTS = (64, 512)
BATCH = 8  # sequences decoding together in the batched step figure
CONCURRENCY = (1, 8, 32)
PROMPT = "def add(a, b):\n    return a + b\n"


def random_model_dir(root: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_artifacts import make_model_dir, make_tokenizer_dir

    tokenizer = make_tokenizer_dir(root / "tokenizer")
    return make_model_dir(root / "bench-model", tokenizer, dim=384, n_layers=6, n_heads=6, n_kv_heads=2, ffn_dim=1024, max_seq_len=1024)


def quartile(times: list[float]) -> float:
    """The lower quartile: on a shared machine, the step least disturbed by other processes."""
    return sorted(times)[len(times) // 4]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---- 1 + 2: in-process -----------------------------------------------------------------------------


def engine_step_ms(engine: Engine, context: int, steps: int) -> float:
    """Lower-quartile decode step (batch 1) with `context` tokens already in the KV cache."""
    prompt = torch.randint(0, engine.model_config.vocab_size, (context,)).tolist()
    seq = engine.submit(prompt, SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True), lambda out: None)
    engine.step()  # prefill + the first token
    times = []
    while engine.has_work():
        started = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - started)
    assert len(seq.output_ids) == steps + 1
    return quartile(times) * 1000


def engine_batch_step_ms(engine: Engine, context: int, steps: int, batch: int, shared: bool = False) -> float:
    """Lower-quartile decode step with `batch` sequences of `context` tokens decoding together:
    different prompts, or with `shared` one prompt (whose cached blocks all of them then read)."""
    prompts = [torch.randint(0, engine.model_config.vocab_size, (context,)).tolist() for _ in range(1 if shared else batch)]
    params = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
    seqs = [engine.submit(prompts[i % len(prompts)], params, lambda out: None) for i in range(batch)]
    while any(not seq.output_ids for seq in seqs):  # every prompt prefilled: from here on all decode
        engine.step()
    times = []
    while engine.has_work():
        started = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - started)
    return quartile(times[:steps]) * 1000


def batch_step_variant_ms(engine: Engine, context: int, steps: int, shared: bool = False, kernel: bool = True) -> float:
    """engine_batch_step_ms at batch BATCH; with `kernel` False, through the SDPA path a CPU cache
    takes where the decode kernel cannot be built."""
    cache = engine.runner.cache
    built = cache.decode_kernel
    cache.decode_kernel = built if kernel else None
    try:
        return engine_batch_step_ms(engine, context, steps, BATCH, shared)
    finally:
        cache.decode_kernel = built


@torch.inference_mode()
def read_gb_per_s(device: torch.device, mib: int = 96) -> float:
    """How fast this machine reads memory on the engine's threads: the best of 10 sums of `mib` MiB,
    more than a CPU's caches hold. The bytes a decode step reads, over this, is the least it can take."""
    values = torch.ones(mib * 2**20 // 4, device=device)
    times = []
    for _ in range(10):
        started = time.perf_counter()
        values.sum().item()
        times.append(time.perf_counter() - started)
    del values
    return mib * 2**20 / min(times) / 1e9


@torch.inference_mode()
def baseline_step_ms(engine: Engine, context: int, steps: int) -> float:
    """Lower-quartile step of the baseline: the whole sequence through the model for each new token."""
    tokens = torch.randint(0, engine.model_config.vocab_size, (1, context), device=engine.device)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        next_token = engine.model(tokens)[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], dim=1)
        times.append(time.perf_counter() - started)
    return quartile(times) * 1000


def engine_tokens_per_s(engine: Engine, requests: int, prompt_len: int, max_tokens: int) -> float:
    """Output tokens/s of the engine running `requests` different prompts to the end, in process
    (prefills and decodes, as many at once as its batch holds)."""
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, engine.model_config.vocab_size, (prompt_len,), generator=generator).tolist() for _ in range(requests)]
    started = time.perf_counter()
    engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    return requests * max_tokens / (time.perf_counter() - started)


def baseline_tokens_per_s(engine: Engine, prompt_ids: list[int], requests: int, max_tokens: int) -> float:
    started = time.perf_counter()
    with torch.inference_mode():
        for _ in range(requests):
            tokens = torch.tensor([prompt_ids], device=engine.device)
            for _ in range(max_tokens):
                tokens = torch.cat([tokens, engine.model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return requests * max_tokens / (time.perf_counter() - started)


# ---- 3: over HTTP ------------------------------------------------------------------------------------


async def one_request(client, url: str, body: dict) -> tuple[float, int]:
    """(time to first token in s, output tokens) of one streaming completion."""
    started = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"] and ttft is None:
                ttft = time.perf_counter() - started
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return ttft if ttft is not None else time.perf_counter() - started, tokens


async def load(base_url: str, model: str, concurrency: int, requests_per_client: int, max_tokens: int, ignore_eos: bool = True) -> dict:
    import httpx

    body = {
        "model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.0,
        "stream": True, "stream_options": {"include_usage": True},
    } | ({"ignore_eos": True} if ignore_eos else {})  # the peer refuses the field (422); its tokens/s counts what it made
    url = f"{base_url}/v1/completions"
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def client_loop() -> list[tuple[float, int]]:
            return [await one_request(client, url, body) for _ in range(requests_per_client)]

        await one_request(client, url, {**body, "max_tokens": 4})  # warm the connection and the replica
        started = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(client_loop() for _ in range(concurrency))) for r in rs]
        wall = time.perf_counter() - started
    ttfts = [t for t, _ in results]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "output_tokens_per_s": sum(n for _, n in results) / wall,
        "ttft_p50_ms": percentile(ttfts, 0.5) * 1000,
        "ttft_p99_ms": percentile(ttfts, 0.99) * 1000,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_and_load(model_dir: Path, args, workdir: Path) -> tuple[list[dict], dict]:
    import ray
    import yaml

    from raylm.serving.serve import DEFAULT_CONFIG, start_serving, stop_serving

    cpus = os.cpu_count() or 2
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    app = config["applications"][0]
    app["args"]["max_batch_size"] = max(CONCURRENCY)
    app["args"]["stream_interval_s"] = args.stream_interval_s
    if args.stream_writes_per_s is not None:
        app["args"]["stream_writes_per_s"] = args.stream_writes_per_s
    deployment = app["deployments"][0]
    deployment["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 1}  # one engine: its batching is what is measured
    deployment["ray_actor_options"]["num_cpus"] = args.replica_cpus  # = the replica's torch threads
    deployment["logging_config"] = {"enable_access_log": False}  # a line per request would bury the figures
    if torch.cuda.is_available():
        deployment["ray_actor_options"]["num_gpus"] = 1
    (workdir / "serve.yaml").write_text(yaml.safe_dump(config))
    ray.init(address="local", num_cpus=cpus + 1, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="raylm-bench-", dir="/tmp"))
    try:
        base_url = start_serving(str(model_dir), port=free_port(), config=workdir / "serve.yaml")
        rows = [asyncio.run(load(base_url, model_dir.name, c, args.requests_per_client, args.max_tokens)) for c in CONCURRENCY]
        import httpx

        engine_stats = httpx.get(f"{base_url}/stats").json()
        return rows, engine_stats
    finally:
        stop_serving(cluster_ends=True)  # serve.shutdown() would print Ray's "graceful_shutdown failed" line
        ray.shutdown()


PEER_CONCURRENCY = (1, 32)


def peer_load(model_dir: Path, args, workdir: Path) -> list[dict]:
    """Part 4: the same streaming load against `transformers serve` on the same model dir."""
    from serve_peer import transformers_serve

    with transformers_serve(model_dir, free_port(), args.peer_threads, workdir / "peer.log") as base_url:
        return [asyncio.run(load(base_url, str(model_dir), c, args.requests_per_client, args.max_tokens, ignore_eos=False))
                for c in PEER_CONCURRENCY]


def http_parts(model_dir: Path, args, workdir: Path, baseline_tps: float | None) -> tuple[list[dict], dict, list[dict], float]:
    """Parts 3 and 4, measured and printed: (rows, engine stats, peer rows, tokens/s scale 32 vs 1)."""
    rows, engine_stats = serve_and_load(model_dir, args, workdir)
    by_c = {r["concurrency"]: r for r in rows}
    scale = by_c[max(CONCURRENCY)]["output_tokens_per_s"] / by_c[1]["output_tokens_per_s"]
    if baseline_tps is not None:
        print(f"\nbaseline, no cache, one request at a time: {baseline_tps:.1f} output tokens/s")
    from raylm.serving.app import AppArgs

    writes = AppArgs.stream_writes_per_s if args.stream_writes_per_s is None else args.stream_writes_per_s
    print(f"\nstream_interval_s {args.stream_interval_s}, stream_writes_per_s {writes}")
    print(f"HTTP (Serve, streaming)  requests  output tok/s  TTFT p50    TTFT p99   (load average {os.getloadavg()[0]:.1f})")
    for r in rows:
        print(f"  concurrency {r['concurrency']:>3}      {r['requests']:>5}  {r['output_tokens_per_s']:12.1f}  {r['ttft_p50_ms']:7.1f} ms  {r['ttft_p99_ms']:7.1f} ms")
    vs_baseline = f"; vs the baseline at 1: {by_c[max(CONCURRENCY)]['output_tokens_per_s'] / baseline_tps:.2f}x" if baseline_tps else ""
    print(f"\ntokens/s at {max(CONCURRENCY)} / at 1: {scale:.2f}x (target >= 6x){vs_baseline}")
    print(f"engine: batch size max {engine_stats['batch_size_max']}, mean {engine_stats['batch_size_mean']:.1f}", flush=True)
    peer_rows = peer_load(model_dir, args, workdir) if args.peer else []
    if peer_rows:
        print(f"\nvs transformers serve --continuous-batching ({args.peer_threads} threads), same model, prompt and max_tokens, streaming")
        print("  concurrency   raylm tok/s   peer tok/s   ratio   TTFT p50 raylm / peer   TTFT p99 raylm / peer")
        for peer in peer_rows:
            ours = by_c[peer["concurrency"]]
            target = "(target >= 1.5x)" if peer["concurrency"] > 1 else "(target >= 1.0x)"
            print(f"  {peer['concurrency']:>11}   {ours['output_tokens_per_s']:11.1f}   {peer['output_tokens_per_s']:10.1f}   "
                  f"{ours['output_tokens_per_s'] / peer['output_tokens_per_s']:5.2f}x  "
                  f"{ours['ttft_p50_ms']:7.0f} / {peer['ttft_p50_ms']:7.0f} ms   {ours['ttft_p99_ms']:7.0f} / {peer['ttft_p99_ms']:7.0f} ms   {target}")
    return rows, engine_stats, peer_rows, scale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model dir to serve (default: a random bench-sized one)")
    parser.add_argument("--requests-per-client", type=int, default=4, help="streaming requests each client sends, one after another")
    parser.add_argument("--max-tokens", type=int, default=64, help="output tokens per request")
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per context length")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for the in-process part (0 = torch's default)")
    parser.add_argument("--replica-cpus", type=float, default=1, help="num_cpus (= torch threads) of the Serve replica; the rest is left to the proxy and the load generator")
    parser.add_argument("--stream-interval-s", type=float, default=0.0, help="the app's stream_interval_s (least time between SSE writes)")
    parser.add_argument("--stream-writes-per-s", type=float, default=None, help="the app's stream_writes_per_s (SSE writes a second of all streams together; default: the app's, 0 = a write per step)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--engine-only", action="store_true", help="only the in-process decode steps (part 1), no HTTP load")
    parser.add_argument("--http-only", action="store_true", help="only the HTTP load (parts 3 and 4)")
    parser.add_argument("--peer", action="store_true", help="also load `transformers serve` on the same model dir (part 4)")
    parser.add_argument("--peer-threads", type=int, default=os.cpu_count() or 2, help="torch threads of the peer server")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="raylm-bench-serve-"))
    model_dir = Path(args.model) if args.model else random_model_dir(workdir)
    if args.http_only:
        print(f"model: {model_dir}", flush=True)
        http_parts(model_dir, args, workdir, baseline_tps=None)
        return 0
    config = EngineConfig(max_batch_size=1, max_model_len=max(CONTEXTS) + args.steps + 8, threads=args.threads)
    engine = Engine(model_dir, config)
    device = f"{engine.device} ({torch.cuda.get_device_name() if engine.device.type == 'cuda' else f'{torch.get_num_threads()} threads'})"
    print(f"model: {model_dir}  device: {device}", flush=True)

    # Best of 3, interleaved: on a shared machine the minimum is the figure least disturbed by others.
    engine_step_ms(engine, CONTEXTS[0], 4)  # warm-up
    runs = [{c: (engine_step_ms(engine, c, args.steps), baseline_step_ms(engine, c, max(8, args.steps // 4))) for c in CONTEXTS} for _ in range(3)]
    steps = {c: {"engine_ms": min(r[c][0] for r in runs), "baseline_ms": min(r[c][1] for r in runs)} for c in CONTEXTS}
    prompt_ids = engine.encode_prompt(PROMPT)
    del engine
    batched = Engine(model_dir, dataclasses.replace(config, max_batch_size=BATCH))
    half = Engine(model_dir, dataclasses.replace(config, max_batch_size=BATCH, kv_cache_dtype="bfloat16"))
    kernel = batched.runner.cache.decode_kernel
    cache_name, cache_bytes = str(batched.runner.kv_dtype).removeprefix("torch."), batched.runner.cache.k.element_size()  # float32 on a CPU, bfloat16 on a GPU
    tied, cfg = batched.model_config.tie_embeddings, batched.model_config  # an untied embedding is read a row per token, not whole
    weights = sum(p.numel() * p.element_size() for n, p in batched.runner.model.named_parameters() if tied or not n.startswith("embed_tokens"))
    kv_values_per_token = cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim
    gb_per_s = read_gb_per_s(batched.device)
    engine_batch_step_ms(batched, CONTEXTS[0], 4, BATCH)  # warm-up
    engine_batch_step_ms(half, CONTEXTS[0], 4, BATCH)

    variants = {"kernel": (batched, {}), "sdpa": (batched, {"kernel": False}), "bfloat16_cache": (half, {}), "shared_prompt": (batched, {"shared": True})}
    variant_runs = [{name: {c: batch_step_variant_ms(eng, c, args.steps, **kw) for c in CONTEXTS} for name, (eng, kw) in variants.items()}
                    for _ in range(3)]  # interleaved, so that a slower minute of a shared machine hits them all
    variant_steps = {name: {c: min(r[name][c] for r in variant_runs) for c in CONTEXTS} for name in variants}
    batch_steps, shared_steps = variant_steps["kernel"], variant_steps["shared_prompt"]
    del half, variants
    engine_tps = max(engine_tokens_per_s(batched, requests=2 * BATCH, prompt_len=128, max_tokens=args.max_tokens) for _ in range(3))
    del batched
    lo, hi = CONTEXTS
    step_ratio = steps[hi]["engine_ms"] / steps[lo]["engine_ms"]
    base_ratio = steps[hi]["baseline_ms"] / steps[lo]["baseline_ms"]
    batch_ratio = batch_steps[hi] / batch_steps[lo]
    shared_ratio = shared_steps[hi] / shared_steps[lo]
    print("\ndecode step (batch 1)      context 64   context 512   512/64")
    print(f"  engine (KV cache)       {steps[lo]['engine_ms']:9.2f} ms  {steps[hi]['engine_ms']:9.2f} ms   {step_ratio:5.2f}x  (target <= 1.5x)")
    print(f"  baseline (no cache)     {steps[lo]['baseline_ms']:9.2f} ms  {steps[hi]['baseline_ms']:9.2f} ms   {base_ratio:5.2f}x")
    path = "the C kernel" if kernel is not None else "SDPA" if "cpu" not in device else "SDPA: the kernel did not build, see the log"
    print(f"decode step (batch {BATCH})      {batch_steps[lo]:9.2f} ms  {batch_steps[hi]:9.2f} ms   {batch_ratio:5.2f}x  (target <= 1.3x; {cache_name} cache, {path})")
    for name, label in (("sdpa", "SDPA, not the kernel"), ("bfloat16_cache", "bfloat16 KV cache"), ("shared_prompt", "one shared prompt")):
        lo_ms, hi_ms = variant_steps[name][lo], variant_steps[name][hi]
        print(f"  {label:<22}  {lo_ms:9.2f} ms  {hi_ms:9.2f} ms   {hi_ms / lo_ms:5.2f}x")
    print(f"  kernel over SDPA        {variant_steps['sdpa'][lo] / batch_steps[lo]:9.2f}x     {variant_steps['sdpa'][hi] / batch_steps[hi]:9.2f}x     (step time, SDPA / kernel)")
    for name, element in dict([(cache_name, cache_bytes), ("bfloat16", 2)]).items():  # a long decode step reads the weights and every key and value once
        kv = {c: BATCH * c * kv_values_per_token * element for c in CONTEXTS}
        print(f"  bytes a step reads, {name} cache: weights {weights / 2**20:.1f} MiB + KV {kv[lo] / 2**20:.1f} / {kv[hi] / 2**20:.1f} MiB: "
              f"{(weights + kv[hi]) / (weights + kv[lo]):.2f}x where memory bandwidth bounds the step")
    least = {c: (weights + BATCH * c * kv_values_per_token * cache_bytes) / gb_per_s / 1e6 for c in CONTEXTS}
    print(f"  memory read at {gb_per_s:.1f} GB/s here: those {cache_name} bytes take {least[lo]:.2f} / {least[hi]:.2f} ms of the "
          f"{batch_steps[lo]:.2f} / {batch_steps[hi]:.2f} ms steps ({least[hi] / batch_steps[hi]:.0%} of the step at 512; near 100%, memory bounds it)")
    print(f"engine in process, {2 * BATCH} requests of 128 + {args.max_tokens} tokens, batch {BATCH}: {engine_tps:.1f} output tokens/s (best of 3)")
    if args.engine_only:
        return 0
    engine = Engine(model_dir, config)
    baseline_tps = baseline_tokens_per_s(engine, prompt_ids, requests=2, max_tokens=args.max_tokens)
    del engine
    rows, engine_stats, peer_rows, scale = http_parts(model_dir, args, workdir, baseline_tps)
    if args.json:
        figures = {"device": device, "read_gb_per_s": gb_per_s, "steps": steps, "batch_steps": batch_steps, "batch_step_ratio": batch_ratio, "batch_step_variants": variant_steps,
                   "shared_prompt_batch_steps": shared_steps, "shared_prompt_batch_step_ratio": shared_ratio,
                   "engine_tokens_per_s": engine_tps, "baseline_tokens_per_s": baseline_tps, "http": rows, "step_ratio": step_ratio,
                   "baseline_step_ratio": base_ratio, "throughput_scale": scale, "engine_stats": engine_stats, "peer_http": peer_rows}
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
