"""Output processing alone (no model): tokens chosen from logits rows become outputs, with stop
strings cut exactly, UTF-8 characters never split, special tokens skipped and every finish
reason; and the text stream's cost per token does not grow with the output."""

from __future__ import annotations

import time

import pytest
import torch

from raylm.inference.detokenize import TextStream, TokenTexts
from raylm.inference.output import OutputProcessor
from raylm.inference.sampling import SamplingParams, new_generator
from raylm.inference.sequence import Output, Sequence
from raylm.model.chat import ENDOFTEXT, IM_START, load_tokenizer

PROMPT = [10, 11, 12]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def run(tokenizer, tokens: list[int], max_len: int = 200, **params) -> tuple[Sequence, list[Output]]:
    """Feed `tokens` one step at a time as greedy choices from logits; the outputs each step hands out."""
    processor = OutputProcessor({tokenizer.token_to_id(ENDOFTEXT)}, max_len)
    params = SamplingParams(temperature=0.0, **{"max_tokens": 100, **params})
    seq = Sequence(0, PROMPT, params, lambda out: None, TextStream(tokenizer, params.stop), new_generator(0))
    outputs = []
    for token in tokens:
        logits = torch.zeros(1, tokenizer.get_vocab_size())  # [B=1, vocab]
        logits[0, token] = 1.0
        processor.sample([seq], logits)
        output = processor.emit(seq)
        outputs += [output] if output is not None else []
        if seq.finish_reason is not None:
            break
    return seq, outputs


def text_of(outputs: list[Output]) -> str:
    return "".join(out.text for out in outputs)


def test_stop_string_split_across_tokens_is_cut_exactly(tokenizer):
    text = "def add(a, b):\n    return a + b\n"
    ids = tokenizer.encode(text).ids
    stop = "urn a"
    assert not any(stop in tokenizer.decode(ids[i : i + 2]) for i in range(len(ids)))  # it spans 3+ tokens
    seq, outputs = run(tokenizer, ids, stop=[stop, "never"])
    assert text_of(outputs) == "def add(a, b):\n    ret"
    assert seq.finish_reason == "stop" and outputs[-1].finish_reason == "stop"
    assert tokenizer.decode(seq.output_ids).startswith(text[: text.index(stop) + len(stop)])  # stopped at once
    assert any(out.text for out in outputs[:-1])  # text streams before the end, not all at the finish


def test_text_held_back_for_a_stop_string_that_never_comes_is_handed_out(tokenizer):
    text = "def add(a, b):\n    return a + b\n"
    ids = tokenizer.encode(text).ids
    seq, outputs = run(tokenizer, ids, stop=["a + c"], max_tokens=len(ids))  # "a + " starts it, "b" ends that
    assert text_of(outputs) == text and seq.finish_reason == "length"


def test_a_character_split_across_tokens_never_streams_half_decoded(tokenizer):
    text = "é€😀 ok ü"
    ids = tokenizer.encode(text).ids
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)  # the characters are split into byte tokens
    _, outputs = run(tokenizer, ids)
    assert [out.text for out in outputs if "\ufffd" in out.text] == []
    assert text_of(outputs) == text and len(outputs) == len(ids)  # one output per token: its ids go out at once


def sentencepiece_tokenizer():
    """A Llama-2-style tokenizer: word boundaries as U+2581, characters outside the vocabulary as
    <0xNN> byte tokens, a decoder that strips the text's first space."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ["\u2581", "o", "k", "ok", "\u2581ok"]:
        vocab[piece] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[("o", "k"), ("\u2581", "ok")], byte_fallback=True, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tokenizer.add_special_tokens(["<s>", "</s>"])
    return tokenizer


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
def test_split_characters_never_stream_half_decoded_and_logprob_tokens_keep_their_bytes(tokenizer, kind):
    """Whatever the tokenizer splits a character into (GPT-2's byte-level pieces, SentencePiece's
    <0xNN> tokens), the streamed text never holds U+FFFD, and each token's logprob text is its own
    bytes: `bytes:\\xc3` for part of a character, a space for SentencePiece's word boundary."""
    tokenizer = tokenizer if kind == "byte-level" else sentencepiece_tokenizer()
    text = "ok é€😀 ok ü"
    ids = tokenizer.encode(text).ids
    stream, deltas = TextStream(tokenizer, []), []
    for token in ids:
        stream.add(token)
        deltas.append(stream.delta(final=False))
    stream.finish()
    deltas.append(stream.delta(final=True))
    assert "".join(deltas) == tokenizer.decode(ids) and not any("\ufffd" in d for d in deltas)
    texts = TokenTexts(tokenizer)
    pieces = [texts.text(t) for t in ids]
    assert "bytes:\\xc3" in pieces and not any("\ufffd" in p for p in pieces)
    spaced = text if kind == "byte-level" else " " + text  # SentencePiece marks the first word's boundary too
    assert b"".join(texts.bytes_of(t) for t in ids) == spaced.encode()


def test_output_cut_mid_character_ends_as_decoding_it_whole_would(tokenizer):
    ids = tokenizer.encode("ok €").ids
    seq, outputs = run(tokenizer, ids[:-1], max_tokens=len(ids) - 1)
    assert seq.finish_reason == "length"
    assert text_of(outputs) == tokenizer.decode(ids[:-1]) and text_of(outputs).endswith("\ufffd")


def test_special_tokens_are_skipped_and_the_end_token_stops(tokenizer):
    im_start, end = tokenizer.token_to_id(IM_START), tokenizer.token_to_id(ENDOFTEXT)
    ids = tokenizer.encode("import os").ids + [im_start] + tokenizer.encode("print").ids + [end] + [33]
    seq, outputs = run(tokenizer, ids)
    assert text_of(outputs) == "import osprint" and seq.finish_reason == "stop"
    assert [t for out in outputs for t in out.token_ids] == ids[:-1]  # the end token is in the ids, not the text
    seq, outputs = run(tokenizer, ids, ignore_eos=True, max_tokens=len(ids))
    assert text_of(outputs) == "import osprint" + tokenizer.decode([33]) and seq.finish_reason == "length"
    seq, _ = run(tokenizer, ids, stop_token_ids=[im_start])
    assert seq.output_ids == ids[: ids.index(im_start) + 1] and seq.finish_reason == "stop"


def test_length_ends_at_max_tokens_or_the_context(tokenizer):
    ids = tokenizer.encode("The json module encodes and decodes JSON documents.").ids
    seq, outputs = run(tokenizer, ids, max_tokens=3)
    assert len(seq.output_ids) == 3 and outputs[-1].finish_reason == "length" and outputs[-1].completion_tokens == 3
    assert text_of(outputs) == tokenizer.decode(ids[:3]) and outputs[-1].prompt_tokens == len(PROMPT)
    seq, outputs = run(tokenizer, ids, max_len=len(PROMPT) + 2)
    assert len(seq.output_ids) == 2 and seq.finish_reason == "length"


def test_text_stream_cost_per_token_does_not_grow_with_the_output(tokenizer):
    ids = tokenizer.encode("The json module encodes and decodes JSON documents.\n" * 800).ids
    stream = TextStream(tokenizer, ["zzz"])

    def seconds_per_token(tokens: list[int]) -> float:
        best = float("inf")  # the quietest of several runs: other processes share these cores
        for start in range(0, len(tokens), 200):
            began = time.perf_counter()
            for token in tokens[start : start + 200]:
                stream.add(token)
                stream.delta(final=False)
            best = min(best, time.perf_counter() - began)
        return best / 200

    early = seconds_per_token(ids[:1000])
    for token in ids[1000:-1000]:
        stream.add(token)
        stream.delta(final=False)
    late = seconds_per_token(ids[-1000:])
    # Re-decoding the whole output each step costs ~150x more at this length (~16k tokens).
    assert len(ids) > 15000 and late < 3 * early
