"""`raylm prepare-chat`: chat records -> a chat dataset dir of packed SFT rows, built on Ray Data.

    raylm prepare-chat --source stdlib|FILE.jsonl|DIR|GLOB --tokenizer BASE_MODEL_DIR --out DIR [--seq-len 512]
    raylm prepare-chat --source stdlib --out FILE.jsonl      # the embedded chat set as JSONL records

The driver only plans: it lists the sources and writes the manifest. Ray Data's workers read the
JSONL lines (a task per file, line numbers kept), check each record (data/chat.py's rules),
encode, split, pack (data/chat_rows.py) and write Parquet shards, a batch of
`records_per_shard` records at a time, and return only counts and shard records. The split is
per record, by a hash of its messages salted with `split_seed`, so it does not depend on how the
records fall into batches. A dir:

    DIR/manifest.json          kind raylm.chat_dataset: settings, counts per split and per skip
                               reason (with the first file:line of each), the shards (written last:
                               its presence means the dir is complete)
    DIR/train/*.parquet        input_ids, loss_mask, segment_ids: rows of exactly seq_len + 1
    DIR/val/*.parquet

Shards are named by a hash of their rows, so the same input and settings give the same files.
`raylm finetune --data` takes such a dir, or a JSONL file it turns into one first.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa

from raylm import __version__
from raylm.core import storage
from raylm.core.cli_args import add_config_flags, config_values, parse_command_line
from raylm.core.config import from_dict
from raylm.core.entry import run_main
from raylm.core.errors import UserError
from raylm.core.files import file_sha256
from raylm.data.chat import record_messages
from raylm.data.chat_corpus import build_chat_records, write_jsonl_atomically
from raylm.data.chat_rows import encode_rows, load_base_tokenizer
from raylm.data.pack import ROW_GROUP_ROWS

KIND = "raylm.chat_dataset"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
EXAMPLE_LINES = 20  # file:line examples kept per skip reason
COUNT_KEYS = ("conversations", "rows", "truncated", "dropped_overlong", "dropped_no_target", "tokens", "target_tokens", "pad_tokens")


@dataclass
class ChatDatasetConfig:
    source: str  # stdlib (the embedded chat set) | a .jsonl file, a dir of them or a glob
    out: str  # the chat dataset dir to write; FILE.jsonl with --source stdlib writes the embedded records instead
    tokenizer: str | None = None  # the base model dir whose tokenizer encodes the rows (needed for a dataset dir)
    seq_len: int = 512  # tokens a model sees per row; rows hold seq_len + 1 ids
    val_fraction: float = 0.05  # share of records (by a hash of their messages) held out for the SFT val loss
    split_seed: int = 0  # salt of that hash: another seed, another split
    overlong: Literal["truncate", "drop"] = "truncate"  # conversations longer than seq_len+1 tokens: cut the end, or drop
    pack: bool = True  # several conversations per row (attention kept within each); false = one per row, padded
    max_records: int | None = None  # read only the first N records (lines) in source order
    records_per_shard: int = 4096  # records a worker encodes, packs and writes as one shard per split
    overwrite: bool = False  # replace an existing dir (otherwise a complete one with the same settings is kept)
    address: str | None = None  # Ray cluster to join (default: RAY_ADDRESS, or start a local one)

    def validate(self) -> None:
        if self.seq_len < 1:
            raise UserError(f"--seq-len must be at least 1, got {self.seq_len}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        for name in ("max_records", "records_per_shard"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.out.endswith(".jsonl"):
            if self.source != "stdlib":
                raise UserError(f"--out {self.out!r}: JSONL output is the embedded chat set only (--source stdlib); "
                                "for your records, write a chat dataset dir (--out DIR --tokenizer BASE_MODEL_DIR)")
        elif not self.tokenizer:
            raise UserError("--tokenizer is required for a chat dataset dir: the base model dir whose tokenizer encodes the rows "
                            "(or --out FILE.jsonl to write the embedded records only)")


def settings_of(cfg: ChatDatasetConfig) -> dict:
    """What decides the rows: two dirs built with equal settings and tokenizer hold the same rows."""
    return {k: v for k, v in asdict(cfg).items() if k in ("seq_len", "val_fraction", "split_seed", "overlong", "pack", "max_records")}


# ---- sources --------------------------------------------------------------------------------------


def chat_files(source: str) -> list[str]:
    """The .jsonl files of a file, a dir (its *.jsonl, recursively) or a glob, sorted."""
    path = Path(source).expanduser()
    if path.is_file():
        return [str(path.resolve())]
    if path.is_dir():
        files = sorted(str(p.resolve()) for p in path.rglob("*.jsonl"))
        if not files:
            raise UserError(f"--source {source!r} is a dir with no .jsonl file")
        return files
    files = sorted(str(Path(p).resolve()) for p in glob.glob(source, recursive=True) if Path(p).is_file())
    if not files:
        raise UserError(f"--source {source!r}: no such file, dir or glob match (expected stdlib or chat JSONL records)")
    return files


def read_lines(row: dict) -> list[dict]:
    """Ray Data flat_map: one file -> its non-blank lines, each with its file and line number."""
    out = []
    with open(row["path"], "rb") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                out.append({"where": f"{row['path']}:{number}", "line": line})
    return out


def record_lines(cfg: ChatDatasetConfig):
    """A Ray Dataset of {where, line}: the records in source order, not yet parsed."""
    import ray.data

    if cfg.source == "stdlib":
        records = build_chat_records()
        lines = ray.data.from_items([{"where": f"stdlib:{i}", "line": json.dumps(r, ensure_ascii=False).encode()}
                                     for i, r in enumerate(records, start=1)])
    else:
        files = chat_files(cfg.source)
        lines = ray.data.from_items([{"path": p} for p in files], override_num_blocks=len(files)).flat_map(read_lines)
    lines.context.execution_options.preserve_order = True  # "the first N records" and the shard contents stay fixed
    lines.context.enable_progress_bars = False
    return lines.limit(cfg.max_records) if cfg.max_records else lines


# ---- the worker's part ----------------------------------------------------------------------------

_TOKENIZERS: dict[str, object] = {}


def cached_tokenizer(tokenizer_json: str):
    from tokenizers import Tokenizer

    key = hashlib.sha256(tokenizer_json.encode()).hexdigest()
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = Tokenizer.from_str(tokenizer_json)
    return _TOKENIZERS[key]


def parse_line(line: bytes) -> tuple[list | None, str | None]:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, "not_json"
    return record_messages(record)


def in_val(messages: list, seed: int, fraction: float) -> bool:
    text = f"{seed}\n" + json.dumps(messages, sort_keys=True, ensure_ascii=False)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") < fraction * 2**64


def list_column(rows: np.ndarray, value_type: pa.DataType) -> pa.Array:
    n, width = rows.shape
    offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(rows.reshape(-1), type=value_type))


def write_shard(rows: list[dict], split: str, out_dir: str, id_dtype: str) -> dict:
    """Rows -> `out_dir/<split>/<split>-<hash of the rows>.parquet`; its manifest record."""
    ids = np.stack([r["input_ids"] for r in rows]).astype(id_dtype)
    mask = np.stack([r["loss_mask"] for r in rows])
    segments = np.stack([r["segment_ids"] for r in rows]).astype(np.uint16)
    digest = hashlib.blake2b(ids.tobytes() + mask.tobytes() + segments.tobytes(), digest_size=8).hexdigest()
    relative = f"{split}/{split}-{digest}.parquet"
    table = pa.table({"input_ids": list_column(ids, pa.from_numpy_dtype(ids.dtype)), "loss_mask": list_column(mask, pa.bool_()),
                      "segment_ids": list_column(segments, pa.uint16())})
    sha256 = storage.write_parquet(table, storage.join(out_dir, relative), compression="zstd", row_group_size=ROW_GROUP_ROWS)
    return {"path": relative, "rows": len(rows), "sha256": sha256}


def encode_chat_batch(batch: pa.Table, tokenizer_json: str, pad_id: int, id_dtype: str, settings: dict, out_dir: str) -> pa.Table:
    """Ray Data UDF: a batch of record lines -> a shard per split, and one row of what happened."""
    tokenizer = cached_tokenizer(tokenizer_json)
    splits: dict[str, list] = {split: [] for split in SPLITS}
    skipped: dict[str, list[str]] = {}
    for where, line in zip(batch.column("where").to_pylist(), batch.column("line").to_pylist()):
        messages, reason = parse_line(line)
        if reason is not None:
            skipped.setdefault(reason, []).append(where)
            continue
        splits["val" if in_val(messages, settings["split_seed"], settings["val_fraction"]) else "train"].append(messages)
    result: dict = {"records": len(batch), "skipped": skipped, "splits": {}}
    for split, records in splits.items():
        encoded = encode_rows(records, tokenizer, settings["seq_len"], pad_id, settings["overlong"], settings["pack"])
        result["splits"][split] = {"counts": encoded.counts, "shard": write_shard(encoded.rows, split, out_dir, id_dtype) if encoded.rows else None}
    return pa.table({"result": [json.dumps(result)]})


# ---- the driver's part ----------------------------------------------------------------------------


def merge_results(results: list[dict]) -> dict:
    """The batches' counts summed, skip examples kept in source order, shards sorted by name."""
    skipped: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    splits = {split: {"counts": Counter(), "shards": []} for split in SPLITS}
    for result in results:
        for reason, wheres in result["skipped"].items():
            skipped[reason] += len(wheres)
            examples.setdefault(reason, []).extend(wheres[: EXAMPLE_LINES - len(examples.get(reason, []))])
        for split, part in result["splits"].items():
            splits[split]["counts"].update(part["counts"])
            if part["shard"]:
                splits[split]["shards"].append(part["shard"])
    return {
        "records": sum(r["records"] for r in results),
        "skipped_lines": dict(sorted(skipped.items())),
        "skipped_examples": dict(sorted(examples.items())),
        "splits": {split: {**{k: part["counts"].get(k, 0) for k in COUNT_KEYS},
                           "sequences": part["counts"].get("rows", 0),
                           "shards": sorted(part["shards"], key=lambda s: s["path"])}
                   for split, part in splits.items()},
    }


def build_chat_dataset(cfg: ChatDatasetConfig, tmp: str | Path, started: float) -> dict:
    tokenizer, pad_id = load_base_tokenizer(cfg.tokenizer)
    id_dtype = "uint16" if tokenizer.get_vocab_size(with_added_tokens=True) <= 65536 else "uint32"
    settings = settings_of(cfg)
    encoded = record_lines(cfg).map_batches(
        encode_chat_batch, batch_size=cfg.records_per_shard, batch_format="pyarrow",
        fn_kwargs={"tokenizer_json": tokenizer.to_str(), "pad_id": pad_id, "id_dtype": id_dtype, "settings": settings,
                   "out_dir": str(tmp)},
    )
    results = [json.loads(text) for batch in encoded.iter_batches(batch_format="pyarrow", batch_size=None)
               for text in batch.column("result").to_pylist()]
    merged = merge_results(results)
    good = merged["records"] - sum(merged["skipped_lines"].values())
    if good == 0:
        raise UserError(f"--source {cfg.source!r} has no usable record (skipped: {merged['skipped_lines'] or 'no lines'}); expected JSON "
                        'lines like {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}')
    if merged["splits"]["train"]["rows"] == 0:
        raise UserError(f"--source {cfg.source!r}: no conversation fits seq_len={cfg.seq_len} with an assistant token to train "
                        f"({merged['splits']['train']})")
    tokenizer_file = Path(cfg.tokenizer) / "tokenizer.json" if Path(cfg.tokenizer).is_dir() else Path(cfg.tokenizer)
    manifest = {
        "kind": KIND, "format_version": FORMAT_VERSION, "source": cfg.source, "seq_len": cfg.seq_len,
        "tokenizer": str(Path(cfg.tokenizer).resolve()), "tokenizer_sha256": file_sha256(tokenizer_file), "pad_id": pad_id,
        "dtype": id_dtype, "settings": settings, **merged,
        "created_by": f"raylm prepare-chat {__version__}", "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - started, 2),
    }
    storage.write_bytes(storage.join(tmp, MANIFEST), json.dumps(manifest, indent=2) + "\n")  # last: the dir is complete
    return manifest


def read_chat_dataset(dataset_dir: str | Path) -> dict:
    """Validate `dataset_dir/manifest.json` (a chat dataset) and the shards it lists; return it."""
    path = storage.join(dataset_dir, MANIFEST)
    if not storage.is_file(path):
        raise UserError(f"{str(dataset_dir)!r} is not a complete chat dataset dir (no {MANIFEST}; an interrupted `raylm prepare-chat`?)")
    try:
        manifest = json.loads(storage.read_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise UserError(f"{path}: kind is {manifest.get('kind') if isinstance(manifest, dict) else None!r}; expected {KIND!r} "
                        "(a dir written by `raylm prepare-chat --tokenizer ...`)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: format_version {manifest.get('format_version')!r}; this raylm reads version {FORMAT_VERSION}")
    present = storage.files_under(dataset_dir)  # one listing: on object storage, not a request per shard
    for split in SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            if shard["path"] not in present:
                raise UserError(f"{path}: splits.{split} lists {shard['path']!r}, which does not exist")
    return manifest


def shard_paths(dataset_dir: str | Path, manifest: dict, split: str) -> list[str]:
    return [storage.join(dataset_dir, shard["path"]) for shard in manifest["splits"][split]["shards"]]


def is_chat_dataset(path: str | Path) -> bool:
    return storage.is_file(storage.join(path, MANIFEST))


def existing_chat_dataset(cfg: ChatDatasetConfig) -> dict | None:
    """The manifest of a complete dir at --out built from the same source, tokenizer and settings (kept), else None."""
    out = cfg.out
    if cfg.overwrite or not storage.exists(out) or (storage.is_dir(out) and not storage.list_dir(out)):
        return None
    manifest = read_chat_dataset(out) if is_chat_dataset(out) else None
    if manifest is None:
        raise UserError(f"--out {cfg.out!r} exists and is not a chat dataset dir; pass --overwrite to replace it")
    tokenizer_file = Path(cfg.tokenizer) / "tokenizer.json" if Path(cfg.tokenizer).is_dir() else Path(cfg.tokenizer)
    same = (manifest["settings"] == settings_of(cfg) and manifest["source"] == cfg.source
            and manifest["tokenizer_sha256"] == file_sha256(tokenizer_file))
    if not same:
        raise UserError(f"--out {cfg.out!r} holds a chat dataset built from another source, tokenizer or settings "
                        f"({manifest['source']}, {manifest['settings']}); pass --overwrite to rebuild it")
    return manifest


def prepare_chat_dataset(cfg: ChatDatasetConfig) -> dict:
    """Build the chat dataset dir `cfg.out` (or keep a complete, identical one); return its manifest."""
    from raylm.core.ray_cluster import init_ray

    started = time.perf_counter()
    kept = existing_chat_dataset(cfg)
    if kept is not None:
        print(f"kept the chat dataset at {cfg.out} (same source, tokenizer and settings); pass --overwrite to rebuild it")
        return kept
    init_ray(cfg.address)
    with storage.dir_written_whole(cfg.out) as tmp:  # on object storage: built in place, manifest.json last
        manifest = build_chat_dataset(cfg, tmp, started)
    print(summary(cfg.out, manifest))
    return manifest


def summary(out: str, manifest: dict) -> str:
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    skipped = ", ".join(f"{reason} {n}" for reason, n in manifest["skipped_lines"].items()) or "none"
    real = train["tokens"] / max(train["rows"] * (manifest["seq_len"] + 1), 1)
    return (f"prepared {out}: {manifest['records']} records (skipped: {skipped}) -> {train['conversations']} train conversations in "
            f"{train['rows']} rows ({real:.0%} real tokens), {val['conversations']} val in {val['rows']} rows of "
            f"{manifest['seq_len'] + 1}; {train['truncated'] + val['truncated']} truncated; {manifest['seconds']:.1f} s")


# ---- the command ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> ChatDatasetConfig:
    parser = argparse.ArgumentParser(prog="raylm prepare-chat", description=__doc__.split("\n\n")[0])
    add_config_flags(parser, ChatDatasetConfig)
    return from_dict(ChatDatasetConfig, config_values(parse_command_line(parser, argv)))


def write_embedded_records(cfg: ChatDatasetConfig) -> None:
    records = build_chat_records(cfg.max_records)
    write_jsonl_atomically(records, Path(cfg.out))
    multi_turn = sum(1 for r in records if sum(m["role"] == "assistant" for m in r["messages"]) > 1)
    with_system = sum(1 for r in records if r["messages"][0]["role"] == "system")
    print(f"wrote {len(records)} chat records to {cfg.out} ({multi_turn} two-turn, {with_system} with a system prompt)")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    if cfg.out.endswith(".jsonl"):
        write_embedded_records(cfg)
    else:
        if cfg.tokenizer and storage.is_uri(cfg.tokenizer):  # a base model dir on object storage: read from a local copy
            cfg.tokenizer = storage.local_dir(cfg.tokenizer)
        prepare_chat_dataset(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
