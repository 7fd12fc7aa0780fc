"""The model against Hugging Face's Llama, and the KV cache against the full forward."""

from __future__ import annotations

import json
import os

import pytest
import torch
from tiny_artifacts import make_tokenizer_dir

from raylm.core.errors import UserError
from raylm.model import transformer
from raylm.model.model_dir import load_model_dir, save_model_dir
from raylm.model.transformer import KVCache, ModelConfig, Transformer, count_params

transformers = pytest.importorskip("transformers")


CASES = {
    "gqa-untied": dict(num_key_value_heads=2, tie_word_embeddings=False),
    "mha-tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_llama_loads_with_equal_logits(tmp_path, case):
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=101, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, rope_theta=500000.0, rms_norm_eps=1e-6, **CASES[case],
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    ours, cfg = load_model_dir(tmp_path / "hf")
    assert (cfg.n_kv_heads, cfg.tie_embeddings, cfg.rope_theta) == (hf_cfg.num_key_value_heads, hf_cfg.tie_word_embeddings, 500000.0)
    tokens = torch.randint(0, 101, (2, 37))
    with torch.no_grad():
        diff = (ours(tokens) - hf(tokens).logits).abs().max().item()
    assert diff <= 1e-4


def test_our_model_dir_loads_in_transformers_with_equal_logits(tmp_path):
    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64, rope_theta=50000.0)
    ours = Transformer(cfg).eval()
    out = save_model_dir(tmp_path / "model", ours.state_dict(), cfg, make_tokenizer_dir(tmp_path / "tok"))
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "manifest.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"
    ]
    hf = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    tokens = torch.randint(0, 300, (3, 20))
    with torch.no_grad():
        assert (ours(tokens) - hf(tokens).logits).abs().max().item() <= 1e-4
    reloaded, _ = load_model_dir(out)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), reloaded.state_dict().values()))


def test_kv_cache_decode_matches_full_forward_for_sequences_of_different_lengths():
    torch.manual_seed(2)
    cfg = ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
    model = Transformer(cfg).eval()
    seqs = [torch.randint(0, 50, (n,)) for n in (5, 11)]
    cache = KVCache(cfg, num_blocks=8, block_size=4)
    blocks = [[6, 7], [0, 3, 4]]  # any blocks, not 0..k-1, and not consecutive either
    slot = lambda i, p: blocks[i][p // 4] * 4 + p % 4  # noqa: E731
    # Prefill the first 3 tokens of both in one packed row, then decode the rest together.
    ranges = [[(slot(i, 0), slot(i, 0) + 3)] for i in range(2)]
    cache.bind(torch.tensor([slot(i, p) for i in range(2) for p in range(3)]), [(0, 3, ranges[0]), (3, 3, ranges[1])])
    with torch.no_grad():
        model(torch.cat([s[:3] for s in seqs])[None], positions=torch.tensor([[0, 1, 2] * 2]), cache=cache)
    decoded = {0: [], 1: []}
    for pos in range(3, 11):
        live = [i for i, s in enumerate(seqs) if pos < len(s)]
        spans = []
        for row, i in enumerate(live):
            held = [(b * 4, b * 4 + min(4, pos + 1 - k * 4)) for k, b in enumerate(blocks[i]) if k * 4 <= pos]
            spans.append((row, 1, held))
        cache.bind(torch.tensor([slot(i, pos) for i in live]), spans)
        with torch.no_grad():
            logits = model(torch.stack([seqs[i][pos] for i in live])[None], positions=torch.tensor([[pos] * len(live)]), cache=cache)
        for row, i in enumerate(live):
            decoded[i].append(logits[0, row])
    for i, seq in enumerate(seqs):
        with torch.no_grad():
            full = model(seq[None])[0, 3:]
        assert torch.allclose(torch.stack(decoded[i]), full, atol=1e-5)


@pytest.mark.parametrize(
    "solo_bytes, gather_bytes, dim, cache_dtype",
    [(0, 1 << 30, 32, torch.float32), (1 << 30, 1 << 30, 32, torch.float32), (1 << 30, 2000, 32, torch.float32),
     (0, 0, 256, torch.float32), (0, 0, 256, torch.bfloat16)],
    ids=["each-decode-alone", "decodes-batched", "the-longest-alone-past-the-gather-bound", "decode-kernel", "decode-kernel-bfloat16-cache"])
def test_kv_cache_step_packing_a_prompt_chunk_before_two_decodes_matches_full_forwards(solo_bytes, gather_bytes, dim, cache_dtype, monkeypatch):
    """The decodes of a step attend in one batched call (or each alone over a view of its keys, or
    the longest alone when the padded gather would pass its bound, or, with 64-dim heads, in the C
    kernel over their blocks in place), wherever they sit in the packed row; a prompt's later chunk
    beside them attends over its earlier keys and its own, causally."""
    if dim == 256 and os.environ.get("RAYLM_CPU_DECODE_KERNEL") == "0":
        pytest.skip("RAYLM_CPU_DECODE_KERNEL=0: the decode kernel is turned off")
    monkeypatch.setattr(transformer, "SOLO_DECODE_MIN_BYTES", solo_bytes)
    monkeypatch.setattr(transformer, "GATHER_MAX_BYTES", gather_bytes)
    torch.manual_seed(3)
    cfg = ModelConfig(vocab_size=50, dim=dim, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
    model = Transformer(cfg).eval()
    seqs = [torch.randint(0, 50, (n,)) for n in (7, 4, 9)]  # A and B decode; C is a prompt in two chunks
    blocks = [[5, 1], [2], [7, 0, 3]]
    slot = lambda i, p: blocks[i][p // 4] * 4 + p % 4  # noqa: E731

    def held(i: int, length: int) -> list[tuple[int, int]]:
        return [(b * 4, b * 4 + min(4, length - k * 4)) for k, b in enumerate(blocks[i]) if k * 4 < length]

    cache = KVCache(cfg, num_blocks=8, block_size=4, dtype=cache_dtype)
    assert (cache.decode_kernel is not None) == (cfg.head_dim == 64)
    # Step 1: A's first 6 tokens, B's first 3, C's first 5, packed.
    first = {0: 6, 1: 3, 2: 5}
    spans, row = [], 0
    for i, n in first.items():
        spans.append((row, n, held(i, n)))
        row += n
    cache.bind(torch.tensor([slot(i, p) for i, n in first.items() for p in range(n)]), spans)
    with torch.no_grad():
        model(torch.cat([seqs[i][:n] for i, n in first.items()])[None], positions=torch.tensor([[p for n in first.values() for p in range(n)]]), cache=cache)
    # Step 2: C's last 4 tokens first, then A's and B's next token.
    order = [(2, 5, 4), (0, 6, 1), (1, 3, 1)]  # (sequence, first position, tokens)
    spans, row = [], 0
    for i, start, n in order:
        spans.append((row, n, held(i, start + n)))
        row += n
    cache.bind(torch.tensor([slot(i, p) for i, start, n in order for p in range(start, start + n)]), spans)
    with torch.no_grad():
        logits = model(torch.cat([seqs[i][start : start + n] for i, start, n in order])[None],
                       positions=torch.tensor([[p for _, start, n in order for p in range(start, start + n)]]), cache=cache)[0]
        full = [model(seq[None])[0] for seq in seqs]
    atol = 1e-5 if cache_dtype == torch.float32 else 5e-3  # a bfloat16 cache rounds keys and values to 8 significant bits
    assert torch.allclose(logits[:4], full[2][5:9], atol=atol)
    assert torch.allclose(logits[4], full[0][6], atol=atol)
    assert torch.allclose(logits[5], full[1][3], atol=atol)


def test_unsupported_configs_are_refused_by_name(tmp_path):
    transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match="rope_scaling of type 'yarn'"):
        load_model_dir(tmp_path)
    raw.update(rope_parameters=None, model_type="mistral", architectures=["MistralForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match="Llama-architecture"):
        load_model_dir(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        load_model_dir(tmp_path / "nope")


def test_param_count_matches_the_module():
    for tie in (False, True):
        cfg = ModelConfig(vocab_size=77, dim=48, n_layers=3, n_heads=6, n_kv_heads=2, ffn_dim=96, tie_embeddings=tie)
        model = Transformer(cfg)
        assert count_params(cfg) == sum(p.numel() for p in model.parameters())
