"""The KV cache's blocks: which are free, which sequence holds which, and which hold a known prefix.

The cache is `num_blocks` blocks of `block_size` token slots (block b holds slots b*block_size ..
(b+1)*block_size - 1). A sequence's block table lists the blocks of its tokens in order; a block is
shared by reference count and free when no sequence holds it.

Prefix reuse: once a full block's keys and values are computed, it is registered under a hash
chained from the previous block's hash and its own tokens, so a hash names a whole prefix. A new
sequence starts with the registered blocks of its longest such prefix (a system prompt, a chat
history, the prompt of a request's other choices) and computes only the rest. A freed block keeps
its registration until it is handed out again, so a prefix outlives the request that computed it.
`queried_tokens` and `hit_tokens` count the tokens looked up at admission and those found.

Placement: decode attends over each sequence's keys as one view when its blocks are consecutive,
and has to gather them otherwise (about a third more attention time at 512 tokens on a CPU). So a
sequence without a next block in line is placed at the start of a run of free blocks long enough
for its whole planned length (prompt + max_tokens), one that evicts no registered prefix where
there is one, and that run is held for its growth: other sequences take those blocks only when
nothing else is free. Where no run is free, the least recently freed block goes first.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from dataclasses import dataclass

from raylm.inference.sequence import Sequence


@dataclass
class Block:
    ref_count: int = 0
    hash: bytes | None = None  # set once the block is full and computed (prefix reuse)
    tokens: tuple[int, ...] = ()  # its tokens while registered, checked on a hit
    held_for: int = -1  # the id of the sequence whose growth room it is, -1 for none


def chain_hash(previous: bytes, tokens: tuple[int, ...]) -> bytes:
    return hashlib.blake2b(previous + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.blocks = [Block() for _ in range(num_blocks)]
        self.free: dict[int, None] = dict.fromkeys(range(num_blocks))  # insertion order: least recently freed first
        self.by_hash: dict[bytes, int] = {}
        self.held: dict[int, list[int]] = {}  # sequence id -> the blocks held for its growth
        self.queried_tokens = 0  # tokens of admitted sequences looked up in the prefix cache
        self.hit_tokens = 0  # of those, the ones found computed

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free)

    # ---- admission ----------------------------------------------------------------------------

    def cached_prefix(self, seq: Sequence) -> tuple[list[int], list[bytes]]:
        """The registered blocks (and their hashes) of `seq`'s longest computed prefix. At least one
        token is left to compute, whose logits give the next token; a sequence that scores its
        prompt computes all of it."""
        if not self.prefix_caching or seq.params.prompt_logprobs is not None:
            return [], []
        ids, hashes, h = [], [], b""
        for i in range((seq.length - 1) // self.block_size):
            tokens = tuple(seq.tokens(i * self.block_size, (i + 1) * self.block_size))
            h = chain_hash(h, tokens)
            block_id = self.by_hash.get(h)
            if block_id is None or self.blocks[block_id].tokens != tokens:
                break
            ids.append(block_id)
            hashes.append(h)
        return ids, hashes

    def blocks_to_admit(self, seq: Sequence, cached: list[int]) -> int:
        """Free blocks that admitting `seq` takes: new ones for its other tokens, and the cached ones now free."""
        new = math.ceil(seq.length / self.block_size) - len(cached)
        return new + sum(self.blocks[b].ref_count == 0 for b in cached)

    def admit(self, seq: Sequence, cached: list[int], hashes: list[bytes]) -> None:
        """Give `seq` the cached blocks, then new ones for the rest of its tokens (check `blocks_to_admit` first)."""
        for block_id in cached:
            self.blocks[block_id].ref_count += 1
            self.free.pop(block_id, None)
        seq.block_table, seq.block_hashes = list(cached), list(hashes)
        seq.num_computed = len(cached) * self.block_size
        self.queried_tokens += seq.length
        self.hit_tokens += seq.num_computed
        self.grow(seq)

    # ---- growth and release -------------------------------------------------------------------

    def needs_block(self, seq: Sequence) -> bool:
        return len(seq.block_table) * self.block_size < seq.length

    def grow(self, seq: Sequence) -> None:
        """Blocks for every token of `seq` (the caller checked there are enough free)."""
        while self.needs_block(seq):
            seq.block_table.append(self.next_block(seq))

    def release(self, seq: Sequence) -> None:
        """Drop `seq`'s hold on its blocks (its last block first, the least likely to be shared)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        for block_id in self.held.pop(seq.id, []):
            if self.blocks[block_id].held_for == seq.id:
                self.blocks[block_id].held_for = -1
        seq.block_table, seq.block_hashes, seq.num_computed = [], [], 0

    def register(self, seq: Sequence) -> None:
        """Register `seq`'s full blocks whose keys and values are computed, for later prefixes."""
        if not self.prefix_caching:
            return
        size = self.block_size
        for i in range(len(seq.block_hashes), seq.num_computed // size):
            tokens = tuple(seq.tokens(i * size, (i + 1) * size))
            h = chain_hash(seq.block_hashes[-1] if seq.block_hashes else b"", tokens)
            seq.block_hashes.append(h)
            block_id = seq.block_table[i]
            block = self.blocks[block_id]
            if block.hash is None:
                block.hash, block.tokens = h, tokens
                self.by_hash[h] = block_id

    # ---- choosing a block ---------------------------------------------------------------------

    def next_block(self, seq: Sequence) -> int:
        if seq.block_table:
            after = seq.block_table[-1] + 1
            if after in self.free and self.blocks[after].held_for in (-1, seq.id):
                return self.take(after)
        start = self.place(seq)
        return self.take(start if start is not None else self.any_free(seq))

    def place(self, seq: Sequence) -> int | None:
        """The start of a run of free blocks not held for others, for the rest of `seq`'s planned
        length, held for it from there on; None if there is none. A run of blocks that hold no
        registered prefix is chosen when one fits; else the shortest run that fits, else the longest."""
        want = math.ceil(seq.planned_length / self.block_size) - len(seq.block_table)
        run = self.find_run(want, clean=True) or self.find_run(want, clean=False)
        if run is None:
            return None
        length, first = run
        held = list(range(first, first + min(length, want)))
        for block_id in held:
            self.blocks[block_id].held_for = seq.id
        self.held.setdefault(seq.id, []).extend(held)
        return first

    def find_run(self, want: int, clean: bool) -> tuple[int, int] | None:
        """(length, start) of the shortest run of usable blocks at least `want` long; with `clean`,
        only such a run of unregistered blocks, else the longest run when none is long enough."""
        fit = longest = None
        start = None
        for block_id in range(self.num_blocks + 1):
            usable = block_id < self.num_blocks and block_id in self.free and self.blocks[block_id].held_for == -1
            usable = usable and not (clean and self.blocks[block_id].hash is not None)
            if usable and start is None:
                start = block_id
            elif not usable and start is not None:
                run = (block_id - start, start)
                if run[0] >= want and (fit is None or run < fit):
                    fit = run
                if longest is None or run[0] > longest[0]:
                    longest = run
                start = None
        return fit if fit is not None or clean else longest

    def any_free(self, seq: Sequence) -> int:
        """The least recently freed block not held for another sequence, else any free one."""
        for block_id in self.free:
            if self.blocks[block_id].held_for in (-1, seq.id):
                return block_id
        return next(iter(self.free))

    def take(self, block_id: int) -> int:
        del self.free[block_id]
        block = self.blocks[block_id]
        if block.hash is not None and self.by_hash.get(block.hash) == block_id:
            del self.by_hash[block.hash]
        block.ref_count, block.hash, block.tokens = 1, None, ()
        return block_id
