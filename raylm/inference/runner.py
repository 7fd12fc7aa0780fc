"""The model runner: the model, its device and dtype, and its paged KV cache; the forward of a step.

`run(chunks)` computes the next tokens of several sequences in one forward: each sequence's
chunk (one token for a decode, part or all of a prompt for a prefill) is packed into one row,
its keys and values go to the slots of its blocks, and each attends over its own. It returns the
logits at the rows the engine asks for. Building the packed tensors and the slot ranges happens
here; choosing blocks, tokens and text do not.
"""

from __future__ import annotations

from pathlib import Path

import torch

from raylm.inference.kv_budget import KVCachePlan
from raylm.inference.sequence import Sequence
from raylm.model.model_dir import load_model_dir
from raylm.model.transformer import KVCache


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def slot_ranges(block_table: list[int], block_size: int, length: int) -> list[tuple[int, int]]:
    """The cache slots of a sequence's first `length` tokens as [start, end) ranges, consecutive
    blocks merged into one range."""
    ranges: list[list[int]] = []
    for i in range((length + block_size - 1) // block_size):
        start = block_table[i] * block_size
        end = start + min(block_size, length - i * block_size)
        if ranges and ranges[-1][1] == start:
            ranges[-1][1] = end
        else:
            ranges.append([start, end])
    return [(start, end) for start, end in ranges]


class ModelRunner:
    def __init__(self, model_dir: str | Path, device: str = "auto", dtype: str = "auto", threads: int = 0, kv_dtype: str = "auto"):
        """`threads` 0 is torch's default; `kv_dtype` "auto" is the weights' dtype. The cache comes
        after the weights (`allocate_cache`), sized from what they leave free."""
        if threads > 0:
            torch.set_num_threads(threads)
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.kv_dtype = self.dtype if kv_dtype == "auto" else pick_dtype(kv_dtype, self.device)
        self.model, self.model_config = load_model_dir(Path(model_dir), self.device, self.dtype)
        self.cache: KVCache | None = None

    def allocate_cache(self, plan: KVCachePlan) -> None:
        self.cache = KVCache(self.model_config, plan.num_blocks, plan.block_size, self.device, self.kv_dtype)

    @torch.inference_mode()
    def run(self, chunks: list[tuple[Sequence, int]], all_rows: list[bool]) -> tuple[torch.Tensor, list[slice]]:
        """Compute each sequence's next `n` tokens (from its `num_computed`) into its blocks.

        Returns logits [R, vocab] and, per chunk, the slice of them it gets: its last token's row,
        or every token's where `all_rows` says so (a prompt being scored).
        """
        size = self.cache.block_size
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        spans = []
        wanted: list[int] = []
        given: list[slice] = []
        for (seq, n), everything in zip(chunks, all_rows):
            start, row = seq.num_computed, len(tokens)
            tokens += seq.tokens(start, start + n)
            positions += range(start, start + n)
            slots += [seq.block_table[p // size] * size + p % size for p in range(start, start + n)]
            spans.append((row, n, slot_ranges(seq.block_table, size, start + n)))
            first = len(wanted)
            wanted += range(row, row + n) if everything else [row + n - 1]
            given.append(slice(first, len(wanted)))
        self.cache.bind(torch.tensor(slots, device=self.device), spans)
        logits = self.model(
            torch.tensor([tokens], device=self.device),
            positions=torch.tensor([positions], device=self.device),
            cache=self.cache,
            rows=torch.tensor(wanted, device=self.device),
        )
        return logits[0], given
