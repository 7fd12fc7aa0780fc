"""The serving engine in-process (no Ray): greedy parity with transformers, continuous batching,
cancellation, a failing step, the background loop's streams, sampling controls, streaming
detokenization and stop strings. Its parts alone: tests/test_inference_*.py."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from raylm.inference.detokenize import TextStream
from raylm.inference.engine import (
    Engine,
    EngineConfig,
    EngineFailed,
    EngineLoop,
    InvalidRequest,
    RequestFrontend,
)
from raylm.inference.sampling import (
    SamplingParams,
    apply_penalties,
    choice_seed,
    choose_token,
    filter_top_k_top_p,
    new_generator,
)

PROMPTS = ["def add(a, b):", "import os\nprint(", "The json module encodes", "class Point:\n    def"]


@pytest.fixture(scope="module")
def engine(debug_model_dir):
    return Engine(debug_model_dir, EngineConfig(max_batch_size=8, threads=1))


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def test_greedy_equals_transformers_generate(engine, debug_model_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(debug_model_dir).eval()
    prompts = [engine.encode_prompt(p) for p in PROMPTS]
    ours = engine.generate(prompts, greedy(24))  # decoded together, prompts of different lengths
    for ids, (_, out_ids, _) in zip(prompts, ours):
        with torch.no_grad():
            theirs = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
        assert out_ids == theirs


def test_batched_outputs_equal_solo_outputs(engine):
    prompts = [engine.encode_prompt(p) for p in PROMPTS]
    together = engine.generate(prompts, greedy(20))
    alone = [engine.generate([p], greedy(20))[0] for p in prompts]
    assert together == alone


def test_context_comes_from_the_model_unless_capped(engine, debug_model_dir):
    assert RequestFrontend(debug_model_dir, max_model_len=64).max_len == 64
    assert RequestFrontend(debug_model_dir).max_len == engine.model_config.max_seq_len == engine.max_len


def test_request_arriving_mid_generation_joins_the_running_batch(engine):
    first_ids, late_ids = engine.encode_prompt(PROMPTS[0]), engine.encode_prompt(PROMPTS[1])
    outputs = {"first": [], "late": []}
    first = engine.submit(first_ids, greedy(30, ignore_eos=True), lambda out: outputs["first"].append(out))
    for _ in range(5):
        engine.step()
    late = engine.submit(late_ids, greedy(10, ignore_eos=True), lambda out: outputs["late"].append(out))
    engine.step()  # admits `late` while `first` is still running
    assert {first.finish_reason, late.finish_reason} == {None}
    engine.step()
    assert engine.counters.batch_size_last == 2
    while engine.has_work():
        engine.step()
    assert len(first.output_ids) == 30 and late.finish_reason == "length"
    assert late.output_ids == engine.generate([late_ids], greedy(10, ignore_eos=True))[0][1]
    assert outputs["late"][-1].completion_tokens == 10 and outputs["first"][-1].finish_reason == "length"


def test_cancel_frees_the_slot_at_the_next_step(engine):
    free_before, cancelled_before = engine.free_slots, engine.counters.requests_cancelled
    seq = engine.submit(engine.encode_prompt(PROMPTS[2]), greedy(100), lambda out: None)
    engine.step()
    assert engine.free_slots == free_before - 1
    engine.cancel(seq)
    engine.step()
    assert engine.free_slots == free_before and not engine.has_work()
    assert engine.counters.requests_cancelled == cancelled_before + 1
    assert engine.stats()["requests_running"] == 0


def test_a_failing_step_fails_its_sequences_and_the_engine_goes_on(engine):
    outputs = {"good": [], "bad": []}
    failed_before, free_before = engine.counters.requests_failed, engine.free_slots
    good = engine.submit(engine.encode_prompt(PROMPTS[0]), greedy(50, ignore_eos=True), outputs["good"].append)
    engine.step()
    # An id past the vocabulary (encode_prompt would refuse it) makes the next forward raise.
    bad = engine.submit([engine.model_config.vocab_size + 5], greedy(5), outputs["bad"].append)
    with pytest.raises(IndexError):  # raised again after failing every request: the caller decides
        engine.step()
    assert (good.finish_reason, bad.finish_reason) == ("error", "error")
    assert outputs["good"][-1].finish_reason == outputs["bad"][-1].finish_reason == "error"
    assert engine.counters.requests_failed == failed_before + 2
    assert engine.free_slots == free_before and not engine.has_work()
    assert engine.generate([engine.encode_prompt(PROMPTS[0])], greedy(4))[0][2] == "length"


def test_engine_loop_streams_requests_and_cancels_one_left_early(engine):
    ids = engine.encode_prompt(PROMPTS[1])
    text, out_ids, _ = engine.generate([ids], greedy(12, ignore_eos=True))[0]
    cancelled_before = engine.counters.requests_cancelled
    loop = EngineLoop(engine)

    async def consume() -> list:
        outputs = [out async for batch in loop.stream([(ids, greedy(12, ignore_eos=True))]) for _, out in batch]
        abandoned = loop.stream([(ids, greedy(200, ignore_eos=True))])
        await abandoned.__anext__()
        await abandoned.aclose()  # as when a client disconnects
        return outputs

    try:
        outputs = asyncio.run(consume())
        deadline = time.monotonic() + 30
        while engine.has_work() and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        loop.stop()
    assert "".join(out.text for out in outputs) == text and outputs[-1].finish_reason == "length"
    assert [t for out in outputs for t in out.token_ids] == out_ids
    assert not engine.has_work() and engine.free_slots == 8
    assert engine.counters.requests_cancelled == cancelled_before + 1


def test_engine_loop_spaces_the_writes_of_many_streams_by_its_write_budget(engine):
    """With a budget of writes a second, four open streams each get fewer, larger batches (spaced by
    streams / budget); without one, each gets a batch per step. Every token arrives either way."""
    ids = engine.encode_prompt(PROMPTS[2])
    expected = engine.generate([ids], greedy(24, ignore_eos=True))[0][1]
    loop = EngineLoop(engine)

    async def four_streams(writes_per_s: float) -> list[list[list[int]]]:
        async def consume() -> list[list[int]]:
            return [[t for _, out in batch for t in out.token_ids] async for batch in loop.stream([(ids, greedy(24, ignore_eos=True))], 0.0, writes_per_s)]

        return await asyncio.gather(*(consume() for _ in range(4)))

    try:
        unpaced = asyncio.run(four_streams(0))
        started = time.monotonic()
        paced = asyncio.run(four_streams(40))  # four streams: a batch each 0.1 s at most
        took = time.monotonic() - started
    finally:
        loop.stop()
    for batches in unpaced + paced:
        assert [t for batch in batches for t in batch] == expected
    assert all(len(batches) <= took / 0.1 + 1 and max(map(len, batches)) > 1 for batches in paced)
    assert min(map(len, unpaced)) > max(map(len, paced))  # unpaced: a step's token at a time, unless the consumer lags
    assert loop.open_streams == 0


def test_engine_loop_fails_every_request_at_once_and_stops_when_a_step_raises(engine, monkeypatch):
    """A fault inside a step (here the model runner's forward, as an out-of-memory error would be)
    ends the running streams and the queued request with an `error` output within a second; the
    loop's thread ends (the replica's health check then fails) and later requests are refused."""
    ids = engine.encode_prompt(PROMPTS[0])
    fail = threading.Event()
    forward = engine.runner.run

    def faulty_run(chunks, all_rows):
        if fail.is_set():
            raise RuntimeError("injected fault: out of memory")
        return forward(chunks, all_rows)

    monkeypatch.setattr(engine.runner, "run", faulty_run)
    free_before, failed_before = engine.free_slots, engine.counters.requests_failed
    loop = EngineLoop(engine)

    async def run() -> tuple[list, float]:
        async def consume(max_tokens: int) -> list:
            return [out async for batch in loop.stream([(ids, greedy(max_tokens, ignore_eos=True))]) for _, out in batch]

        streams = [asyncio.create_task(consume(200)) for _ in range(3)]
        while engine.counters.generated_tokens == 0 or engine.free_slots > free_before - 3:
            await asyncio.sleep(0.01)  # all three are decoding
        queued = asyncio.create_task(consume(200))
        await asyncio.sleep(0)
        fail.set()
        failed_at = time.monotonic()
        outputs = await asyncio.wait_for(asyncio.gather(*streams, queued), timeout=5)
        return outputs, time.monotonic() - failed_at

    try:
        outputs, took = asyncio.run(run())
        assert took < 1.0, f"requests ended {took:.2f}s after the fault"
        assert [out[-1].finish_reason for out in outputs] == ["error"] * 4
        deadline = time.monotonic() + 1
        while loop.alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not loop.alive() and isinstance(loop.failure, RuntimeError)
        with pytest.raises(EngineFailed, match="injected fault"):
            asyncio.run(anext(loop.stream([(ids, greedy(4))])))
        assert engine.counters.requests_failed == failed_before + 4
        assert engine.free_slots == free_before and not engine.has_work()
    finally:
        loop.stop()


def test_prompt_plus_max_tokens_beyond_context_is_refused_by_name(engine):
    ids = engine.encode_prompt(PROMPTS[0])
    with pytest.raises(InvalidRequest, match="the prompt is 300 tokens, but the model's context is 256") as err:
        engine.check_request(ids[:1] * 300, greedy(1), "messages")
    assert err.value.param == "messages"
    for param, bad in (("stop_token_ids", greedy(4, stop_token_ids=[10**6])), ("logit_bias", greedy(4, logit_bias={-1: 1.0}))):
        with pytest.raises(InvalidRequest, match="outside the vocabulary") as err:
            engine.check_request(ids, bad)
        assert err.value.param == param
    with pytest.raises(InvalidRequest, match="context of 256 tokens") as err:
        engine.submit(ids, greedy(256), lambda out: None)
    assert err.value.param == "max_tokens"
    with pytest.raises(InvalidRequest, match="outside the vocabulary") as err:
        engine.encode_prompt([1, 10**6])
    assert err.value.param == "prompt"


def test_seeded_sampling_repeats_and_top_k_1_is_greedy(engine):
    ids = engine.encode_prompt(PROMPTS[3])
    sampled = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=7)
    a, b = engine.generate([ids, ids], sampled)  # same seed, batched together
    assert a == b
    other = engine.generate([ids], SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=8))[0]
    assert other != a
    top1 = engine.generate([ids], SamplingParams(max_tokens=20, temperature=1.3, top_k=1, seed=3))[0]
    assert top1[1] == engine.generate([ids], greedy(20))[0][1]


def test_stop_token_ids_and_ignore_eos(engine):
    ids = engine.encode_prompt(PROMPTS[0])
    [(_, out_ids, _)] = engine.generate([ids], greedy(12, ignore_eos=True))
    stop_at = out_ids[5]
    _, stopped_ids, reason = engine.generate([ids], greedy(12, ignore_eos=True, stop_token_ids=[stop_at]))[0]
    assert reason == "stop" and stopped_ids == out_ids[: out_ids.index(stop_at) + 1]
    model_stops = engine.stop_token_ids
    engine.stop_token_ids = model_stops | {stop_at}  # as if the model had emitted its end token there
    try:
        assert engine.generate([ids], greedy(12))[0][2] == "stop"
        assert engine.generate([ids], greedy(12, ignore_eos=True))[0][1] == out_ids
    finally:
        engine.stop_token_ids = model_stops


def test_logprobs_are_reported_per_token(engine):
    ids = engine.encode_prompt(PROMPTS[1])
    outputs = []
    seq = engine.submit(ids, greedy(5, logprobs=3), outputs.append)
    while engine.has_work():
        engine.step()
    choices = [c for out in outputs for c in out.logprobs]
    assert [c.token for c in choices] == seq.output_ids
    for c in choices:
        assert len(c.top) == 3 and c.top[0][0] == c.token and c.logprob == pytest.approx(c.top[0][1]) and c.logprob <= 0


def test_prompt_logprobs_score_every_prompt_token_and_max_tokens_0_generates_nothing(engine):
    ids = engine.encode_prompt(PROMPTS[2])
    outputs = []
    seq = engine.submit(ids, greedy(0, logprobs=2, prompt_logprobs=2), outputs.append)
    while engine.has_work():
        engine.step()
    assert seq.output_ids == [] and [out.finish_reason for out in outputs] == ["length"]
    scored = outputs[0].prompt_logprobs
    with torch.inference_mode():
        expected = engine.model(torch.tensor([ids]))[0].log_softmax(-1)  # [T, vocab], no cache
    assert [c.token for c in scored] == ids[1:]
    for position, choice in enumerate(scored):
        assert choice.logprob == pytest.approx(float(expected[position, ids[position + 1]]), abs=1e-4)
        assert [t for t, _ in choice.top] == expected[position].topk(2).indices.tolist()
        assert (choice.top[0][0] == choice.token) == (choice.top[0][1] == choice.logprob)  # one log-softmax: exact equality
    together = engine.generate([ids, ids], [greedy(3, prompt_logprobs=0), greedy(3)])  # scoring changes nothing generated
    assert together[0] == together[1] == engine.generate([ids], greedy(3))[0]


def test_a_prompts_choices_share_its_blocks_and_sample_from_their_own_seeds(engine, monkeypatch):
    """n > 1: the first choice computes the prompt, the others start from its full blocks (held
    once, by all three) and compute only the rest, then each samples with its own seed."""
    ids = engine.encode_prompt(PROMPTS[3]) * 3  # several full blocks
    size = engine.blocks.block_size
    params = [SamplingParams(max_tokens=10, temperature=1.0, seed=choice_seed(42, j)) for j in range(3)]
    run, computed, tables = engine.runner.run, [], []

    def watching_run(chunks, all_rows):
        computed.append([n for _, n in chunks])
        tables.append([list(seq.block_table) for seq, _ in chunks])
        return run(chunks, all_rows)

    monkeypatch.setattr(engine.runner, "run", watching_run)
    hits = engine.blocks.hit_tokens
    together = engine.generate([ids] * 3, params)
    reused = (len(ids) - 1) // size
    assert computed[0] == [len(ids)] and computed[1] == [1] + [len(ids) - reused * size] * 2  # then the first one decodes beside them
    assert tables[1][1][:reused] == tables[1][2][:reused] == tables[0][0][:reused]
    assert engine.blocks.hit_tokens - hits == 2 * reused * size
    monkeypatch.undo()
    assert together == [engine.generate([ids], p)[0] for p in params]
    assert len({tuple(out_ids) for _, out_ids, _ in together}) == 3
    assert choice_seed(42, 0) == 42 and choice_seed(None, 3) is None and 0 <= choice_seed(-5, 1) < 2**64


def test_stream_decodes_incrementally_and_cuts_at_stop_strings(engine):
    text = "def add(a, b):\n    return a + b\n"
    ids = engine.tokenizer.encode(text).ids
    stream = TextStream(engine.tokenizer, [])
    pieces = []
    for token in ids:
        stream.add(token)
        pieces.append(stream.delta(final=False))
    stream.finish()
    pieces.append(stream.delta(final=True))
    assert "".join(pieces) == text
    stream = TextStream(engine.tokenizer, ["return", "zzz"])
    pieces = []
    for token in ids:
        stream.add(token)
        pieces.append(stream.delta(final=False))
        if stream.stopped:
            break
    pieces.append(stream.delta(final=True))
    assert stream.stopped and "".join(pieces) == "def add(a, b):\n    "


@pytest.mark.parametrize("extreme", [
    {"temperature": 5e-324}, {"temperature": 1e-300, "top_k": 1}, {"top_p": 5e-324}, {"top_p": 1e-300, "temperature": 2.0},
])
def test_extreme_but_valid_sampling_values_sample_without_nan(engine, extreme):
    """Found by the schema fuzzer: a temperature that overflows fp32 logits to inf, or a top_p that
    rounds to 0, made the draw NaN, which failed the step and with it the engine. Both are greedy."""
    ids = engine.encode_prompt(PROMPTS[0])
    _, out_ids, _ = engine.generate([ids], SamplingParams(max_tokens=4, seed=1, ignore_eos=True, **extreme))[0]
    assert out_ids == engine.generate([ids], greedy(4, ignore_eos=True))[0][1]


def test_penalties_and_filters():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    params = SamplingParams(presence_penalty=1.0, frequency_penalty=0.5)
    assert apply_penalties(logits, {0: 2}, params).tolist() == [1.0, 2.0, 1.0, 0.0]
    assert torch.isinf(filter_top_k_top_p(logits, 2, 1.0)).tolist() == [False, False, True, True]
    # softmax([3,2,1,0]) = [.64, .24, .09, .03]: top_p 0.7 keeps the first two
    assert torch.isinf(filter_top_k_top_p(logits, 0, 0.7)).tolist() == [False, False, True, True]
    assert torch.isinf(filter_top_k_top_p(logits, 0, 0.5)).tolist() == [False, True, True, True]
    draws = {choose_token(logits, {}, SamplingParams(temperature=1.0, top_k=2), new_generator(s)).token for s in range(50)}
    assert draws == {0, 1}
    biased = SamplingParams(temperature=0.0, logit_bias={3: 100.0}, logprobs=0)
    choice = choose_token(logits, {}, biased, new_generator(0))
    assert choice.token == 3 and choice.logprob == pytest.approx(float(logits.log_softmax(-1)[3]))  # logprobs stay the model's
