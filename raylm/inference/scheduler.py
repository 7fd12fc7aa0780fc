"""The scheduler: which sequences run, and how many of their tokens each step computes.

It owns the queues (`waiting`, filled from any thread; `running`, touched by the stepping thread
only) and, through the block manager, the KV cache's blocks. Each `schedule()`:
1. retires cancelled sequences;
2. gives every running sequence that has one token to compute (a decode) the block that token
   needs; when no block is free, the newest running sequence is preempted: its blocks are freed
   and it goes back to the head of the queue, to be recomputed (its prompt and output so far) when
   blocks free up, which gives the same tokens as if it had never stopped;
3. continues the prefills in progress and then admits waiting sequences, first come first served,
   while the batch has room, their blocks are free and the step's prefill budget
   (`max_prefill_tokens`) lasts: a prompt longer than what is left of the budget is computed in
   chunks over several steps, between which the running sequences keep decoding.
A waiting sequence whose prompt another sequence is still prefilling (a request's other choices)
waits for it, and then starts from its blocks. The scheduler never touches the model or tokens.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

from raylm.inference.block_manager import BlockManager
from raylm.inference.sequence import CANCELLED, Sequence


@dataclass
class ScheduledStep:
    decode: list[Sequence]  # running sequences that compute their one new token
    prefill: list[tuple[Sequence, int]]  # sequences and how many of their tokens (a chunk of the prompt) compute now
    cancelled: list[Sequence]  # retired now, their blocks released
    preempted: list[Sequence] = field(default_factory=list)  # sent back to the queue, their blocks released

    @property
    def chunks(self) -> list[tuple[Sequence, int]]:
        """Every sequence that goes through the model this step, with its token count."""
        return [(seq, 1) for seq in self.decode] + self.prefill


class Scheduler:
    def __init__(self, max_batch_size: int, max_prefill_tokens: int, blocks: BlockManager):
        self.max_batch_size = max_batch_size  # sequences running at once
        self.max_prefill_tokens = max_prefill_tokens  # prompt tokens computed per step (bounds decode stalls)
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in order of admission: the last is preempted first
        self.preemptions = 0
        self.lock = threading.Lock()  # guards `waiting` against submitters on other threads

    @property
    def free_slots(self) -> int:
        """Sequences that could still join the batch (blocks allowing)."""
        return self.max_batch_size - len(self.running)

    def add(self, seq: Sequence) -> None:
        """Queue a sequence (safe from any thread); a later `schedule()` admits it."""
        with self.lock:
            self.waiting.append(seq)

    def cancel(self, seq: Sequence) -> None:
        """Mark a sequence as abandoned; the next `schedule()` releases its blocks (safe from any thread)."""
        seq.cancelled = True

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def schedule(self) -> ScheduledStep:
        cancelled = self.retire_cancelled()
        decode, preempted = self.schedule_decodes()
        prefill = self.schedule_prefills()
        return ScheduledStep(decode=decode, prefill=prefill, cancelled=cancelled, preempted=preempted)

    def schedule_decodes(self) -> tuple[list[Sequence], list[Sequence]]:
        decode: list[Sequence] = []
        preempted: list[Sequence] = []
        for seq in list(self.running):
            if seq not in self.running or seq.length - seq.num_computed != 1:
                continue  # preempted by an older one just now, or still prefilling
            while self.blocks.needs_block(seq) and not self.blocks.num_free:
                victim = self.running[-1]
                self.preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                self.blocks.grow(seq)
                decode.append(seq)
        return decode, preempted

    def schedule_prefills(self) -> list[tuple[Sequence, int]]:
        budget = self.max_prefill_tokens
        prefill: list[tuple[Sequence, int]] = []
        for seq in self.running:  # prefills in progress first, oldest first
            left = seq.length - seq.num_computed
            if left > 1 and budget > 0:
                prefill.append((seq, min(left, budget)))
                budget -= prefill[-1][1]
        with self.lock:
            while self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
                head = self.waiting[0]
                if self.sibling_prefilling(head):
                    break
                cached, hashes = self.blocks.cached_prefix(head)
                if self.blocks.blocks_to_admit(head, cached) > self.blocks.num_free:
                    break
                self.waiting.popleft()
                self.blocks.admit(head, cached, hashes)
                self.running.append(head)
                prefill.append((head, min(head.length - head.num_computed, budget)))
                budget -= prefill[-1][1]
        return prefill

    def sibling_prefilling(self, seq: Sequence) -> bool:
        """Whether a running sequence with `seq`'s prompt is still computing the blocks that `seq`
        could reuse (its full blocks but the last token's): `seq` would find them registered a step
        or more later, instead of computing them again."""
        reusable = (len(seq.prompt_ids) - 1) // self.blocks.block_size * self.blocks.block_size
        if not self.blocks.prefix_caching or reusable == 0 or seq.params.prompt_logprobs is not None:
            return False
        return any(s.prompt_key == seq.prompt_key and s.num_computed < reusable for s in self.running)

    def preempt(self, seq: Sequence) -> None:
        """Free `seq`'s blocks and queue it first again: it is recomputed from its tokens when it returns."""
        self.blocks.release(seq)
        seq.prompt_logits = []
        self.running.remove(seq)
        with self.lock:
            self.waiting.appendleft(seq)
        self.preemptions += 1

    def retire_cancelled(self) -> list[Sequence]:
        with self.lock:
            gone = [s for s in self.waiting if s.cancelled]
            for seq in gone:
                self.waiting.remove(seq)
        gone += [s for s in self.running if s.cancelled]
        for seq in gone:
            seq.finish_reason = seq.finish_reason or CANCELLED
        self.retire(gone)
        return gone

    def retire_finished(self) -> list[Sequence]:
        """Remove the sequences that have a finish reason from `running`; their blocks are released."""
        finished = [s for s in self.running if s.finish_reason is not None]
        self.retire(finished)
        return finished

    def remove_all(self) -> list[Sequence]:
        """Take every waiting and running sequence out (a failed engine ends them all); blocks released."""
        with self.lock:
            waiting = list(self.waiting)
            self.waiting.clear()
        running = list(self.running)
        self.retire(running)
        return running + waiting

    def retire(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            self.blocks.release(seq)  # a waiting sequence holds none: nothing to release
        gone = set(seqs)
        self.running = [s for s in self.running if s not in gone]
