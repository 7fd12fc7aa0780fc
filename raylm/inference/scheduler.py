"""The scheduler: which sequences run, where their keys and values live, and what each step does.

It owns the queues (`waiting`, filled from any thread; `running`, touched by the stepping thread
only) and the KV cache slots: one slot per running sequence, freed when it finishes or is
cancelled. Each `schedule()` retires cancelled sequences, admits waiting ones first come first
served while slots are free and the step's prefill stays within `max_prefill_tokens`, and says
which sequences prefill and which decode. It never touches the model or tokens.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

from raylm.inference.sequence import CANCELLED, Sequence


@dataclass
class ScheduledStep:
    prefill: list[Sequence]  # admitted now: their prompts go through the model, each in its slot
    decode: list[Sequence]  # already running: one token each
    cancelled: list[Sequence]  # retired now, their slots free again


class Scheduler:
    def __init__(self, max_batch_size: int, max_prefill_tokens: int):
        self.max_prefill_tokens = max_prefill_tokens  # padded prompt tokens per step (bounds decode stalls)
        self.free_slots = list(range(max_batch_size - 1, -1, -1))  # a stack: slot 0 is taken first
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.lock = threading.Lock()  # guards `waiting` against submitters on other threads

    def add(self, seq: Sequence) -> None:
        """Queue a sequence (safe from any thread); a later `schedule()` admits it."""
        with self.lock:
            self.waiting.append(seq)

    def cancel(self, seq: Sequence) -> None:
        """Mark a sequence as abandoned; the next `schedule()` frees its slot (safe from any thread)."""
        seq.cancelled = True

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def schedule(self) -> ScheduledStep:
        cancelled = self.retire_cancelled()
        # Everything running decodes: a slot holds a whole context, so a running sequence never
        # runs out of cache. Preemption (evicting running sequences when a paged cache fills up,
        # to resume them later) would choose here which of `running` decode and which wait.
        decode = list(self.running)
        prefill = self.admit()
        return ScheduledStep(prefill=prefill, decode=decode, cancelled=cancelled)

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

    def admit(self) -> list[Sequence]:
        """Waiting sequences, in arrival order, that get a slot and fit this step's prefill budget."""
        admitted: list[Sequence] = []
        prompts: set[tuple] = set()  # distinct prompts admitted: the runner prefills each once
        longest = 0
        with self.lock:
            while self.waiting and self.free_slots:
                head = self.waiting[0]
                if head.prompt_key not in prompts:
                    # Prompts are right-padded to the longest; the first one always goes, however long.
                    if admitted and max(longest, len(head.prompt_ids)) * (len(prompts) + 1) > self.max_prefill_tokens:
                        break
                    prompts.add(head.prompt_key)
                    longest = max(longest, len(head.prompt_ids))
                seq = self.waiting.popleft()
                seq.slot = self.free_slots.pop()
                admitted.append(seq)
        self.running.extend(admitted)
        return admitted

    def retire_finished(self) -> list[Sequence]:
        """Remove the sequences that have a finish reason from `running`; their slots are free again."""
        finished = [s for s in self.running if s.finish_reason is not None]
        self.retire(finished)
        return finished

    def remove_all(self) -> list[Sequence]:
        """Take every waiting and running sequence out (a failed engine ends them all); slots free again."""
        with self.lock:
            waiting = list(self.waiting)
            self.waiting.clear()
        running = list(self.running)
        self.retire(running)
        return running + waiting

    def retire(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            if seq.slot >= 0:
                self.free_slots.append(seq.slot)
                seq.slot = -1
        gone = set(seqs)
        self.running = [s for s in self.running if s not in gone]
