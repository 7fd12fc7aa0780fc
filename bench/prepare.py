"""Benchmark of the data stage on the `stdlib` corpus: `raylm prepare` against two baselines.

    python bench/prepare.py [--seq-len 256] [--vocab-size 8192]

In one run, on the same documents with the same tokenizer:
  pipeline  the whole `raylm prepare` (list, read, clean, redact, encode, dedup, pack, write
            Parquet, manifest) on a running Ray cluster, reusing the tokenizer so that all three do
            the same work; tokens/s = tokens produced / wall seconds of the run; and the same run
            with cleaning off (`redact=False, near_dedup=False`), the cost of cleaning as a ratio
            (target <= 1.3x, issue 15);
  driver    the CPU seconds of this process (the driver; the workers are other processes) for the
            whole corpus against a tenth of it (`max_docs`): the driver only plans and gathers
            records, so its time must not grow with the tokens (issue 15);
  workers   the same run on a fresh local cluster of 1 CPU and of 2 CPUs (Ray's logical CPUs: how
            many tasks run at once), each warmed up first; target 2 >= 1.6x 1 (issue 15);
  (a) raw   `Tokenizer.encode_batch` on ~4 KB chunks of the documents already in memory, in this
            one process (its Rust threads use every core): the practical limit of these cores;
  (b) hf    `datasets.Dataset.map(batched=True, num_proc=2)` as Hugging Face's run_clm recipe
            does it: encode whole documents (+ separator), pack with a second batched map into
            rows of seq_len + 1, write Parquet.
Targets (issue 2): pipeline >= 0.8x (a) and >= 1.3x (b). Tokenizer training and Ray start-up are
timed and printed separately, not counted in the pipeline's figure.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from raylm.data.encode import chunk_text  # noqa: E402
from raylm.data.prepare import PrepareConfig, run_prepare  # noqa: E402
from raylm.data.sources import stdlib_corpus  # noqa: E402


def stdlib_documents() -> list[str]:
    """The stdlib corpus's kept documents, as the pipeline cleans them (UTF-8, non-empty, unique)."""
    import pydoc_data.topics

    from raylm.data.sources import stdlib_files

    _, files = stdlib_files()
    texts = list(pydoc_data.topics.topics.values())
    for path in files:
        try:
            texts.append(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            continue
    unique = list(dict.fromkeys(t for t in texts if t.strip()))
    return unique


def raw_encode_tokens_per_s(tokenizer, texts: list[str]) -> tuple[float, int, float]:
    chunks = [chunk for text in texts for chunk in chunk_text(text, 4096)]
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    start = time.perf_counter()
    encodings = encode(chunks, add_special_tokens=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(e.ids) for e in encodings) + len(texts)  # + one separator per document, as packed
    return tokens / seconds, tokens, seconds


def hf_datasets_tokens_per_s(tokenizer_file: str, texts: list[str], seq_len: int, out: Path) -> tuple[float, int, float]:
    import datasets

    datasets.disable_progress_bars()
    row = seq_len + 1

    def encode(batch):
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(tokenizer_file)
        separator = tokenizer.token_to_id("<|endoftext|>")
        return {"ids": [e.ids + [separator] for e in tokenizer.encode_batch(batch["text"], add_special_tokens=False)]}

    def pack(batch):
        stream = [token for ids in batch["ids"] for token in ids]
        usable = len(stream) - len(stream) % row
        return {"input_ids": [stream[i : i + row] for i in range(0, usable, row)]}

    start = time.perf_counter()
    dataset = datasets.Dataset.from_dict({"text": texts})
    encoded = dataset.map(encode, batched=True, num_proc=2, remove_columns=["text"])
    tokens = sum(len(ids) for ids in encoded["ids"])
    packed = encoded.map(pack, batched=True, batch_size=1000, num_proc=2, remove_columns=["ids"])
    packed.to_parquet(str(out / "hf.parquet"))
    seconds = time.perf_counter() - start
    return tokens / seconds, tokens, seconds


@dataclass
class Run:
    tokens: int
    seconds: float  # wall
    driver_cpu: float  # CPU seconds of this process

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def timed_prepare(out: Path, seq_len: int, tokenizer_dir: Path, **settings) -> tuple[Run, dict]:
    start, cpu = time.perf_counter(), time.process_time()
    manifest = run_prepare(PrepareConfig(source="stdlib", out=str(out), seq_len=seq_len, tokenizer=str(tokenizer_dir), **settings))
    return Run(manifest["tokens"]["produced"], time.perf_counter() - start, time.process_time() - cpu), manifest


def run_on_fresh_cluster(workers: int, tmp: Path, seq_len: int, tokenizer_dir: Path, warm_docs: int) -> Run:
    """The whole corpus on a new local cluster of `workers` CPUs, after a small warm-up run."""
    import ray

    from raylm.core.ray_cluster import init_ray

    ray.shutdown()
    init_ray(num_cpus=workers)
    try:
        timed_prepare(tmp / f"warm-{workers}", seq_len, tokenizer_dir, max_docs=warm_docs)
        return timed_prepare(tmp / f"workers-{workers}", seq_len, tokenizer_dir)[0]
    finally:
        ray.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=8192)
    args = parser.parse_args()

    from raylm.core.ray_cluster import init_ray

    with tempfile.TemporaryDirectory(prefix="raylm-bench-prepare-") as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        init_ray()
        ray_start = time.perf_counter() - start

        # A first full run trains the tokenizer (and warms Ray's workers up).
        start = time.perf_counter()
        first = run_prepare(PrepareConfig(source="stdlib", out=str(tmp / "first"), seq_len=args.seq_len, vocab_size=args.vocab_size))
        first_seconds = time.perf_counter() - start
        tokenizer_dir = tmp / "first" / "tokenizer"

        full, manifest = timed_prepare(tmp / "timed", args.seq_len, tokenizer_dir)
        pipeline_seconds, pipeline_tokens, pipeline = full.seconds, full.tokens, full.tokens_per_s
        uncleaned_seconds = timed_prepare(tmp / "uncleaned", args.seq_len, tokenizer_dir, redact=False, near_dedup=False)[0].seconds
        tenth_docs = manifest["documents"]["read"] // 10
        tenth = timed_prepare(tmp / "tenth", args.seq_len, tokenizer_dir, max_docs=tenth_docs)[0]

        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
        texts = stdlib_documents()
        raw, raw_tokens, raw_seconds = raw_encode_tokens_per_s(tokenizer, texts)
        hf, hf_tokens, hf_seconds = hf_datasets_tokens_per_s(str(tokenizer_dir / "tokenizer.json"), texts, args.seq_len, tmp)
        one, two = (run_on_fresh_cluster(n, tmp, args.seq_len, tokenizer_dir, tenth_docs) for n in (1, 2))

    corpus_mb = stdlib_corpus().approx_bytes / 1e6
    print()
    print(f"corpus: stdlib, {corpus_mb:.1f} MB, {manifest['documents']['kept']} documents kept; seq_len {args.seq_len}, vocab {manifest['vocab_size']}; {os.cpu_count()} CPUs")
    print(f"Ray start-up {ray_start:.1f} s; first full run (tokenizer training included) {first_seconds:.1f} s, {first['tokens']['produced'] / first_seconds:,.0f} tokens/s")
    print(f"pipeline  raylm prepare (tokenizer reused)      {pipeline:>12,.0f} tokens/s  ({pipeline_tokens:,} tokens in {pipeline_seconds:.1f} s)")
    print(f"(a) raw   encode_batch on 4 KB chunks, 1 proc   {raw:>12,.0f} tokens/s  ({raw_tokens:,} tokens in {raw_seconds:.1f} s)")
    print(f"(b) hf    datasets.map(batched, num_proc=2)     {hf:>12,.0f} tokens/s  ({hf_tokens:,} tokens in {hf_seconds:.1f} s)")
    redacted = ", ".join(f"{p} {n}" for p, n in manifest["documents"]["redacted"].items())
    near = manifest["documents"]["skipped"].get("near_duplicate", 0)
    print(f"cleaning  redaction + near-dedup on {pipeline_seconds:.1f} s vs off {uncleaned_seconds:.1f} s: "
          f"{pipeline_seconds / uncleaned_seconds:.2f}x (target <= 1.3x); redacted {redacted}; near duplicates {near}")
    print(f"ratios: pipeline / (a) = {pipeline / raw:.2f}x (target >= 0.8x); pipeline / (b) = {pipeline / hf:.2f}x (target >= 1.3x)")
    print(f"driver    CPU s of the driver: a tenth ({tenth_docs} documents, {tenth.tokens:,} tokens) {tenth.driver_cpu:.2f} s, "
          f"the whole corpus ({full.tokens:,} tokens) {full.driver_cpu:.2f} s: {full.driver_cpu / tenth.driver_cpu:.2f}x "
          f"for {full.tokens / tenth.tokens:.1f}x the tokens (target: no growth); per second of the run "
          f"{tenth.driver_cpu / tenth.seconds:.3f} vs {full.driver_cpu / full.seconds:.3f} (Ray Data's executor loop, per task and per second)")
    print(f"workers   1 CPU {one.tokens_per_s:>12,.0f} tokens/s ({one.seconds:.1f} s)  2 CPUs {two.tokens_per_s:>12,.0f} tokens/s "
          f"({two.seconds:.1f} s): {two.tokens_per_s / one.tokens_per_s:.2f}x (target >= 1.6x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
