"""The paged KV cache through the real engine (the debug model, no mocks): the memory budget sets
the block count, requests beyond it queue or are preempted and recomputed and still give the
greedy output of an unconstrained engine, a shared prefix is computed once (and counted on
/metrics), long prompts are prefilled in chunks between decodes, and a request's n choices hold
their prompt's blocks once."""

from __future__ import annotations

import pytest
import torch
import yaml

from raylm.core.errors import UserError
from raylm.inference.engine import Engine, EngineConfig, EngineLoop
from raylm.inference.kv_budget import bytes_per_token, plan_kv_cache
from raylm.inference.sampling import SamplingParams
from raylm.model.transformer import ModelConfig

MAX_LEN = 64
BLOCK_BYTES = 16 * 512  # 16 tokens x (2 layers x 2 kv heads x 16 dims x 2 (k, v) x 4 bytes) for the debug model
PROMPTS = ["def add(a, b):", "import os\nprint(", "The json module encodes", "class Point:\n    def"]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def engine_with(model_dir, **config) -> Engine:
    return Engine(model_dir, EngineConfig(**{"max_batch_size": 8, "max_model_len": MAX_LEN, "threads": 1, **config}))


@pytest.fixture(scope="module")
def reference(debug_model_dir):
    """An engine with room for everything: what the constrained ones must reproduce."""
    return engine_with(debug_model_dir, prefix_caching=False)


def run_watching(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> tuple[list[list[int]], list[dict]]:
    """Every request to completion, step by step: (output ids, the engine's stats after each step)."""
    seqs = [engine.submit(ids, params, lambda out: None) for ids in prompts]
    seen = []
    while engine.has_work():
        engine.step()
        seen.append(engine.stats())
    return [seq.output_ids for seq in seqs], seen


# ---- the budget ---------------------------------------------------------------------------------


def test_the_budget_decides_the_block_count_and_is_printed(debug_model_dir):
    engine = engine_with(debug_model_dir, kv_cache_memory="1MiB")
    assert engine.blocks.num_blocks == (1 << 20) // BLOCK_BYTES == engine.stats()["kv_blocks_total"]
    assert engine.runner.cache.k.numel() * 4 * 2 == engine.blocks.num_blocks * BLOCK_BYTES  # k and v, float32
    assert engine.kv_cache.describe() == "KV cache: 128 blocks x 16 tokens = 2048 tokens, 1.00 MiB of float32 (kv_cache_memory 1MiB)"
    from_free = engine_with(debug_model_dir)  # a fraction of the free memory, never more than the batch can use
    assert from_free.blocks.num_blocks == 8 * MAX_LEN // 16


def test_a_16_bit_cache_holds_twice_the_tokens_of_the_same_budget_and_decodes_nearly_alike(debug_model_dir, reference):
    engine = engine_with(debug_model_dir, kv_cache_memory="1MiB", kv_cache_dtype="bfloat16")
    assert engine.runner.cache.k.dtype == torch.bfloat16 and engine.runner.model.lm_head.weight.dtype == torch.float32
    assert engine.blocks.num_blocks == 2 * (1 << 20) // BLOCK_BYTES
    assert engine.kv_cache.describe() == "KV cache: 256 blocks x 16 tokens = 4096 tokens, 1.00 MiB of bfloat16 (kv_cache_memory 1MiB)"
    prompts = [engine.encode_prompt(p) for p in PROMPTS]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    rounded, exact = engine.generate(prompts, params), reference.generate(prompts, params)
    # Keys and values rounded to 8 significant bits move the logits by about 1e-3 here: no greedy choice flips.
    assert [out[1] for out in rounded] == [out[1] for out in exact]
    with pytest.raises(UserError, match="kv_cache_dtype 'int4': expected one of auto, float32, bfloat16, float16"):
        engine_with(debug_model_dir, kv_cache_dtype="int4")


def test_a_budget_below_one_full_length_sequence_is_refused_naming_both(debug_model_dir):
    with pytest.raises(UserError, match=r"holds 32 tokens \(16.00 KiB\), less than one sequence of max_model_len 64 tokens \(32.00 KiB\)"):
        engine_with(debug_model_dir, kv_cache_memory="16KiB")
    with pytest.raises(UserError, match="kv_cache_memory '2 parsecs'"):
        engine_with(debug_model_dir, kv_cache_memory="2 parsecs")


def test_the_7b_recipe_served_with_serve_yaml_no_longer_allocates_batch_x_context_up_front():
    """Computed, not built: 32 sequences x 4096 tokens of the 7b shape in bf16 is 64 GiB."""
    import torch

    from raylm.serving.app import DEFAULT_CONFIG, AppArgs, read_serve_config

    recipe = yaml.safe_load(open("training/configs/7b.yaml"))["model"]
    cfg = ModelConfig(**recipe)
    args = AppArgs(**read_serve_config(DEFAULT_CONFIG).applications[0].args)
    max_len = args.max_model_len or cfg.max_seq_len
    up_front = args.max_batch_size * max_len * bytes_per_token(cfg, torch.bfloat16)
    assert up_front == 64 * 2**30
    given = plan_kv_cache(cfg, torch.bfloat16, args.max_batch_size, max_len, args.kv_block_size, memory="20GiB")
    assert given.bytes <= 20 * 2**30 < up_front and given.tokens >= max_len
    free = 80 * 2**30 - 14 * 2**30  # an 80 GB GPU once the weights are in
    default = plan_kv_cache(cfg, torch.bfloat16, args.max_batch_size, max_len, args.kv_block_size, fraction=args.kv_cache_fraction, free_bytes=free)
    assert default.bytes <= args.kv_cache_fraction * free < up_front
    with pytest.raises(UserError, match="less than one sequence of max_model_len 4096 tokens"):
        plan_kv_cache(cfg, torch.bfloat16, args.max_batch_size, max_len, args.kv_block_size, fraction=args.kv_cache_fraction, free_bytes=2 * 2**30)


# ---- admission and preemption ---------------------------------------------------------------------


def test_requests_beyond_the_budget_queue_and_each_gives_the_unconstrained_output(debug_model_dir, reference):
    engine = engine_with(debug_model_dir, kv_cache_memory=f"{4 * BLOCK_BYTES}")  # 4 blocks: one full-length sequence
    prompts = [(reference.encode_prompt(p) * 4)[:20] for p in PROMPTS * 2]  # 20 + 10 tokens: 2 blocks each, all along
    outputs, seen = run_watching(engine, prompts, greedy(10))
    assert outputs == [seq for _, seq, _ in reference.generate(prompts, greedy(10))]
    assert max(s["requests_running"] for s in seen) == 2 and max(s["requests_waiting"] for s in seen) == 6
    assert max(s["kv_blocks_used"] for s in seen) <= 4 and seen[-1]["preemptions"] == 0


def test_a_decode_without_a_free_block_preempts_and_the_recompute_gives_the_same_tokens(debug_model_dir, reference):
    engine = engine_with(debug_model_dir, kv_cache_memory=f"{4 * BLOCK_BYTES}", prefix_caching=False)
    prompts = [reference.encode_prompt(p) for p in PROMPTS]  # one block each at first, three once decoded
    outputs, seen = run_watching(engine, prompts, greedy(30))
    assert seen[0]["requests_running"] == 4 and seen[-1]["preemptions"] >= 2
    assert outputs == [seq for _, seq, _ in reference.generate(prompts, greedy(30))]


# ---- prefix reuse ---------------------------------------------------------------------------------


def test_a_shared_prefix_is_computed_once_counted_on_metrics_and_changes_no_output(debug_model_dir, reference):
    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families

    from raylm.serving.api import ApiSettings, build_api

    engine = engine_with(debug_model_dir)
    system = (reference.encode_prompt("You are a helpful assistant who writes Python. ") * 3)[:40]
    first, second = system + reference.encode_prompt(PROMPTS[0]), system + reference.encode_prompt(PROMPTS[1])
    assert engine.generate([first], greedy(8))[0][1] == reference.generate([first], greedy(8))[0][1]
    assert engine.stats()["prefix_cache_hit_tokens"] == 0
    assert engine.generate([second], greedy(8))[0][1] == reference.generate([second], greedy(8))[0][1]
    stats = engine.stats()
    assert stats["prefix_cache_hit_tokens"] == 32  # the system prompt's two full blocks
    assert stats["prefix_cache_queried_tokens"] == len(first) + len(second)
    assert stats["prefix_cache_hit_rate"] == pytest.approx(32 / (len(first) + len(second)))
    loop = EngineLoop(engine)
    try:
        text = TestClient(build_api(loop, ApiSettings(model_name="debug", api_key=None, max_body_bytes=1 << 20))).get("/metrics").text
    finally:
        loop.stop()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["raylm_engine_prefix_cache_hit_tokens"].type == "counter"
    assert families["raylm_engine_prefix_cache_hit_tokens"].samples[0].value == 32
    assert families["raylm_engine_prefix_cache_hit_rate"].samples[0].value == pytest.approx(stats["prefix_cache_hit_rate"])
    assert families["raylm_engine_kv_blocks_total"].samples[0].value == stats["kv_blocks_total"]
    assert families["raylm_engine_kv_blocks_used"].samples[0].value == 0
    assert families["raylm_engine_preemptions"].type == "counter"


def test_a_requests_n_choices_hold_their_prompts_blocks_once(debug_model_dir):
    engine = engine_with(debug_model_dir)
    prompt = (engine.encode_prompt(PROMPTS[2]) * 8)[:40]  # two full blocks and 8 tokens
    params = [SamplingParams(max_tokens=12, temperature=1.0, seed=s) for s in range(3)]
    seqs = [engine.submit(prompt, p, lambda out: None) for p in params]
    used = []
    while engine.has_work():
        engine.step()
        used.append(engine.stats()["kv_blocks_used"])
    assert max(used) == 2 + 3 * 2  # the shared two, and each choice's third and fourth (40 + 12 tokens)
    assert len({tuple(seq.output_ids) for seq in seqs}) == 3  # sampled independently


# ---- chunked prefill ------------------------------------------------------------------------------


def test_a_long_prompt_is_prefilled_in_chunks_while_decodes_advance_with_the_same_output(debug_model_dir, reference):
    engine = engine_with(debug_model_dir, max_prefill_tokens=8)
    short = reference.encode_prompt(PROMPTS[0])
    long = (reference.encode_prompt(PROMPTS[3]) * 10)[:50]
    decoding = engine.submit(short, greedy(30), lambda out: None)
    while not decoding.output_ids:  # its 9 tokens take two steps too
        engine.step()
    prefilling = engine.submit(long, greedy(6), lambda out: None)
    for step in range(1, 7):  # 50 tokens in chunks of 8: the first token after the 7th step
        engine.step()
        assert len(decoding.output_ids) == 1 + step and not prefilling.output_ids
        assert prefilling.num_computed == 8 * step
    engine.step()
    assert prefilling.num_computed == 50 and len(prefilling.output_ids) == 1
    while engine.has_work():
        engine.step()
    assert decoding.output_ids == reference.generate([short], greedy(30))[0][1]
    assert prefilling.output_ids == reference.generate([long], greedy(6))[0][1]
