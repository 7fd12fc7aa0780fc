"""Helpers for the pretraining tests: a tiny dataset dir in the data stage's layout, W&B offline reading."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np


def make_dataset_dir(path: Path, tokenizer_dir: Path, seq_len: int = 32, train_rows: int = 256, val_rows: int = 32, seed: int = 0) -> Path:
    """A dataset dir with learnable rows: token ids of the tiny tokenizer's sample text, cut into windows."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tiny_artifacts import SAMPLE_TEXT
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    eot = tok.token_to_id("<|endoftext|>")
    stream: list[int] = []
    rng = np.random.default_rng(seed)
    while len(stream) < (train_rows + val_rows) * (seq_len + 1):
        stream += tok.encode(SAMPLE_TEXT[int(rng.integers(len(SAMPLE_TEXT)))]).ids + [eot]
    rows = np.array(stream[: (train_rows + val_rows) * (seq_len + 1)], dtype=np.uint16).reshape(-1, seq_len + 1)
    path.mkdir(parents=True, exist_ok=True)
    shutil_copy_tree(tokenizer_dir, path / "tokenizer")
    splits = {}
    for split, part in (("train", rows[:train_rows]), ("val", rows[train_rows:])):
        (path / split).mkdir(exist_ok=True)
        shards = []
        for i, chunk in enumerate(np.array_split(part, 2)):
            rel = f"{split}/{split}-{i:05d}.parquet"
            table = pa.table({"input_ids": pa.array(list(chunk), type=pa.list_(pa.uint16()))})
            pq.write_table(table, path / rel)
            shards.append({"path": rel, "rows": len(chunk), "sha256": hashlib.sha256((path / rel).read_bytes()).hexdigest()})
        splits[split] = {"sequences": len(part), "tokens": int(part.size), "shards": shards}
    manifest = {
        "kind": "raylm.dataset", "format_version": 1, "source": "test", "seq_len": seq_len,
        "vocab_size": tok.get_vocab_size(), "dtype": "uint16", "splits": splits,
        "tokenizer_sha256": hashlib.sha256((tokenizer_dir / "tokenizer.json").read_bytes()).hexdigest(),
        "documents": {"read": 0, "kept": 0, "skipped": {}}, "tokens": {"total": int(rows.size)},
        "created_by": "tests/pretrain_helpers.py",
        "special_tokens": {name: tok.token_to_id(f"<|{name}|>") for name in ("endoftext", "pad", "im_start", "im_end")},
    }
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return path


def shutil_copy_tree(src: Path, dst: Path) -> None:
    import shutil

    shutil.copytree(src, dst, dirs_exist_ok=True)


def read_wandb_history(run_file: Path) -> list[dict]:
    """The history rows of an offline `.wandb` file, decoded with the protobufs wandb ships.

    The file is a LevelDB-style log: a 7-byte header (":W&B", magic, version), then 32 KiB blocks
    of chunks, each with a 7-byte header (crc32, length uint16, type: 1 full, 2 first, 3 middle,
    4 last) and a piece of one serialized `Record`.
    """
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", f"{run_file} is not a W&B datastore file"
    block, pos, pending, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left_in_block = block - pos % block
        if left_in_block < 7:
            pos += left_in_block
            continue
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        kind = data[pos + 6]
        piece = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = piece if kind in (1, 2) else pending + piece
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
            pending = b""
    return rows
