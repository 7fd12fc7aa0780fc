"""Helpers for the pretraining tests: reading a W&B offline run file."""

from __future__ import annotations

import json
from pathlib import Path


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
