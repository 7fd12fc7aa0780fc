"""Benchmark of the data stage on the `stdlib` corpus: `raylm prepare` against two baselines.

    python bench/prepare.py [--seq-len 256] [--vocab-size 8192]

In one run, on the same documents with the same tokenizer:
  pipeline  the whole `raylm prepare` (list, read, clean, redact, encode, dedup, pack, write
            Parquet, manifest) on a running Ray cluster, reusing the tokenizer so that all three do
            the same work; tokens/s = tokens produced / wall seconds of the run; and the same run
            with cleaning off (near-dedup, redaction, quality rules and decontamination off; exact
            dedup stays, it was there before issue 15), the cost of cleaning as a ratio (target
            <= 1.3x, issue 15);
  driver    the CPU seconds of this process (the driver; the workers are other processes) for the
            whole corpus against a tenth of it (`max_docs`): the driver only plans and gathers
            records, so its time must not grow with the tokens (issue 15);
  workers   the same run on a fresh local cluster of 1 CPU and of 2 CPUs (Ray's logical CPUs: how
            many tasks run at once), each warmed up first; target 2 >= 1.6x 1 (issue 15);
  near-dup  near-dedup's own stages (MinHash band keys, the band rows' hash shuffle, the marks) on
            `--near-dup-copies` copies of the corpus's texts, each copy a few words apart (so
            about 0.1 GB to hash), on a fresh cluster of 1 CPU and of 2; target 2 >= 1.6x 1;
  (a) raw   `Tokenizer.encode_batch` on ~4 KB chunks of the documents already in memory, in this
            one process (its Rust threads use every core): the practical limit of these cores;
  (b) hf    `datasets.Dataset.map(batched=True, num_proc=2)` as Hugging Face's run_clm recipe
            does it: encode whole documents (+ separator), pack with a second batched map into
            rows of seq_len + 1, write Parquet.
Targets (issue 2): pipeline >= 0.8x (a) and >= 1.3x (b). Tokenizer training and Ray start-up are
timed and printed separately, not counted in the pipeline's figure. Every figure is printed with
the machine's load average (1 and 5 minutes) when it was taken: on a shared machine a figure
taken under load says little.
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


def load() -> str:
    """The machine's load average over 1 and 5 minutes, as printed next to each figure."""
    one, five, _ = os.getloadavg()
    return f"load {one:.1f}/{five:.1f}"


@dataclass
class Run:
    tokens: int
    seconds: float  # wall
    driver_cpu: float  # CPU seconds of this process
    load: str  # the load average when the run ended

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


WARM_DOCS = 200  # the warm-up run of a fresh cluster: a tenth of the corpus
CLEANING_OFF = {"near_dedup": False, "redact": False, "quality_filter": False, "decontaminate": False}


def timed_prepare(out: Path, seq_len: int, tokenizer_dir: Path, **settings) -> tuple[Run, dict]:
    start, cpu = time.perf_counter(), time.process_time()
    manifest = run_prepare(PrepareConfig(source="stdlib", out=str(out), seq_len=seq_len, tokenizer=str(tokenizer_dir), **settings))
    return Run(manifest["tokens"]["produced"], time.perf_counter() - start, time.process_time() - cpu, load()), manifest


def cleaning_on_and_off(tmp: Path, seq_len: int, tokenizer_dir: Path, repeats: int) -> tuple[list[Run], list[Run], dict]:
    """The whole corpus with cleaning on and off, alternately `repeats` times (a load that comes and
    goes then weighs on both); the runs, and the last manifest with cleaning on."""
    on, off = [], []
    for index in range(repeats):
        run, manifest = timed_prepare(tmp / f"on-{index}", seq_len, tokenizer_dir)
        on.append(run)
        off.append(timed_prepare(tmp / f"off-{index}", seq_len, tokenizer_dir, **CLEANING_OFF)[0])
    return on, off, manifest


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


def near_dup_corpus(texts: list[str], copies: int) -> list:
    """`copies` copies of `texts`, copy c with one word of its own in front (a near duplicate of the
    others), as Arrow tables of ~4 MB of document rows."""
    import pyarrow as pa

    rows = [(f"copy{copy} {text}", copy * len(texts) + index) for copy in range(copies) for index, text in enumerate(texts)]
    tables, block, size = [], [], 0
    for position, (text, order) in enumerate(rows):
        block.append((text, order))
        size += len(text)
        if size >= 4 << 20 or position == len(rows) - 1:
            count = len(block)
            tables.append(pa.table({"text": [t for t, _ in block], "order": pa.array([o for _, o in block], type=pa.int64()),
                                    "skip": pa.nulls(count, pa.string()), "source": pa.array(["bench"] * count)}))
            block, size = [], 0
    return tables


def near_dedup_seconds(workers: int, tables: list, buckets: int = 8) -> tuple[float, int, str]:
    """Wall seconds of near-dedup's stages as prepare runs them (the first pass's band keys, the band
    rows grouped by bucket, the marks) over `tables` on a fresh local cluster of `workers` CPUs,
    input already in its object store; the mark rows; the load."""
    import ray
    import ray.data

    from raylm.core.ray_cluster import init_ray
    from raylm.data.first_pass import survey_documents
    from raylm.data.near_dedup import lsh_params
    from raylm.data.partition_pack import near_duplicate_marks, pack_schema

    bands, rows = lsh_params(0.8, 128)
    survey = {"partitions": buckets, "quality": None, "ngram": None, "val_fraction": 0.0,
              "near_dedup": {"shingle_words": 5, "permutations": 128, "bands": bands, "rows": rows}}
    ray.shutdown()
    init_ray(num_cpus=workers)
    try:
        context = ray.data.DataContext.get_current()
        context.op_resource_reservation_enabled = False  # as prepare runs it
        context.enable_progress_bars = False
        documents = ray.data.from_arrow(tables).materialize()

        def marks(dataset) -> int:
            surveyed = dataset.map_batches(survey_documents, batch_format="pyarrow", fn_kwargs=survey).materialize()
            return near_duplicate_marks(surveyed, buckets, pack_schema("uint16")).count()

        marks(documents.limit(200))  # warm-up: workers started, functions shipped
        start = time.perf_counter()
        found = marks(documents)
        return time.perf_counter() - start, found, load()
    finally:
        ray.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=2, help="cleaning on/off pairs (the fastest of each side is compared)")
    parser.add_argument("--near-dup-copies", type=int, default=4, help="copies of the corpus the near-dup scaling runs on")
    parser.add_argument("--only", choices=("all", "cleaning", "near-dup", "workers"), default="all", help="run one part alone")
    args = parser.parse_args()
    parts = {"cleaning", "near-dup", "workers", "baselines"} if args.only == "all" else {args.only}

    from raylm.core.ray_cluster import init_ray

    print(f"start: {load()} on {os.cpu_count()} CPUs")
    texts = stdlib_documents()
    with tempfile.TemporaryDirectory(prefix="raylm-bench-prepare-") as tmp:
        tmp = Path(tmp)
        if "near-dup" in parts:
            tables = near_dup_corpus(texts, args.near_dup_copies)
            size = sum(table.column("text").nbytes for table in tables) / 1e9
            scaling = [near_dedup_seconds(workers, tables) for workers in (1, 2)]
            del tables
        if parts != {"near-dup"}:
            start = time.perf_counter()
            init_ray()
            ray_start = time.perf_counter() - start
            # A first full run trains the tokenizer (and warms Ray's workers up).
            start = time.perf_counter()
            first = run_prepare(PrepareConfig(source="stdlib", out=str(tmp / "first"), seq_len=args.seq_len, vocab_size=args.vocab_size))
            first_seconds, first_load = time.perf_counter() - start, load()
            tokenizer_dir = tmp / "first" / "tokenizer"
        if "cleaning" in parts or "baselines" in parts:
            on, off, manifest = cleaning_on_and_off(tmp, args.seq_len, tokenizer_dir, args.repeats)
            full = min(on, key=lambda run: run.seconds)
        if "baselines" in parts:
            tenth_docs = manifest["documents"]["read"] // 10
            tenth = timed_prepare(tmp / "tenth", args.seq_len, tokenizer_dir, max_docs=tenth_docs)[0]
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
            raw, raw_tokens, raw_seconds = raw_encode_tokens_per_s(tokenizer, texts)
            raw_load = load()
            hf, hf_tokens, hf_seconds = hf_datasets_tokens_per_s(str(tokenizer_dir / "tokenizer.json"), texts, args.seq_len, tmp)
            hf_load = load()
        if "workers" in parts:
            one, two = (run_on_fresh_cluster(n, tmp, args.seq_len, tokenizer_dir, WARM_DOCS) for n in (1, 2))

    corpus_mb = stdlib_corpus().approx_bytes / 1e6
    print()
    print(f"corpus: stdlib, {corpus_mb:.1f} MB; seq_len {args.seq_len}, vocab {args.vocab_size}; {os.cpu_count()} CPUs")
    if parts != {"near-dup"}:
        print(f"Ray start-up {ray_start:.1f} s; first full run (tokenizer training included) {first_seconds:.1f} s, "
              f"{first['tokens']['produced'] / first_seconds:,.0f} tokens/s ({first_load})")
    if "cleaning" in parts or "baselines" in parts:
        print(f"pipeline  raylm prepare (tokenizer reused)      {full.tokens_per_s:>12,.0f} tokens/s  ({full.tokens:,} tokens in {full.seconds:.1f} s, {full.load})")
        skipped = ", ".join(f"{reason} {n}" for reason, n in manifest["documents"]["skipped"].items())
        print(f"cleaning  on (near-dedup, redaction, quality, decontamination): {', '.join(f'{r.seconds:.1f} s ({r.load})' for r in on)}")
        print(f"          off: {', '.join(f'{r.seconds:.1f} s ({r.load})' for r in off)}")
        fastest_off = min(run.seconds for run in off)
        print(f"          fastest on / fastest off = {full.seconds:.1f} / {fastest_off:.1f} s = {full.seconds / fastest_off:.2f}x (target <= 1.3x); "
              f"{manifest['documents']['kept']} of {manifest['documents']['read']} documents kept; skipped: {skipped}")
    if "baselines" in parts:
        print(f"(a) raw   encode_batch on 4 KB chunks, 1 proc   {raw:>12,.0f} tokens/s  ({raw_tokens:,} tokens in {raw_seconds:.1f} s, {raw_load})")
        print(f"(b) hf    datasets.map(batched, num_proc=2)     {hf:>12,.0f} tokens/s  ({hf_tokens:,} tokens in {hf_seconds:.1f} s, {hf_load})")
        print(f"ratios: pipeline / (a) = {full.tokens_per_s / raw:.2f}x (target >= 0.8x); pipeline / (b) = {full.tokens_per_s / hf:.2f}x (target >= 1.3x)")
        print(f"driver    CPU s of the driver: a tenth ({tenth_docs} documents, {tenth.tokens:,} tokens) {tenth.driver_cpu:.2f} s, "
              f"the whole corpus ({full.tokens:,} tokens) {full.driver_cpu:.2f} s: {full.driver_cpu / tenth.driver_cpu:.2f}x "
              f"for {full.tokens / tenth.tokens:.1f}x the tokens (target: no growth); per second of the run "
              f"{tenth.driver_cpu / tenth.seconds:.3f} vs {full.driver_cpu / full.seconds:.3f} (Ray Data's executor loop, per task and per second)")
    if "workers" in parts:
        print(f"workers   1 CPU {one.tokens_per_s:>12,.0f} tokens/s ({one.seconds:.1f} s, {one.load})  2 CPUs {two.tokens_per_s:>12,.0f} tokens/s "
              f"({two.seconds:.1f} s, {two.load}): {two.tokens_per_s / one.tokens_per_s:.2f}x (target >= 1.6x)")
    if "near-dup" in parts:
        (one_s, marks, one_load), (two_s, _, two_load) = scaling
        print(f"near-dup  {args.near_dup_copies} copies of the corpus ({size:.2f} GB, {marks:,} mark rows: a document once per bucket that marks it): "
              f"1 CPU {one_s:.1f} s ({one_load}), 2 CPUs {two_s:.1f} s ({two_load}): {one_s / two_s:.2f}x (target >= 1.6x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
