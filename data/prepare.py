"""`raylm prepare --source SRC --out DIR`: a corpus -> a dataset dir (tokenizer + packed shards).

The pipeline runs on the Ray workers; the driver touches no token. A first pass (data/first_pass.py)
reads the corpus, applies the quality rules and gives each document its MinHash band keys, and
the val split's documents their word n-grams; near duplicates are found by grouping the band keys
across workers (data/near_dedup.py), and the n-grams of the val split and of any evaluation sets
are merged into one set in the object store (data/decontaminate.py). Ray Data then reads, cleans
and tokenizes the documents in parallel tasks (fused read -> parse -> quality rules ->
decontamination against that set -> redact -> encode); the encoded documents are
hash-partitioned by content hash, and one task per partition drops exact duplicates (the first in
corpus order is kept) and the near duplicates marked for it, assigns each document to train or val
by its content hash, packs each split into rows of `seq_len + 1` ids and writes the partition's
Parquet shards (data/partition_pack.py). The
driver plans (tokenizer, partition count), gathers one small record per partition and writes the
manifest, with each cleaning step's counts and first examples (data/cleaning_report.py). Every
choice sorts by the documents' corpus order and the partitions depend only on content hashes, so
the same inputs and settings give byte-identical shards whatever the scheduling.

Everything is built in a hidden temporary dir next to `--out`, `manifest.json` last, and renamed
into place at the end, so an interrupted run never leaves a dir that looks complete.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from raylm import __version__
from raylm.core import storage
from raylm.core.cli_args import add_config_flags, config_values, parse_command_line
from raylm.core.config import apply_overrides, from_dict, override_pairs
from raylm.core.entry import run_main
from raylm.core.errors import UserError
from raylm.core.redact import PLACEHOLDERS
from raylm.data.cleaning_report import cleaning_section, merge_examples, report_lines
from raylm.data.dataset_dir import FORMAT_VERSION, KIND, MANIFEST, read_dataset_manifest
from raylm.data.encode import DEFAULT_CHUNK_CHARS, encode_documents
from raylm.data.first_pass import first_pass
from raylm.data.near_dedup import lsh_params
from raylm.data.partition_pack import NO_ERROR, SPLITS, pack_on_workers
from raylm.data.quality import QualityConfig
from raylm.data.sources import Corpus, resolve_source
from raylm.data.tokenizer import (
    load_tokenizer,
    save_tokenizer,
    special_token_map,
    train_tokenizer,
)


@dataclass
class PrepareConfig:
    source: str  # stdlib | a file, directory or glob | hf:NAME[:CONFIG][@SPLIT] | s3://, gs://, file:// URI
    out: str  # the dataset dir to write: a local path, or an s3://, gs://, file:// URI (manifest.json written last)
    seq_len: int = 256  # tokens a model sees per row; rows hold seq_len + 1 ids (inputs + shifted targets)
    vocab_size: int = 8192  # size of the BPE to train, special tokens included (ignored with `tokenizer`)
    tokenizer: str | None = None  # reuse this tokenizer.json or HF tokenizer dir instead of training one
    tokenizer_sample_bytes: int = 8_000_000  # text the BPE is trained on: the corpus's first documents, in its order
    text_field: str = "text"  # the field of .jsonl/.json records, the column of .parquet and hf: datasets
    val_fraction: float = 0.05  # share of documents (by content hash) that go to the val split
    max_docs: int | None = None  # read only the first N documents in corpus order (a fixed sample)
    dedup: bool = True  # drop exact duplicate documents (the first one in corpus order is kept)
    near_dedup: bool = True  # drop near duplicates: a document whose MinHash LSH candidate comes earlier in corpus order
    near_dedup_threshold: float = 0.8  # Jaccard similarity of word shingles the LSH bands are tuned for
    near_dedup_permutations: int = 128  # MinHash permutations (signature length); more is finer and slower
    near_dedup_shingle_words: int = 5  # words per shingle
    redact: bool = True  # replace personal data and secrets with <EMAIL>, <SECRET>, ... (raylm/core/redact.py); drop documents mostly secrets
    quality_filter: bool = True  # drop documents that fail the quality rules of their kind, code or prose (data/quality.py)
    quality: QualityConfig = field(default_factory=QualityConfig)  # the rules' thresholds, e.g. quality.min_words=20
    decontaminate: bool = True  # drop train documents that share a run of decontaminate_ngram words with the val split or an evaluation set
    decontaminate_ngram: int = 13  # words (split on whitespace) in the shared run that marks a train document contaminated (GPT-3: 13)
    decontaminate_against: list[str] = field(default_factory=list)  # evaluation sets, each a source as --source takes one, e.g. decontaminate_against=[evals/qa.jsonl]
    decontaminate_text_field: str = "text"  # the field (or column) of the evaluation sets' records that holds the text
    max_doc_bytes: int = 4_000_000  # a larger single document is an error (likely a mistake in the source)
    shard_tokens: int = 4_194_304  # about this many tokens per Parquet shard
    partition_bytes: int = 16_000_000  # input text per hash partition: one worker task dedups, packs and writes each; each drops its own tail
    chunk_chars: int = DEFAULT_CHUNK_CHARS  # documents are encoded in chunks of about this many characters
    overwrite: bool = False  # replace an existing dataset dir (otherwise a complete one is kept)
    address: str | None = None  # Ray cluster to join (default: RAY_ADDRESS, or start a local one)

    def validate(self) -> None:
        if self.seq_len < 1:
            raise UserError(f"--seq-len must be at least 1, got {self.seq_len}")
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_docs is not None and self.max_docs < 1:
            raise UserError(f"--max-docs must be at least 1, got {self.max_docs}")
        if not 0 < self.near_dedup_threshold < 1:
            raise UserError(f"--near-dedup-threshold must be in (0, 1), got {self.near_dedup_threshold}")
        for name in ("tokenizer_sample_bytes", "max_doc_bytes", "shard_tokens", "partition_bytes", "chunk_chars",
                     "near_dedup_permutations", "near_dedup_shingle_words", "decontaminate_ngram"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if "://" in self.out and "/" not in self.out.split("://", 1)[1].strip("/"):
            raise UserError(f"--out {self.out!r}: name a dir inside the bucket (e.g. {self.out.rstrip('/')}/datasets/stdlib), "
                            "not the bucket itself")
        if self.decontaminate_against and not self.decontaminate:
            raise UserError("decontaminate_against names evaluation sets, but --no-decontaminate turns decontamination off; drop one of them")


def parse_args(argv: list[str] | None) -> PrepareConfig:
    parser = argparse.ArgumentParser(prog="raylm prepare", description=__doc__.split("\n\n")[0])
    add_config_flags(parser, PrepareConfig)
    args = parse_command_line(parser, argv)
    return from_dict(PrepareConfig, apply_overrides({}, [*override_pairs(args.overrides), *config_values(args).items()]))


# ---- output dir -----------------------------------------------------------------------------------


def existing_dataset(out: str | Path, overwrite: bool) -> dict | None:
    """The manifest of a complete dataset already at `out` (kept), or None when we may write there."""
    if overwrite or not storage.exists(out) or (storage.is_dir(out) and not storage.list_dir(out)):
        return None
    try:
        return read_dataset_manifest(out)
    except UserError as err:
        raise UserError(f"--out {str(out)!r} exists and is not a complete dataset dir ({err}); pass --overwrite to replace it") from None


# ---- pipeline -------------------------------------------------------------------------------------


def in_corpus_order(dataset):
    """Output blocks in input order whatever the task scheduling (for the tokenizer's sample and
    --max-docs, which take the corpus's first documents); Ray's progress bars in a terminal only."""
    dataset.context.execution_options.preserve_order = True
    return with_progress_bars(dataset)


def with_progress_bars(dataset):
    dataset.context.enable_progress_bars = sys.stderr.isatty()
    # Ray Data reserves half the CPUs for its operators in equal shares by default. Ahead of the
    # hash shuffle's operators, that kept the encode stage (nearly all the work) to one task at a
    # time on a 2-CPU cluster, and to about two thirds of any cluster. Our operators are plain
    # tasks that give their CPUs back, so none can starve the others for good.
    dataset.context.op_resource_reservation_enabled = False
    return dataset


def raise_first_error(batch) -> None:
    errors = batch.column("error")
    if errors.null_count < len(errors):
        raise UserError(next(e for e in errors.to_pylist() if e is not None))


def tokenizer_sample(documents, sample_bytes: int) -> list[str]:
    """The corpus's first documents, in its order, up to `sample_bytes` of text."""
    texts: list[str] = []
    size = 0
    for batch in in_corpus_order(documents).iter_batches(batch_format="pyarrow", batch_size=None):
        raise_first_error(batch)
        for text in batch.column("text").to_pylist():
            if text is None:
                continue
            texts.append(text)
            size += len(text)
            if size >= sample_bytes:
                return texts
    return texts


def make_tokenizer(cfg: PrepareConfig, documents):
    """(tokenizer, description for the manifest): the reused one, or a BPE trained on a sample."""
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer), {"reused": str(Path(cfg.tokenizer).resolve())}
    texts = tokenizer_sample(documents, cfg.tokenizer_sample_bytes)
    if not texts:
        raise UserError(f"--source {cfg.source!r}: no document to train the tokenizer on (all empty or skipped)")
    tokenizer = train_tokenizer(texts, cfg.vocab_size)
    return tokenizer, {"trained": {"vocab_size": cfg.vocab_size, "sample_documents": len(texts), "sample_chars": sum(map(len, texts))}}


def near_dedup_settings(cfg: PrepareConfig) -> dict:
    """document_band_keys' arguments: the shingles, the permutations and the LSH bands for the threshold."""
    bands, rows = lsh_params(cfg.near_dedup_threshold, cfg.near_dedup_permutations)
    return {"shingle_words": cfg.near_dedup_shingle_words, "permutations": cfg.near_dedup_permutations, "bands": bands, "rows": rows}


def plan_partitions(cfg: PrepareConfig, corpus: Corpus) -> int:
    """Hash partitions of dedup + packing: one per `partition_bytes` of input (a --max-docs sample's
    size estimated from the corpus's bytes per file). A function of the input and settings only, never
    of the cluster, so that the shards are too."""
    size = corpus.approx_bytes
    if cfg.max_docs is not None:
        size = min(size, cfg.max_docs * corpus.approx_bytes / max(corpus.files, 1))
    return max(1, math.ceil(size / cfg.partition_bytes))


def gather_documents(records: list[dict], redact: bool) -> dict:
    """The partitions' document counts summed; the first error in corpus order raised."""
    order, message = min((tuple(record["error"]) for record in records), default=NO_ERROR)
    if message is not None:
        raise UserError(message)
    read = sum(record["read"] for record in records)
    skipped = sum((Counter(record["skipped"]) for record in records), Counter())
    counts = {"read": read, "kept": read - sum(skipped.values()), "skipped": dict(sorted(skipped.items()))}
    if redact:
        counts["redacted"] = {p: sum(record["redacted"][p] for record in records) for p in records[0]["redacted"]} if records else {}
    return counts


def gather_split(records: list[dict], split: str) -> dict:
    """One split's manifest entry from the partitions' (in partition order): shards listed partition by partition."""
    entries = [(record["partition"], record["splits"][split]) for record in records]
    entry = {key: sum(part[key] for _, part in entries) for key in ("documents", "sequences", "tokens", "tail_tokens_dropped")}
    entry["shards"] = [shard | {"partition": partition} for partition, part in entries for shard in part["shards"]]
    return entry


def gather_packing(records: list[dict], partitions: int, produced: int) -> dict:
    """What each partition dropped as tail and who wrote it (a side record: not needed to read the data)."""
    tail = sum(record["splits"][split]["tail_tokens_dropped"] for record in records for split in SPLITS)
    return {
        "partitions": partitions,
        "tail_share": round(tail / max(produced, 1), 6),
        "by_partition": [
            {
                "partition": record["partition"],
                "documents_read": record["read"],
                "tail_tokens_dropped": {split: record["splits"][split]["tail_tokens_dropped"] for split in SPLITS},
                "written_by": record["writer"],
            }
            for record in records
        ],
    }


def check_splits(cfg: PrepareConfig, documents: dict, splits: dict) -> None:
    if documents["kept"] == 0:
        raise UserError(f"--source {cfg.source!r}: no document left after cleaning (read {documents['read']}, skipped {documents['skipped']})")
    row = cfg.seq_len + 1
    for split in ("train", "val"):
        if split == "val" and cfg.val_fraction == 0:
            continue
        if splits[split]["sequences"] == 0:
            raise UserError(
                f"the {split} split has {splits[split]['tail_tokens_dropped']} tokens from {splits[split]['documents']} documents, "
                f"fewer than one row of seq_len + 1 = {row}; use more documents (--max-docs), a smaller --seq-len"
                + (" or a larger --val-fraction" if split == "val" else "")
            )


def build_manifest(cfg, corpus: Corpus, tokenizer, tokenizer_sha: str, tokenizer_info: dict, dtype: str, records: list[dict],
                   partitions: int, decontamination: dict | None, seconds: float) -> dict:
    documents = gather_documents(records, cfg.redact)
    redacted_documents = {p: sum(record["redacted_documents"][p] for record in records) for p in PLACEHOLDERS} if cfg.redact else None
    switches = {"dedup": cfg.dedup, "near_dedup": cfg.near_dedup, "quality_filter": cfg.quality_filter}
    cleaning = cleaning_section(switches, documents["skipped"], documents.get("redacted"), redacted_documents, merge_examples(records), decontamination)
    splits = {split: gather_split(records, split) for split in SPLITS}
    check_splits(cfg, documents, splits)
    produced = sum(record["splits"][split]["tokens_in"] for record in records for split in SPLITS)
    written = sum(entry["tokens"] for entry in splits.values())
    tail = sum(entry["tail_tokens_dropped"] for entry in splits.values())
    assert written + tail == produced, "packing lost tokens"
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("source", "out", "overwrite", "address")}
    return {
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "source": corpus.description,
        "seq_len": cfg.seq_len,
        "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
        "dtype": dtype,
        "tokenizer_sha256": tokenizer_sha,
        "tokenizer": tokenizer_info,
        "special_tokens": special_token_map(tokenizer),
        "documents": documents,
        "tokens": {"produced": produced, "separators": documents["kept"], "written": written, "tail_dropped": tail},
        "splits": splits,
        "packing": gather_packing(records, partitions, produced),
        **({"near_dedup": near_dedup_settings(cfg) | {"threshold": cfg.near_dedup_threshold}} if cfg.near_dedup else {}),
        "cleaning": cleaning,
        "settings": settings,
        "created_by": f"raylm prepare {__version__}",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 2),
    }


def evaluation_sets(cfg: PrepareConfig) -> dict[str, Corpus]:
    """decontaminate_against's sources, resolved (listed) before any work; a bad one names the key."""
    sets = {}
    for index, spec in enumerate(cfg.decontaminate_against):
        try:
            sets[spec] = resolve_source(spec, cfg.decontaminate_text_field)
        except UserError as err:
            raise UserError(f"decontaminate_against[{index}]: {err} (each entry is an evaluation set as --source takes one: a .jsonl, "
                            "text or Parquet file, a dir, a glob, hf:NAME or a URI; its text in decontaminate_text_field)") from None
    return sets


def survey_corpus(cfg: PrepareConfig, documents, eval_sets: dict[str, Corpus], partitions: int):
    """The first pass (data/first_pass.py). Returns (the survey for near-dedup's marks, or None;
    encode_documents' `decontaminate` argument, or None; the manifest's record of what was compared)."""
    quality = asdict(cfg.quality) if cfg.quality_filter else None
    ngram = cfg.decontaminate_ngram if cfg.decontaminate else None
    sets = {name: with_progress_bars(corpus.documents(cfg.max_doc_bytes)) for name, corpus in eval_sets.items()}
    survey, reference, record = first_pass(documents, sets, partitions, quality, near_dedup_settings(cfg) if cfg.near_dedup else None,
                                           ngram, cfg.val_fraction)
    if not cfg.decontaminate:
        return survey, None, None
    if record["error"] is not None:
        name, message = record["error"]
        raise UserError(f"decontaminate_against {name!r}: {message}")
    info = {"ngram_words": cfg.decontaminate_ngram, "against": record["documents"], "reference_ngrams": record["ngrams"]}
    decontaminate = {"ngram": cfg.decontaminate_ngram, "reference": reference, "val_fraction": cfg.val_fraction} if reference else None
    return (survey if cfg.near_dedup else None), decontaminate, info


def build_dataset(cfg: PrepareConfig, corpus: Corpus, tmp: str | Path, started: float, eval_sets: dict[str, Corpus]) -> dict:
    documents = corpus.documents(cfg.max_doc_bytes)
    if cfg.max_docs is not None:
        documents = in_corpus_order(documents).limit(cfg.max_docs)
    tokenizer, tokenizer_info = make_tokenizer(cfg, documents)
    dtype = "uint16" if tokenizer.get_vocab_size(with_added_tokens=True) <= 65536 else "uint32"
    with storage.staged_locally(storage.child(tmp, "tokenizer")) as tokenizer_dir:
        tokenizer_sha = save_tokenizer(tokenizer, tokenizer_dir, cfg.seq_len)
    documents = with_progress_bars(documents)
    partitions = plan_partitions(cfg, corpus)
    survey, decontaminate, decontamination = survey_corpus(cfg, documents, eval_sets, partitions)
    encoded = documents.map_batches(
        encode_documents,
        batch_format="pyarrow",
        fn_kwargs={"tokenizer_json": tokenizer.to_str(), "id_dtype": dtype, "chunk_chars": cfg.chunk_chars, "redact": cfg.redact,
                   "quality": asdict(cfg.quality) if cfg.quality_filter else None, "decontaminate": decontaminate},
    )
    rows_per_shard = max(1, cfg.shard_tokens // (cfg.seq_len + 1))
    records = pack_on_workers(encoded, partitions, tmp, cfg.seq_len, dtype, rows_per_shard, cfg.val_fraction, cfg.dedup, survey)
    manifest = build_manifest(cfg, corpus, tokenizer, tokenizer_sha, tokenizer_info, dtype, records, partitions, decontamination,
                              time.perf_counter() - started)
    storage.write_bytes(storage.child(tmp, MANIFEST), json.dumps(manifest, indent=2) + "\n")  # last: the dir is complete
    return manifest


def run_prepare(cfg: PrepareConfig) -> dict:
    """Build the dataset dir `cfg.out` (or keep a complete one); return its manifest."""
    from raylm.core.ray_cluster import init_ray

    started = time.perf_counter()
    out = cfg.out.rstrip("/") if storage.is_uri(cfg.out) else Path(cfg.out)
    kept = existing_dataset(out, cfg.overwrite)
    if kept is not None:
        print(f"kept the existing dataset at {out} ({kept['source']}, seq_len {kept['seq_len']}); pass --overwrite to rebuild it")
        return kept
    corpus = resolve_source(cfg.source, cfg.text_field)
    eval_sets = evaluation_sets(cfg)
    init_ray(cfg.address)
    with storage.dir_written_whole(out) as tmp:  # on object storage: built in place, manifest.json last
        manifest = build_dataset(cfg, corpus, tmp, started, eval_sets)
    print("\n".join(["cleaning:", *report_lines(manifest["cleaning"])]))
    print(summary(str(out), manifest))
    return manifest


def summary(out: str, manifest: dict) -> str:
    docs = manifest["documents"]
    skipped = ", ".join(f"{reason} {n}" for reason, n in docs["skipped"].items()) or "none"
    tokens = manifest["tokens"]["produced"]
    seconds = manifest["seconds"]
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    redacted = ", ".join(f"{p} {n}" for p, n in docs.get("redacted", {}).items() if n)
    return (
        f"prepared {out}: {docs['read']} documents read, {docs['kept']} kept (skipped: {skipped}); "
        + (f"redacted: {redacted}; " if "redacted" in docs else "") +
        f"{tokens:,} tokens -> {train['sequences']:,} train + {val['sequences']:,} val rows of {manifest['seq_len'] + 1} "
        f"({manifest['packing']['partitions']} partitions, {manifest['tokens']['tail_dropped']:,} tail tokens dropped); "
        f"{seconds:.1f} s, {tokens / max(seconds, 1e-9):,.0f} tokens/s"
    )


def main(argv: list[str] | None = None) -> int:
    run_prepare(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
