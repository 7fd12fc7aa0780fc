"""The model dir: a Hugging Face Llama-format directory, the one contract between training and serving.

    config.json              LlamaForCausalLM config
    model.safetensors        weights, HF names (`model.layers.0.self_attn.q_proj.weight`, ...)
    generation_config.json   bos / eos / pad ids
    tokenizer.json, tokenizer_config.json (+ special_tokens_map.json when the source had one)
    manifest.json            raylm's note of what made it and the weights' checksum (absent in
                             model dirs made elsewhere; they load all the same)

`save_model_dir` writes into a temporary sibling and renames it into place, so a crash never
leaves a dir that looks complete. `load_model_dir` reads ours and open Llama-format models
(sharded safetensors too) and refuses configs this architecture does not implement.
"""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from raylm.core.errors import UserError
from raylm.core.files import atomic_dir, file_sha256, write_json_atomic
from raylm.model.chat import special_token_ids
from raylm.model.transformer import ModelConfig, Transformer

MANIFEST_KIND = "raylm.model"
FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
HF_PREFIX = "model."  # HF nests all but lm_head under `model.`

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---- config ---------------------------------------------------------------------------------------


def hf_config(cfg: ModelConfig, dtype: str, special_ids: dict[str, int | None]) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
        "bos_token_id": special_ids.get("bos"),
        "eos_token_id": special_ids.get("eos"),
        "pad_token_id": special_ids.get("pad"),
        "torch_dtype": dtype,
        "use_cache": True,
    }


def model_config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """ModelConfig from a HF config.json dict; anything we do not implement is refused by name."""
    archs = hf.get("architectures") or []
    if hf.get("model_type") != "llama" or (archs and archs != ["LlamaForCausalLM"]):
        raise UserError(
            f"{where}: model_type={hf.get('model_type')!r}, architectures={archs!r}; raylm loads only "
            "Llama-architecture models (model_type 'llama', LlamaForCausalLM)"
        )
    # transformers >= 5 writes `rope_parameters` {rope_theta, rope_type, ...}; older writers use
    # `rope_theta` + `rope_scaling`. Read both.
    rope = dict(hf.get("rope_parameters") or {})
    rope.update(hf.get("rope_scaling") or {})
    kind = rope.get("rope_type", rope.get("type"))
    if kind not in (None, "default"):
        raise UserError(f"{where}: rope_scaling of type {kind!r} is not implemented; only plain RoPE (rope_scaling: null)")
    rope_theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise UserError(f"{where}: {key}=true is not supported; raylm's Llama has no biases")
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{where}: hidden_act={hf['hidden_act']!r} is not supported; only 'silu' (SwiGLU)")
    try:
        n_heads = hf["num_attention_heads"]
        cfg = ModelConfig(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            ffn_dim=hf["intermediate_size"],
            max_seq_len=hf.get("max_position_embeddings", 2048),
            rope_theta=float(rope_theta),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            init_std=float(hf.get("initializer_range", 0.02)),
        )
    except KeyError as err:
        raise UserError(f"{where}: required field {err.args[0]!r} is missing") from None
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim != cfg.dim // cfg.n_heads:
        raise UserError(f"{where}: head_dim={head_dim} != hidden_size/num_attention_heads; not supported")
    cfg.validate()
    return cfg


# ---- save ---------------------------------------------------------------------------------------


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # HF stores a tied head once, as the embedding
        hf_name = name if name.startswith("lm_head.") else HF_PREFIX + name
        out[hf_name] = tensor.detach().to("cpu", dtype).contiguous()
    return out


def save_model_dir(
    out: str | Path,
    state: dict[str, torch.Tensor],
    cfg: ModelConfig,
    tokenizer_dir: str | Path,
    dtype: str = "float32",
    source: dict | None = None,
) -> Path:
    """Write a complete model dir at `out` (replacing an old one), atomically."""
    out = Path(out)
    if dtype not in _DTYPES:
        raise UserError(f"model dir dtype {dtype!r}: expected one of {sorted(_DTYPES)}")
    tokenizer_dir = Path(tokenizer_dir)
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise UserError(f"tokenizer dir {str(tokenizer_dir)!r} has no tokenizer.json")
    with atomic_dir(out) as tmp:
        weights = to_hf_state_dict(state, cfg, _DTYPES[dtype])
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        ids = special_token_ids(tokenizer_dir)
        write_json_atomic(tmp / "config.json", hf_config(cfg, dtype, ids))
        write_json_atomic(tmp / "generation_config.json", {"bos_token_id": ids["bos"], "eos_token_id": ids["stop"] or ids["eos"], "pad_token_id": ids["pad"]})
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copyfile(tokenizer_dir / name, tmp / name)
        write_json_atomic(tmp / "manifest.json", {
            "kind": MANIFEST_KIND,
            "format_version": FORMAT_VERSION,
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "dtype": dtype,
            "parameters": sum(t.numel() for t in weights.values()),
            "weights_sha256": file_sha256(tmp / "model.safetensors"),
            "source": source or {},
        })
    return out


# ---- load ---------------------------------------------------------------------------------------


def read_model_config(model_dir: str | Path) -> ModelConfig:
    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise UserError(f"model dir {str(model_dir)!r} does not exist")
    if not path.is_file():
        raise UserError(f"{str(model_dir)!r} is not a model dir: config.json is missing (expected a Hugging Face Llama-format dir)")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    return model_config_from_hf(hf, str(path))


def read_hf_weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a model dir, from model.safetensors or a sharded index. Never unpickles."""
    model_dir = Path(model_dir)
    single, index = model_dir / "model.safetensors", model_dir / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(model_dir / shard)))
        return state
    raise UserError(
        f"model dir {str(model_dir)!r} has no model.safetensors (or sharded index); raylm loads safetensors only, never pickled .bin files"
    )


def check_manifest(model_dir: Path) -> None:
    path = model_dir / "manifest.json"
    if not path.is_file():
        return  # a model dir made elsewhere
    manifest = json.loads(path.read_text())
    if manifest.get("kind") != MANIFEST_KIND:
        raise UserError(f"{path}: kind is {manifest.get('kind')!r}, expected {MANIFEST_KIND!r}")
    expected = manifest.get("weights_sha256")
    if expected and file_sha256(model_dir / "model.safetensors") != expected:
        raise UserError(f"{model_dir / 'model.safetensors'}: checksum differs from manifest.json (a partial copy?)")


def from_hf_state_dict(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    state = {}
    for name, tensor in hf_state.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer some older exports carry; we recompute it
        state[name[len(HF_PREFIX):] if name.startswith(HF_PREFIX) else name] = tensor
    if cfg.tie_embeddings and "embed_tokens.weight" in state:
        state.setdefault("lm_head.weight", state["embed_tokens.weight"])
    return state


def load_model_dir(model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> tuple[Transformer, ModelConfig]:
    """A model dir -> (Transformer in eval mode on `device`, its ModelConfig)."""
    model_dir = Path(model_dir)
    cfg = read_model_config(model_dir)
    check_manifest(model_dir)
    state = from_hf_state_dict(read_hf_weights(model_dir), cfg)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise UserError(f"{model_dir}: weights do not fit config.json (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.to(device=device, dtype=dtype).eval(), cfg
