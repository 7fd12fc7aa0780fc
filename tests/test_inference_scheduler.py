"""The scheduler and block manager alone (no model): admission while blocks are free, chunked
prefill within the per-step budget, preemption when a decode finds no block, prefix reuse by
chained block hashes, cancelled requests, and submissions from other threads while it schedules.

`compute` stands in for the engine's forward: the scheduled tokens count as computed, and a
sequence whose known tokens are all computed gets its next token."""

from __future__ import annotations

import threading

import pytest

from raylm.inference.block_manager import BlockManager
from raylm.inference.detokenize import TextStream
from raylm.inference.sampling import SamplingParams, new_generator
from raylm.inference.scheduler import ScheduledStep, Scheduler
from raylm.inference.sequence import CANCELLED, Sequence

BLOCK = 4


@pytest.fixture(scope="module")
def new_seq():
    ids = iter(range(10**9))

    def make(prompt_len: int = 3, prompt: list[int] | None = None, max_tokens: int = 8) -> Sequence:
        seq_id = next(ids)
        prompt = prompt or [seq_id % 250] + [5] * (prompt_len - 1)  # distinct prompts (from the first block) unless given one
        return Sequence(seq_id, prompt, SamplingParams(max_tokens=max_tokens), lambda out: None, TextStream(None, []), new_generator(0))

    return make


def scheduler_with(num_blocks: int, max_batch_size: int = 8, max_prefill_tokens: int = 1000, prefix_caching: bool = True) -> Scheduler:
    return Scheduler(max_batch_size, max_prefill_tokens, BlockManager(num_blocks, BLOCK, prefix_caching))


def compute(scheduler: Scheduler, step: ScheduledStep) -> None:
    for seq, n in step.chunks:
        seq.num_computed += n
        scheduler.blocks.register(seq)
        if seq.num_computed == seq.length:
            seq.output_ids.append(7)


def test_admits_in_arrival_order_while_blocks_are_free_and_queues_the_rest(new_seq):
    scheduler = scheduler_with(num_blocks=5)
    a, b, c = new_seq(6), new_seq(6), new_seq(3)  # 2 + 2 blocks, then 1 more than is left after a decode
    for seq in (a, b, c):
        scheduler.add(seq)
    first = scheduler.schedule()
    assert first.prefill == [(a, 6), (b, 6), (c, 3)] and first.decode == []
    assert scheduler.blocks.num_free == 0 and not scheduler.waiting
    compute(scheduler, first)
    scheduler = scheduler_with(num_blocks=4)
    a, b, c = new_seq(6), new_seq(6), new_seq(3)
    for seq in (a, b, c):
        scheduler.add(seq)
    first = scheduler.schedule()
    assert [s for s, _ in first.prefill] == [a, b] and list(scheduler.waiting) == [c]  # c waits for a block
    compute(scheduler, first)
    a.finish_reason = "stop"
    assert scheduler.retire_finished() == [a] and scheduler.blocks.num_free == 2
    second = scheduler.schedule()
    assert second.decode == [b] and second.prefill == [(c, 3)]  # a's blocks admitted c
    assert len(set(b.block_table) | set(c.block_table)) == len(b.block_table) + len(c.block_table)  # none given twice


def test_the_batch_size_caps_the_running_sequences(new_seq):
    scheduler = scheduler_with(num_blocks=100, max_batch_size=2)
    seqs = [new_seq() for _ in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    assert [s for s, _ in scheduler.schedule().prefill] == seqs[:2] and scheduler.free_slots == 0


def test_a_long_prompt_is_prefilled_in_chunks_while_the_others_decode(new_seq):
    scheduler = scheduler_with(num_blocks=100, max_prefill_tokens=8)
    short = new_seq(3, max_tokens=20)
    scheduler.add(short)
    compute(scheduler, scheduler.schedule())
    long = new_seq(21)
    scheduler.add(long)
    chunks = []
    while not long.output_ids:
        step = scheduler.schedule()
        assert step.decode == [short]  # every step: the running sequence decodes
        chunks += [n for seq, n in step.prefill if seq is long]
        compute(scheduler, step)
    assert chunks == [8, 8, 5] and len(short.output_ids) == 1 + 3


def test_the_prefill_budget_is_shared_in_arrival_order(new_seq):
    scheduler = scheduler_with(num_blocks=100, max_prefill_tokens=12)
    a, b, c = new_seq(5), new_seq(5), new_seq(5)
    for seq in (a, b, c):
        scheduler.add(seq)
    first = scheduler.schedule()
    assert first.prefill == [(a, 5), (b, 5), (c, 2)]  # c starts with what the budget leaves
    compute(scheduler, first)
    second = scheduler.schedule()
    assert second.decode == [a, b] and second.prefill == [(c, 3)]


def test_a_decode_without_a_free_block_preempts_the_newest_sequence(new_seq):
    scheduler = scheduler_with(num_blocks=4)
    old, new = new_seq(4, max_tokens=20), new_seq(4, max_tokens=20)  # a block each, full
    for seq in (old, new):
        scheduler.add(seq)
    compute(scheduler, scheduler.schedule())
    step = scheduler.schedule()  # both need a second block: 2 of 4 are free
    assert step.decode == [old, new] and scheduler.blocks.num_free == 0
    compute(scheduler, step)
    for _ in range(3):  # the second blocks fill up
        compute(scheduler, scheduler.schedule())
    assert old.length == new.length == 9 and old.num_computed == 8
    step = scheduler.schedule()  # both need a third block, none is free: `new` goes back to the queue
    assert step.preempted == [new] and step.decode == [old] and scheduler.preemptions == 1
    assert list(scheduler.waiting) == [new] and new.block_table == [] and new.num_computed == 0
    assert new.output_ids == [7] * 5  # what it generated stays: it is recomputed, not restarted
    old.finish_reason = "stop"
    compute(scheduler, step)
    scheduler.retire_finished()
    back = scheduler.schedule()
    # Its first block was still cached; its second went to `old`'s third: it recomputes 5 of its 9 tokens.
    assert back.prefill == [(new, 5)] and new.num_computed == 4


def test_a_sequence_preempts_itself_when_it_is_the_newest(new_seq):
    scheduler = scheduler_with(num_blocks=2, prefix_caching=False)
    old, new = new_seq(3, max_tokens=20), new_seq(4, max_tokens=20)
    for seq in (old, new):
        scheduler.add(seq)
    compute(scheduler, scheduler.schedule())
    step = scheduler.schedule()  # old's 4th token fits its block; new's 5th needs one, and none is free
    assert step.decode == [old] and step.preempted == [new] and list(scheduler.waiting) == [new]


def test_prefixes_are_reused_by_chained_block_hashes(new_seq):
    scheduler = scheduler_with(num_blocks=20)
    system = [9, 8, 7, 6, 5, 4, 3, 2]  # two full blocks
    first = new_seq(prompt=system + [1, 1, 1])
    scheduler.add(first)
    compute(scheduler, scheduler.schedule())
    same_prefix = new_seq(prompt=system + [2, 2])
    other_first_block = new_seq(prompt=[0, 0, 0, 0] + system[4:] + [1, 1, 1])  # same second block, other prefix
    for seq in (same_prefix, other_first_block):
        scheduler.add(seq)
    step = scheduler.schedule()
    assert (same_prefix, 2) in step.prefill and (other_first_block, 11) in step.prefill
    assert same_prefix.block_table[:2] == first.block_table[:2] and same_prefix.num_computed == 8
    assert not set(other_first_block.block_table) & set(first.block_table)
    assert scheduler.blocks.hit_tokens == 8 and scheduler.blocks.queried_tokens == 11 + 10 + 11
    whole = new_seq(prompt=system)  # a prompt that is all cached still computes its last token
    scheduler.add(whole)
    assert (whole, 4) in scheduler.schedule().prefill and whole.num_computed == 4


def test_a_requests_choices_wait_for_the_first_to_compute_their_prompt_and_share_its_blocks(new_seq):
    scheduler = scheduler_with(num_blocks=20, max_prefill_tokens=6)
    prompt = list(range(10, 20))  # 10 tokens: two full blocks and two more
    choices = [new_seq(prompt=list(prompt)) for _ in range(3)]
    for seq in choices:
        scheduler.add(seq)
    first = scheduler.schedule()
    assert first.prefill == [(choices[0], 6)]  # the others wait, though the budget would start one
    compute(scheduler, first)
    second = scheduler.schedule()
    assert second.prefill == [(choices[0], 4)] and list(scheduler.waiting) == choices[1:]
    compute(scheduler, second)
    third = scheduler.schedule()
    assert third.decode == [choices[0]] and third.prefill == [(choices[1], 2), (choices[2], 2)]
    shared = choices[0].block_table[:2]
    assert all(seq.block_table[:2] == shared for seq in choices) and scheduler.blocks.blocks[shared[0]].ref_count == 3
    assert scheduler.blocks.num_free == 20 - 2 - 3 * 1


def test_cancelled_requests_are_retired_waiting_or_running(new_seq):
    scheduler = scheduler_with(num_blocks=100, max_batch_size=2)
    running, doomed_running, doomed_waiting, late = new_seq(), new_seq(), new_seq(), new_seq()
    for seq in (running, doomed_running, doomed_waiting):
        scheduler.add(seq)
    compute(scheduler, scheduler.schedule())
    free = scheduler.blocks.num_free
    scheduler.cancel(doomed_running)
    scheduler.cancel(doomed_waiting)
    scheduler.add(late)
    step = scheduler.schedule()
    assert step.cancelled == [doomed_waiting, doomed_running]
    assert {s.finish_reason for s in step.cancelled} == {CANCELLED} and doomed_running.block_table == []
    assert step.decode == [running] and step.prefill == [(late, 3)]  # the freed place, at once
    assert scheduler.running == [running, late] and not scheduler.waiting
    assert scheduler.blocks.num_free == free + 1 - 1  # doomed's block back, late's taken (running's 4th token fits its first)


def test_submissions_from_other_threads_are_each_admitted_once(new_seq):
    scheduler = scheduler_with(num_blocks=6, max_batch_size=3)
    per_thread = [[new_seq() for _ in range(150)] for _ in range(4)]
    threads = [threading.Thread(target=lambda seqs=seqs: [scheduler.add(s) for s in seqs]) for seqs in per_thread]
    for thread in threads:
        thread.start()
    admitted = []
    while any(t.is_alive() for t in threads) or scheduler.has_work():
        step = scheduler.schedule()
        admitted += [seq for seq, _ in step.prefill]
        blocks = [b for s in scheduler.running for b in s.block_table]
        assert len(set(blocks)) == len(blocks) and len(scheduler.running) <= 3  # a block is never given twice
        compute(scheduler, step)
        for seq in step.decode:
            seq.finish_reason = "stop"
        scheduler.retire_finished()
    assert len(admitted) == 600 and len(set(admitted)) == 600
    for seqs in per_thread:  # each submitter's requests run in the order it made them
        assert [s for s in admitted if s in set(seqs)] == seqs
