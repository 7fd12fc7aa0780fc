"""Import parity on the fine-tune path: an open Llama-format model in, the same weights out.

A small random `LlamaForCausalLM` (GQA, untied embeddings) made with transformers and saved with
`save_pretrained` is the base; our loader gives its logits; fine-tuning it with lr 0 through the
real train loop (Ray Train + DeepSpeed) and exporting gives back exactly its weights.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from raylm.core.errors import UserError
from raylm.model.model_dir import load_model_dir
from raylm.training.finetune import load_finetune_config
from raylm.training.finetune import main as finetune_main

transformers = pytest.importorskip("transformers")

CHAT = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"What is {i} + {i}?"},
                  {"role": "assistant", "content": f"It is {2 * i}."}]}
    for i in range(24)
]


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory, tokenizer_dir):
    """A transformers-made Llama (GQA 4:2, untied, rope_theta 5e5) with our ChatML tokenizer beside it."""
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=128, rope_theta=500000.0,
        rms_norm_eps=1e-6,
    )
    path = tmp_path_factory.mktemp("hf") / "base"
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(path, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / name, path / name)
    return path


def test_base_loads_with_equal_logits(hf_base):
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_base).eval()
    ours, cfg = load_model_dir(hf_base)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.tie_embeddings, cfg.rope_theta) == (4, 2, False, 500000.0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        assert (ours(tokens) - hf(tokens).logits).abs().max().item() <= 1e-4


def test_finetune_with_lr_zero_exports_the_same_weights(hf_base, tmp_path, ray_cluster):
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps(r) + "\n" for r in CHAT))
    out = tmp_path / "run"
    rc = finetune_main([
        "--config", "sft-debug", "--base", str(hf_base), "--data", str(chat), "--out", str(out),
        "--num-workers", "1", "--max-steps", "1", "optimizer.lr=0.0", "schedule.warmup_steps=0",
        "data.seq_len=64", "data.micro_batch=4", "eval_prompts=[]", "logging.wandb_mode=disabled",
    ])
    assert rc == 0
    exported = load_file(str(out / "model" / "model.safetensors"))
    original = load_file(str(hf_base / "model.safetensors"))
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(exported[name].to(tensor.dtype), tensor), name
    config = json.loads((out / "model" / "config.json").read_text())
    assert (config["num_key_value_heads"], config["tie_word_embeddings"], config["rope_theta"]) == (2, False, 500000.0)
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["before"]["val_loss"] == pytest.approx(summary["after"]["val_loss"], abs=1e-5)


def test_unsupported_bases_and_model_keys_are_refused(hf_base, tmp_path):
    other = tmp_path / "mistral"
    other.mkdir()
    config = json.loads((hf_base / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "mistral", "architectures": ["MistralForCausalLM"]}))
    with pytest.raises(UserError, match="Llama"):
        load_finetune_config("sft-debug", str(other), [])
    scaled = tmp_path / "yarn"
    scaled.mkdir()
    (scaled / "config.json").write_text(json.dumps({**config, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(UserError, match="yarn"):
        load_finetune_config("sft-debug", str(scaled), [])
    with pytest.raises(UserError, match="model.dim"):
        load_finetune_config("sft-debug", str(hf_base), ["model.dim=128"])
    with pytest.raises(UserError, match="data.seq_len"):
        load_finetune_config("sft-debug", str(hf_base), ["data.seq_len=512"])  # past the base's 128 positions
