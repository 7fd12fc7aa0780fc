"""Sizing the KV cache from a memory budget: how many blocks of `block_size` tokens it holds.

The budget is either given (`kv_cache_memory`, e.g. "2GiB") or a fraction of the device's free
memory once the weights are loaded (`kv_cache_fraction`); a fraction never takes more than
`max_batch_size` sequences of the full context would hold, since more would sit idle. Allocating
`max_batch_size x max_model_len` up front instead would take 64 GiB for the 7b recipe served with
serving/configs/serve.yaml (32 x 4096 tokens x 512 KiB a token in bf16) before the first request.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import torch

from raylm.core.errors import UserError
from raylm.model.transformer import ModelConfig

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str, name: str = "kv_cache_memory") -> int:
    """'2GiB', '512MiB', '1.5GB', '1048576' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in UNITS:
        raise UserError(f"{name} {text!r}: expected a size such as 2GiB, 512MiB or 4000000000 (bytes)")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


def format_size(size: int) -> str:
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        if size >= UNITS[unit.lower()]:
            return f"{size / UNITS[unit.lower()]:.2f} {unit}"
    return f"{size} B"


def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Keys and values of one token in every layer."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * torch.tensor([], dtype=dtype).element_size()


def free_memory(device: torch.device) -> int:
    """Bytes free on `device` now: CUDA's own count, or the host's available memory for the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass
class KVCachePlan:
    num_blocks: int
    block_size: int  # tokens per block
    block_bytes: int  # keys and values of one block, every layer
    source: str  # where the budget came from, for the start-up line
    dtype: str = "float32"  # what keys and values are stored as (kv_cache_dtype)

    @property
    def tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    def describe(self) -> str:
        return (f"KV cache: {self.num_blocks} blocks x {self.block_size} tokens = {self.tokens} tokens, "
                f"{format_size(self.bytes)} of {self.dtype} ({self.source})")


def plan_kv_cache(
    cfg: ModelConfig,
    dtype: torch.dtype,
    max_batch_size: int,
    max_len: int,
    block_size: int,
    memory: str = "",
    fraction: float = 0.9,
    free_bytes: int | None = None,
) -> KVCachePlan:
    """The blocks a budget holds: `memory` when given, else `fraction` of `free_bytes` (capped at
    `max_batch_size` full-length sequences). Refuses a budget that cannot hold one sequence of
    `max_len` tokens, naming both sizes."""
    block_bytes = bytes_per_token(cfg, dtype) * block_size
    blocks_per_sequence = math.ceil(max_len / block_size)
    if memory:
        budget, source = parse_size(memory), f"kv_cache_memory {memory}"
        num_blocks = budget // block_bytes
        setting = "raise kv_cache_memory (--kv-cache-memory)"
    else:
        if free_bytes is None:
            raise ValueError("free_bytes is needed when no kv_cache_memory is given")
        cap = max_batch_size * blocks_per_sequence
        num_blocks = min(int(free_bytes * fraction) // block_bytes, cap)
        source = f"{fraction:g} of {format_size(free_bytes)} free" + (f", capped at {max_batch_size} sequences x {max_len} tokens" if num_blocks == cap else "")
        setting = "free memory, set kv_cache_memory (--kv-cache-memory) or raise kv_cache_fraction"
    if num_blocks < blocks_per_sequence:
        raise UserError(
            f"the KV cache budget ({source}) holds {num_blocks * block_size} tokens ({format_size(num_blocks * block_bytes)}), "
            f"less than one sequence of max_model_len {max_len} tokens ({format_size(blocks_per_sequence * block_bytes)}); "
            f"{setting}, or lower max_model_len"
        )
    return KVCachePlan(num_blocks, block_size, block_bytes, source, str(dtype).removeprefix("torch."))
