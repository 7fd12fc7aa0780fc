"""The model runner alone: prefill and decode through the KV cache, several sequences of different
lengths in scattered slots, give the logits of a full no-cache forward over the same tokens."""

from __future__ import annotations

import pytest
import torch

from raylm.inference.detokenize import TextStream
from raylm.inference.runner import ModelRunner
from raylm.inference.sampling import SamplingParams, new_generator
from raylm.inference.sequence import Sequence


@pytest.fixture(scope="module")
def runner(debug_model_dir):
    return ModelRunner(debug_model_dir, max_batch_size=4, max_model_len=64, device="cpu", dtype="float32")


def sequence(prompt_ids: list[int], slot: int) -> Sequence:
    # The runner reads tokens and slots only: the text stream never gets a token here.
    seq = Sequence(slot, prompt_ids, SamplingParams(), lambda out: None, TextStream(None, []), new_generator(0))
    seq.slot = slot
    return seq


@torch.inference_mode()
def full_forward_last(runner: ModelRunner, ids: list[int]) -> torch.Tensor:
    """Logits [vocab] after the last of `ids`, from one forward over all of them, no cache."""
    return runner.model(torch.tensor([ids]))[0, -1]


def test_prefill_and_decode_logits_equal_a_full_forward(runner):
    vocab = runner.model_config.vocab_size
    generator = torch.Generator().manual_seed(0)
    # Fill two slots with longer, unrelated sequences first: what they leave must not leak.
    stale = [sequence(torch.randint(0, vocab, (40,), generator=generator).tolist(), slot) for slot in (0, 2)]
    runner.prefill(stale)
    prompts = [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in (5, 17, 1)]
    seqs = [sequence(ids, slot) for ids, slot in zip(prompts, (2, 3, 0))]
    logits, rows = runner.prefill(seqs)
    assert logits.shape == (3, 17, vocab) and rows == [0, 1, 2]
    for row, seq in enumerate(seqs):
        torch.testing.assert_close(logits[row, len(seq.prompt_ids) - 1], full_forward_last(runner, seq.prompt_ids), atol=1e-4, rtol=1e-4)
    for step in range(4):
        for seq in seqs:  # any tokens will do: greedy ones would not exercise anything more
            seq.output_ids.append(int(torch.randint(0, vocab, (1,), generator=generator)))
        batch = seqs[step % 3 :] + seqs[: step % 3]  # a batch's rows need not follow its slots
        logits = runner.decode(batch)
        assert logits.shape == (3, vocab)
        for row, seq in enumerate(batch):
            torch.testing.assert_close(logits[row], full_forward_last(runner, seq.prompt_ids + seq.output_ids), atol=1e-4, rtol=1e-4)


def test_sequences_with_one_prompt_prefill_once_and_decode_apart(runner):
    """A request's n choices: one forward row for their prompt, whose keys and values each slot then
    holds, so each one decodes its own tokens as if it had been prefilled alone."""
    vocab = runner.model_config.vocab_size
    generator = torch.Generator().manual_seed(1)
    shared = torch.randint(0, vocab, (9,), generator=generator).tolist()
    runner.prefill([sequence(torch.randint(0, vocab, (30,), generator=generator).tolist(), slot) for slot in (1, 3)])  # stale keys
    seqs = [sequence(shared, 0), sequence([4, 5], 2), sequence(shared, 1), sequence(shared, 3)]
    logits, rows = runner.prefill(seqs)
    assert logits.shape == (2, 9, vocab) and rows == [0, 1, 0, 0]
    for step in range(3):
        for seq in seqs:
            seq.output_ids.append(int(torch.randint(0, vocab, (1,), generator=generator)))
        logits = runner.decode(seqs)
        for row, seq in enumerate(seqs):
            torch.testing.assert_close(logits[row], full_forward_last(runner, seq.prompt_ids + seq.output_ids), atol=1e-4, rtol=1e-4)


def test_context_comes_from_the_model_unless_capped(runner, debug_model_dir):
    assert runner.max_len == 64 and runner.cache.max_len == 64
    assert ModelRunner(debug_model_dir, max_batch_size=1).max_len == runner.model_config.max_seq_len
