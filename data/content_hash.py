"""A document's content hash, and the split it chooses.

The hash (blake2b-128 of the UTF-8 text as read) drives exact dedup, the hash partitions
(data/partition_pack.py) and the train/val split; decontamination (data/decontaminate.py) needs the
split before packing, so both live here, below the stages that use them.
"""

from __future__ import annotations

import hashlib


def content_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def is_val(digest: bytes, val_fraction: float) -> bool:
    """The top 64 bits of the hash against `val_fraction` (partitions use the next 64: independent choices)."""
    return int.from_bytes(digest[:8], "big") < int(val_fraction * 2**64)
