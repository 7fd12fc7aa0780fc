"""The CPU decode-attention kernel (raylm/model/paged_attention.c), built for real with this
machine's compiler: it matches SDPA over the same keys for every cache dtype and shape it serves,
wherever the blocks lie, split across threads or not; the engine with it decodes what transformers
does; and without a compiler the cache falls back to SDPA and says why."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from raylm.inference.engine import Engine, EngineConfig
from raylm.inference.sampling import SamplingParams
from raylm.model import paged_attention
from raylm.model.paged_attention import load_decode_kernel
from raylm.model.transformer import KVCache, ModelConfig

BLOCK = 16


@pytest.fixture(scope="module")
def kernel():
    if os.environ.get("RAYLM_CPU_DECODE_KERNEL") == "0":
        pytest.skip("RAYLM_CPU_DECODE_KERNEL=0: the decode kernel is turned off")
    built = load_decode_kernel()
    assert built is not None, "the decode kernel did not build: is a C compiler (cc) on PATH?"
    return built


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: list[list[int]], lengths: list[int], rows: list[int],
              block: int = BLOCK) -> torch.Tensor:
    """Each decode's heads over its own keys, gathered slot by slot, through SDPA in float32."""
    heads, kv_heads = q.shape[1], k.shape[0]
    out = []
    for row, ids, length in zip(rows, blocks, lengths):
        slots = torch.tensor([ids[p // block] * block + p % block for p in range(length)])
        grouped = q[0, :, row].reshape(kv_heads, heads // kv_heads, -1)[None]
        out.append(F.scaled_dot_product_attention(grouped, k[None, :, slots].float(), v[None, :, slots].float()).reshape(heads, -1))
    return torch.stack(out, dim=1)  # [H, B, D]


def decode_case(dtype: torch.dtype, dim: int, group: int, kv_heads: int = 2, seed: int = 0, block: int = BLOCK):
    """Five decodes of 1 to 100 keys over scattered blocks, at rows 1, 3, 4, 6, 7 of a packed step
    of 9 tokens whose queries are laid out as the model makes them (a transposed view)."""
    torch.manual_seed(seed)
    lengths = [1, 15, 16, 17, 100]
    counts = [(n + block - 1) // block for n in lengths]
    order = torch.randperm(sum(counts) + 3).tolist()
    blocks = [order[sum(counts[:i]) : sum(counts[: i + 1])] for i in range(len(lengths))]
    slots = (sum(counts) + 3) * block
    k, v = (torch.randn(kv_heads, slots, dim).to(dtype) for _ in range(2))
    q = torch.randn(1, 9, kv_heads * group, dim).transpose(1, 2)  # [1, H, N, D], not contiguous
    return q, k, v, blocks, lengths, [1, 3, 4, 6, 7]


SHAPES = [(32, 2), (64, 1), (64, 3), (64, 4), (128, 2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("dim, group", SHAPES, ids=[f"dim{d}-group{g}" for d, g in SHAPES])
def test_the_kernel_matches_sdpa_over_scattered_blocks(kernel, dtype, dim, group):
    q, k, v, blocks, lengths, rows = decode_case(dtype, dim, group)
    assert kernel.serves(dtype, dim, group)
    out = torch.full_like(q, 7.0)
    kernel(q, k, v, out, kernel.batch(rows, blocks, lengths, bytes_per_key=1), BLOCK)
    assert torch.allclose(out[0][:, rows], reference(q, k, v, blocks, lengths, rows), atol=2e-5, rtol=1e-4)
    others = [r for r in range(q.shape[2]) if r not in rows]
    assert (out[0][:, others] == 7.0).all()  # rows that are not decodes are not written


@pytest.mark.parametrize("block", [1, 5, 40])
def test_blocks_smaller_or_larger_than_the_kernels_tile_of_16_keys(kernel, block):
    q, k, v, blocks, lengths, rows = decode_case(torch.float16, 64, 2, block=block)
    out = torch.empty_like(q)
    kernel(q, k, v, out, kernel.batch(rows, blocks, lengths, bytes_per_key=1), block)
    assert torch.allclose(out[0][:, rows], reference(q, k, v, blocks, lengths, rows, block), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_16_bit_cache_is_widened_exactly_subnormals_and_extremes_included(kernel, dtype):
    """With one key, a decode's output is its value row: every element must come back as the
    cache's number exactly (the kernel widens 16-bit floats with integer arithmetic of its own)."""
    info = torch.finfo(dtype)
    special = torch.tensor([0.0, -0.0, info.tiny, -info.tiny, info.smallest_normal / 3, -info.smallest_normal / 7, info.max, -info.max,
                            1.0, -2.5, 1e-3, 3.14159])
    v = torch.zeros(1, BLOCK, 64)
    v[0, 0] = torch.cat([special, torch.linspace(-60000 if dtype == torch.float16 else -1e30, 1e-6, 64 - len(special))])
    v = v.to(dtype)
    k = torch.zeros(1, BLOCK, 64, dtype=dtype)
    q = torch.randn(1, 1, 1, 64)
    out = torch.empty_like(q)
    kernel(q, k, v, out, kernel.batch([0], [[0]], [1], bytes_per_key=1), BLOCK)
    assert torch.equal(out[0, 0, 0], v[0, 0].float())


def test_a_float16_cache_saturates_instead_of_storing_infinities(kernel):
    cfg = ModelConfig(vocab_size=50, dim=128, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=64)
    cache = KVCache(cfg, num_blocks=2, block_size=BLOCK, dtype=torch.float16)
    cache.bind(torch.tensor([0, 1]), [(0, 2, [(0, 2)])])
    huge = torch.tensor([1e6, -1e6])[:, None].expand(2, 64)[None, None]  # [1, Hkv, N, D]: past float16's 65504
    cache.store(0, huge, huge)
    assert cache.k[0, 0, :2, 0].tolist() == cache.v[0, 0, :2, 0].tolist() == [65504, -65504]


def test_queries_of_a_bfloat16_model_attend_through_the_kernel_as_float32_ones_do(kernel):
    cfg = ModelConfig(vocab_size=50, dim=128, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=64)
    cache = KVCache(cfg, num_blocks=4, block_size=BLOCK)
    torch.manual_seed(0)
    cache.k.normal_(), cache.v.normal_()
    # A prompt chunk of 3 rows (through SDPA) between two decodes (through the kernel).
    cache.bind(torch.tensor([20, 40, 41, 42, 5]), [(0, 1, [(16, 21)]), (1, 3, [(32, 43)]), (4, 1, [(0, 6)])])
    q = torch.randn(1, 2, 5, 64).to(torch.bfloat16)
    assert torch.allclose(cache.attend(0, q).float(), cache.attend(0, q.float()), atol=1e-2)


def test_shared_out_to_torchs_threads_the_kernel_gives_the_same_result_in_the_same_process_pool(kernel, monkeypatch):
    assert kernel.parallel, "the kernel was built without OpenMP"
    q, k, v, blocks, lengths, rows = decode_case(torch.float32, 64, 3, seed=1)
    alone = torch.empty_like(q)
    few = kernel.batch(rows, blocks, lengths, bytes_per_key=1)  # 149 bytes: far under PARALLEL_MIN_BYTES
    kernel(q, k, v, alone, few, BLOCK)
    monkeypatch.setattr(paged_attention, "PARALLEL_MIN_BYTES", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        batch = kernel.batch(rows, blocks, lengths, bytes_per_key=1)
        shared = torch.empty_like(q)
        kernel(q, k, v, shared, batch, BLOCK)
    finally:
        torch.set_num_threads(threads)
    assert few.threads == 1 and batch.threads == 3
    assert torch.equal(shared[0][:, rows], alone[0][:, rows])  # each sequence-head is one thread's, whole
    # The kernel's OpenMP is torch's: one libgomp in the process, not a second thread pool.
    maps = Path("/proc/self/maps").read_text().splitlines()
    assert len({line.split()[-1] for line in maps if "libgomp" in line}) == 1


def test_shapes_and_dtypes_it_does_not_serve_are_left_to_sdpa(kernel):
    assert not kernel.serves(torch.float32, 96, 1)  # another head dim
    assert not kernel.serves(torch.float32, 64, 8)  # many query heads per KV head: SDPA's matmuls win
    assert not kernel.serves(torch.float32, 32, 4) and not kernel.serves(torch.float32, 128, 4)
    assert not kernel.serves(torch.int8, 64, 1)
    cfg = ModelConfig(vocab_size=50, dim=96 * 2, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
    assert KVCache(cfg, num_blocks=4, block_size=BLOCK).decode_kernel is None
    cfg = ModelConfig(vocab_size=50, dim=64 * 2, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=64)
    assert KVCache(cfg, num_blocks=4, block_size=BLOCK, dtype=torch.bfloat16).decode_kernel is kernel


def test_the_engine_with_the_kernel_decodes_what_transformers_does(tmp_path, tokenizer_dir, kernel):
    """A model whose heads the kernel serves (dim 64, two query heads per KV head): four prompts of
    different lengths decode together, every step's attention through the kernel."""
    transformers = pytest.importorskip("transformers")
    from tiny_artifacts import make_model_dir

    model_dir = make_model_dir(tmp_path / "head64", tokenizer_dir, dim=128, n_heads=2, n_kv_heads=1, n_layers=2)
    engine = Engine(model_dir, EngineConfig(max_batch_size=4, max_model_len=128, threads=1))
    assert engine.runner.cache.decode_kernel is kernel
    hf = transformers.LlamaForCausalLM.from_pretrained(model_dir).eval()
    prompts = [engine.encode_prompt(p) for p in ["def add(a, b):", "import os", "The json module encodes text", "x"]]
    ours = engine.generate(prompts, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    for ids, (_, out_ids, _) in zip(prompts, ours):
        with torch.no_grad():
            theirs = hf.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)[0, len(ids):].tolist()
        assert out_ids == theirs


def test_without_a_compiler_the_cache_attends_with_sdpa_and_says_why_once(monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.delenv("RAYLM_CPU_DECODE_KERNEL", raising=False)
    load_decode_kernel.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="raylm.model.paged_attention"):
            cfg = ModelConfig(vocab_size=50, dim=128, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=64)
            caches = [KVCache(cfg, num_blocks=4, block_size=BLOCK) for _ in range(2)]
        assert all(cache.decode_kernel is None for cache in caches)
        [record] = caplog.records
        assert "no C compiler" in record.getMessage() and "no-such-cc" in record.getMessage() and "SDPA" in record.getMessage()
    finally:
        load_decode_kernel.cache_clear()


def test_a_build_lands_whole_under_a_name_for_this_source_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("RAYLM_KERNEL_CACHE", str(tmp_path / "kernels"))
    monkeypatch.delenv("RAYLM_CPU_DECODE_KERNEL", raising=False)  # this test is of the build, whatever the caller turned off
    load_decode_kernel.cache_clear()
    try:
        assert load_decode_kernel() is not None
        [built] = (tmp_path / "kernels").iterdir()  # no staged copy left beside it
        assert built.name.startswith("paged_attention-") and built.suffix == ".so"
        first = built.stat().st_mtime_ns
        load_decode_kernel.cache_clear()
        assert load_decode_kernel() is not None
        assert list((tmp_path / "kernels").iterdir()) == [built] and built.stat().st_mtime_ns == first  # loaded, not built again
    finally:
        load_decode_kernel.cache_clear()
