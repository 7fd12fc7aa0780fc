"""The scheduler alone (no model): arrival order, slot reuse, the prefill token budget, retiring
cancelled requests, and submissions from other threads while it schedules."""

from __future__ import annotations

import threading

import pytest

from raylm.inference.detokenize import TextStream
from raylm.inference.sampling import SamplingParams, new_generator
from raylm.inference.scheduler import Scheduler
from raylm.inference.sequence import CANCELLED, Sequence
from raylm.model.chat import load_tokenizer


@pytest.fixture(scope="module")
def new_seq(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    ids = iter(range(10**9))

    def make(prompt_len: int = 3, prompt: list[int] | None = None) -> Sequence:
        seq_id = next(ids)
        prompt = prompt or [5] * (prompt_len - 1) + [seq_id % 250]  # distinct prompts unless given one
        return Sequence(seq_id, prompt, SamplingParams(), lambda out: None, TextStream(tokenizer, []), new_generator(0))

    return make


def test_admits_in_arrival_order_into_free_slots_and_reuses_freed_ones(new_seq):
    scheduler = Scheduler(max_batch_size=2, max_prefill_tokens=1000)
    a, b, c = new_seq(), new_seq(), new_seq()
    for seq in (a, b, c):
        scheduler.add(seq)
    first = scheduler.schedule()
    assert first.prefill == [a, b] and first.decode == [] and (a.slot, b.slot) == (0, 1)
    assert list(scheduler.waiting) == [c] and c.slot == -1  # no slot left for c
    second = scheduler.schedule()
    assert second.prefill == [] and second.decode == [a, b]
    a.finish_reason = "stop"
    assert scheduler.retire_finished() == [a] and a.slot == -1 and scheduler.running == [b]
    third = scheduler.schedule()
    assert third.prefill == [c] and c.slot == 0 and third.decode == [b]  # c took a's slot
    b.finish_reason = c.finish_reason = "length"
    scheduler.retire_finished()
    assert not scheduler.has_work() and sorted(scheduler.free_slots) == [0, 1]


@pytest.mark.parametrize(
    "prompt_lens, admitted_first",
    [
        ([4, 4, 5], 2),  # 3 x 5 padded tokens would exceed the budget of 12
        ([7, 2], 1),  # 9 real tokens, but 2 x 7 padded ones
        ([2, 7], 1),  # a later, longer prompt pads the earlier ones too
        ([3, 3, 3, 3], 4),  # exactly the budget
        ([20, 1], 1),  # a prompt over the budget still goes, alone
    ],
)
def test_prefill_stays_within_the_padded_token_budget(new_seq, prompt_lens, admitted_first):
    scheduler = Scheduler(max_batch_size=8, max_prefill_tokens=12)
    seqs = [new_seq(n) for n in prompt_lens]
    for seq in seqs:
        scheduler.add(seq)
    assert scheduler.schedule().prefill == seqs[:admitted_first]
    assert scheduler.schedule().prefill == seqs[admitted_first:][:1]  # the next one waited for the next step


def test_sequences_sharing_a_prompt_cost_the_prefill_budget_once(new_seq):
    """A request's n choices share one prefill row, so they are admitted together where n copies
    of the prompt would not fit the budget."""
    scheduler = Scheduler(max_batch_size=8, max_prefill_tokens=12)
    siblings = [new_seq(prompt=[7] * 6) for _ in range(4)]  # 4 x 6 = 24 padded tokens if each were a row
    other, last = new_seq(6), new_seq(6)
    for seq in [*siblings, other, last]:
        scheduler.add(seq)
    assert scheduler.schedule().prefill == [*siblings, other]  # two rows of 6: exactly the budget
    assert scheduler.schedule().prefill == [last]


def test_cancelled_requests_are_retired_waiting_or_running(new_seq):
    scheduler = Scheduler(max_batch_size=2, max_prefill_tokens=1000)
    running, doomed_running, doomed_waiting, late = new_seq(), new_seq(), new_seq(), new_seq()
    for seq in (running, doomed_running, doomed_waiting):
        scheduler.add(seq)
    scheduler.schedule()
    slot = doomed_running.slot
    scheduler.cancel(doomed_running)
    scheduler.cancel(doomed_waiting)
    scheduler.add(late)
    step = scheduler.schedule()
    assert step.cancelled == [doomed_waiting, doomed_running]
    assert {s.finish_reason for s in step.cancelled} == {CANCELLED} and doomed_running.slot == -1
    assert step.decode == [running] and step.prefill == [late] and late.slot == slot  # the freed slot, at once
    assert scheduler.running == [running, late] and not scheduler.waiting


def test_submissions_from_other_threads_are_each_admitted_once(new_seq):
    scheduler = Scheduler(max_batch_size=3, max_prefill_tokens=1000)
    per_thread = [[new_seq() for _ in range(150)] for _ in range(4)]
    threads = [threading.Thread(target=lambda seqs=seqs: [scheduler.add(s) for s in seqs]) for seqs in per_thread]
    for thread in threads:
        thread.start()
    admitted = []
    while any(t.is_alive() for t in threads) or scheduler.has_work():
        step = scheduler.schedule()
        admitted += step.prefill
        slots = [s.slot for s in scheduler.running]
        assert len(set(slots)) == len(slots) and len(slots) <= 3  # a slot is never given twice
        for seq in step.decode:
            seq.finish_reason = "stop"
        scheduler.retire_finished()
    assert len(admitted) == 600 and len(set(admitted)) == 600
    for seqs in per_thread:  # each submitter's requests run in the order it made them
        assert [s for s in admitted if s in set(seqs)] == seqs
