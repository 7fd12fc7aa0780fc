"""The model runner alone: prompts in chunks and decodes packed into one forward, over blocks that
are consecutive, scattered or shared with another sequence, give the logits of a full no-cache
forward over the same tokens."""

from __future__ import annotations

import pytest
import torch

from raylm.inference.detokenize import TextStream
from raylm.inference.kv_budget import KVCachePlan
from raylm.inference.runner import ModelRunner, slot_ranges
from raylm.inference.sampling import SamplingParams, new_generator
from raylm.inference.sequence import Sequence

BLOCK = 4


@pytest.fixture(scope="module")
def runner(debug_model_dir):
    runner = ModelRunner(debug_model_dir, device="cpu", dtype="float32")
    runner.allocate_cache(KVCachePlan(num_blocks=40, block_size=BLOCK, block_bytes=0, source="test"))
    return runner


def sequence(prompt_ids: list[int], blocks: list[int]) -> Sequence:
    # The runner reads tokens and blocks only: the text stream never gets a token here.
    seq = Sequence(0, prompt_ids, SamplingParams(), lambda out: None, TextStream(None, []), new_generator(0))
    seq.block_table = list(blocks)
    return seq


@torch.inference_mode()
def full_forward(runner: ModelRunner, ids: list[int]) -> torch.Tensor:
    """Logits [len(ids), vocab] from one forward over all of them, no cache."""
    return runner.model(torch.tensor([ids]))[0]


def run(runner: ModelRunner, chunks: list[tuple[Sequence, int]], all_rows: list[bool] | None = None) -> list[torch.Tensor]:
    logits, given = runner.run(chunks, all_rows or [False] * len(chunks))
    for seq, n in chunks:
        seq.num_computed += n
    return [logits[rows] for rows in given]


def test_slot_ranges_merge_consecutive_blocks():
    assert slot_ranges([3, 4, 5], BLOCK, 10) == [(12, 22)]
    assert slot_ranges([3, 9, 10, 2], BLOCK, 14) == [(12, 16), (36, 44), (8, 10)]


def test_chunked_prefills_and_decodes_in_one_forward_equal_a_full_forward(runner):
    vocab = runner.model_config.vocab_size
    generator = torch.Generator().manual_seed(0)
    # Fill the blocks with an unrelated sequence first: what it leaves must not leak.
    stale = sequence(torch.randint(0, vocab, (60,), generator=generator).tolist(), list(range(15)))
    run(runner, [(stale, 60)])
    prompts = [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in (5, 17, 1)]
    seqs = [sequence(prompts[0], [7, 8, 9]), sequence(prompts[1], [12, 3, 20, 21, 0, 30]), sequence(prompts[2], [39, 38])]
    first = run(runner, [(seqs[0], 5), (seqs[1], 6), (seqs[2], 1)], [True, False, False])  # the second in chunks
    torch.testing.assert_close(first[0], full_forward(runner, prompts[0]), atol=1e-4, rtol=1e-4)  # every row asked for
    torch.testing.assert_close(first[2][0], full_forward(runner, prompts[2])[-1], atol=1e-4, rtol=1e-4)
    seqs[0].output_ids.append(3)
    seqs[2].output_ids.append(4)
    middle = run(runner, [(seqs[0], 1), (seqs[2], 1), (seqs[1], 7)])  # decodes next to the next chunk
    torch.testing.assert_close(middle[2][0], full_forward(runner, prompts[1][:13])[-1], atol=1e-4, rtol=1e-4)
    run(runner, [(seqs[1], 4)])
    for step in range(6):
        for seq in seqs:  # any tokens will do: greedy ones would not exercise anything more
            seq.output_ids.append(int(torch.randint(0, vocab, (1,), generator=generator)))
        batch = seqs[step % 3 :] + seqs[: step % 3]  # a batch's order need not follow the blocks
        logits = run(runner, [(seq, seq.length - seq.num_computed) for seq in batch])
        for row, seq in enumerate(batch):
            torch.testing.assert_close(logits[row][0], full_forward(runner, seq.prompt_ids + seq.output_ids)[-1], atol=1e-4, rtol=1e-4)


def test_a_sequence_starting_from_anothers_blocks_computes_as_if_alone(runner):
    """Prefix reuse: the second sequence's first two blocks are the first's, computed once."""
    vocab = runner.model_config.vocab_size
    generator = torch.Generator().manual_seed(1)
    shared = torch.randint(0, vocab, (8,), generator=generator).tolist()
    first = sequence(shared + [5, 6, 7], [20, 21, 22])
    run(runner, [(first, 11)])
    second = sequence(shared + [9], [20, 21, 35, 36])
    second.num_computed = 8
    [logits] = run(runner, [(second, 1)])
    torch.testing.assert_close(logits[0], full_forward(runner, shared + [9])[-1], atol=1e-4, rtol=1e-4)
    for token in (4, 2, 8, 1, 0):  # it decodes into its own block, past the shared ones
        second.output_ids.append(token)
        [logits] = run(runner, [(second, 1)])
        torch.testing.assert_close(logits[0], full_forward(runner, second.prompt_ids + second.output_ids)[-1], atol=1e-4, rtol=1e-4)

