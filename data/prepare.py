"""`raylm prepare --source SRC --out DIR`: a corpus -> a dataset dir (tokenizer + packed shards).

The pipeline: Ray Data reads and cleans documents and tokenizes them in parallel tasks (fused
read -> parse -> encode, so no CPU waits on another stage); the driver consumes the encoded
documents in corpus order (`preserve_order`), drops exact duplicates, assigns each document to
train or val by its content hash, packs each split into rows of `seq_len + 1` ids and writes
Parquet shards. Packing on the driver is cheap (it only concatenates arrays; tokenizing is the
work) and makes the output independent of task scheduling: the same inputs give byte-identical
shards.

Everything is built in a hidden temporary dir next to `--out`, `manifest.json` last, and renamed
into place at the end, so an interrupted run never leaves a dir that looks complete.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.compute as pc

from raylm import __version__
from raylm.core.cli_args import add_config_flags, config_values, parse_command_line
from raylm.core.config import from_dict
from raylm.core.entry import run_main
from raylm.core.errors import UserError
from raylm.core.files import atomic_dir
from raylm.core.redact import PLACEHOLDERS
from raylm.data.dataset_dir import FORMAT_VERSION, KIND, MANIFEST, read_dataset_manifest
from raylm.data.encode import DEFAULT_CHUNK_CHARS, encode_documents, redaction_column
from raylm.data.pack import ShardWriter
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
    out: str  # the dataset dir to write (a local or mounted path)
    seq_len: int = 256  # tokens a model sees per row; rows hold seq_len + 1 ids (inputs + shifted targets)
    vocab_size: int = 8192  # size of the BPE to train, special tokens included (ignored with `tokenizer`)
    tokenizer: str | None = None  # reuse this tokenizer.json or HF tokenizer dir instead of training one
    tokenizer_sample_bytes: int = 8_000_000  # text the BPE is trained on: the corpus's first documents, in its order
    text_field: str = "text"  # the field of .jsonl/.json records, the column of .parquet and hf: datasets
    val_fraction: float = 0.05  # share of documents (by content hash) that go to the val split
    max_docs: int | None = None  # read only the first N documents in corpus order (a fixed sample)
    dedup: bool = True  # drop exact duplicate documents (the first one in corpus order is kept)
    redact: bool = True  # replace personal data and secrets with <EMAIL>, <SECRET>, ... (raylm/core/redact.py); drop documents mostly secrets
    max_doc_bytes: int = 4_000_000  # a larger single document is an error (likely a mistake in the source)
    shard_tokens: int = 4_194_304  # about this many tokens per Parquet shard
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
        for name in ("tokenizer_sample_bytes", "max_doc_bytes", "shard_tokens", "chunk_chars"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if "://" in self.out:
            raise UserError(f"--out {self.out!r}: write the dataset to a local or mounted path (object-store output is not supported)")


def parse_args(argv: list[str] | None) -> PrepareConfig:
    parser = argparse.ArgumentParser(prog="raylm prepare", description=__doc__.split("\n\n")[0])
    add_config_flags(parser, PrepareConfig)
    return from_dict(PrepareConfig, config_values(parse_command_line(parser, argv)))


# ---- output dir -----------------------------------------------------------------------------------


def existing_dataset(out: Path, overwrite: bool) -> dict | None:
    """The manifest of a complete dataset already at `out` (kept), or None when we may write there."""
    if not out.exists() or overwrite:
        return None
    if out.is_dir() and not any(out.iterdir()):
        return None
    try:
        return read_dataset_manifest(out)
    except UserError as err:
        raise UserError(f"--out {str(out)!r} exists and is not a complete dataset dir ({err}); pass --overwrite to replace it") from None


# ---- pipeline -------------------------------------------------------------------------------------


def in_corpus_order(dataset):
    """Output blocks in input order whatever the task scheduling; our own progress bar only."""
    dataset.context.execution_options.preserve_order = True
    dataset.context.enable_progress_bars = False
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


def progress_bar(total: int | None):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="prepare", disable=None, file=sys.stderr)


def pack_documents(encoded, writers: dict[str, ShardWriter], cfg: PrepareConfig, total_bytes: int | None) -> dict:
    """Consume encoded documents in corpus order into the split writers; return document counts."""
    val_cut = int(cfg.val_fraction * 2**64)
    seen: set[bytes] = set()
    read = 0
    skipped: Counter[str] = Counter()
    redacted: Counter[str] = Counter()
    with progress_bar(total_bytes) as bar:
        for batch in in_corpus_order(encoded).iter_batches(batch_format="pyarrow", batch_size=None):
            raise_first_error(batch)
            ids = batch.column("ids").combine_chunks()
            offsets = ids.offsets.to_numpy()
            values = ids.values.to_numpy(zero_copy_only=False)
            for i, (skip, digest) in enumerate(zip(batch.column("skip").to_pylist(), batch.column("hash").to_pylist())):
                read += 1
                if skip is not None:
                    skipped[skip] += 1
                    continue
                if cfg.dedup:
                    if digest in seen:
                        skipped["duplicate"] += 1
                        continue
                    seen.add(digest)
                split = "val" if int.from_bytes(digest[:8], "big") < val_cut else "train"
                writers[split].add(values[offsets[i] : offsets[i + 1]])
            bar.update(sum(batch.column("text_bytes").to_pylist()))
            for placeholder in PLACEHOLDERS:  # of every document read, kept or not
                redacted[placeholder] += pc.sum(batch.column(redaction_column(placeholder))).as_py() or 0
    counts = {"read": read, "kept": read - sum(skipped.values()), "skipped": dict(sorted(skipped.items()))}
    return counts | ({"redacted": {p: redacted[p] for p in PLACEHOLDERS}} if cfg.redact else {})


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


def build_manifest(cfg, corpus: Corpus, tokenizer, tokenizer_sha: str, tokenizer_info: dict, documents: dict, writers: dict[str, ShardWriter], seconds: float) -> dict:
    splits = {split: writer.close() for split, writer in writers.items()}
    check_splits(cfg, documents, splits)
    produced = sum(writer.tokens_in for writer in writers.values())
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
        "dtype": writers["train"].dtype.name,
        "tokenizer_sha256": tokenizer_sha,
        "tokenizer": tokenizer_info,
        "special_tokens": special_token_map(tokenizer),
        "documents": documents,
        "tokens": {"produced": produced, "separators": documents["kept"], "written": written, "tail_dropped": tail},
        "splits": splits,
        "settings": settings,
        "created_by": f"raylm prepare {__version__}",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 2),
    }


def build_dataset(cfg: PrepareConfig, corpus: Corpus, tmp: Path, started: float) -> dict:
    documents = corpus.documents(cfg.max_doc_bytes)
    if cfg.max_docs is not None:
        documents = documents.limit(cfg.max_docs)
    tokenizer, tokenizer_info = make_tokenizer(cfg, documents)
    dtype = "uint16" if tokenizer.get_vocab_size(with_added_tokens=True) <= 65536 else "uint32"
    tokenizer_sha = save_tokenizer(tokenizer, tmp / "tokenizer", cfg.seq_len)
    encoded = documents.map_batches(
        encode_documents,
        batch_format="pyarrow",
        fn_kwargs={"tokenizer_json": tokenizer.to_str(), "id_dtype": dtype, "chunk_chars": cfg.chunk_chars, "redact": cfg.redact},
    )
    rows_per_shard = max(1, cfg.shard_tokens // (cfg.seq_len + 1))
    writers = {split: ShardWriter(tmp, split, cfg.seq_len, dtype, rows_per_shard) for split in ("train", "val")}
    doc_counts = pack_documents(encoded, writers, cfg, None if cfg.max_docs else corpus.approx_bytes)
    manifest = build_manifest(cfg, corpus, tokenizer, tokenizer_sha, tokenizer_info, doc_counts, writers, time.perf_counter() - started)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def run_prepare(cfg: PrepareConfig) -> dict:
    """Build the dataset dir `cfg.out` (or keep a complete one); return its manifest."""
    from raylm.core.ray_cluster import init_ray

    started = time.perf_counter()
    out = Path(cfg.out)
    kept = existing_dataset(out, cfg.overwrite)
    if kept is not None:
        print(f"kept the existing dataset at {out} ({kept['source']}, seq_len {kept['seq_len']}); pass --overwrite to rebuild it")
        return kept
    corpus = resolve_source(cfg.source, cfg.text_field)
    init_ray(cfg.address)
    with atomic_dir(out) as tmp:
        manifest = build_dataset(cfg, corpus, tmp, started)
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
        f"{tokens:,} tokens -> {train['sequences']:,} train + {val['sequences']:,} val rows of {manifest['seq_len'] + 1}; "
        f"{seconds:.1f} s, {tokens / max(seconds, 1e-9):,.0f} tokens/s"
    )


def main(argv: list[str] | None = None) -> int:
    run_prepare(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
