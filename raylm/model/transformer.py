"""The raylm model: a decoder-only transformer that is exactly Llama's architecture.

Choices, each one Llama's, so that the model dir loads in `transformers` and vLLM unchanged:
- token embedding, no absolute positions; rotary position embeddings (RoPE) in Hugging Face's
  rotate-half layout (the first and second half of each head's dims form the rotated pairs),
  computed in fp32;
- pre-norm blocks with RMSNorm (normalise in fp32, scale with a learned weight, no bias);
- grouped-query attention (n_kv_heads divides n_heads; kv head i serves query heads
  i*g .. i*g+g-1) through `F.scaled_dot_product_attention`;
- SwiGLU feed-forward: down(silu(gate(x)) * up(x));
- no biases anywhere; a final RMSNorm; an LM head, optionally tied to the embedding;
- packed rows (several examples in one row, for SFT) through `segments`: a block-diagonal causal
  mask handed to SDPA and positions that restart per example, so each example is computed exactly
  as it would be alone.

Parameter names mirror Hugging Face's `LlamaForCausalLM` (without its `model.` prefix), so export
and import are a rename of the prefix, not a mapping table.

Init: normal(0, init_std) for embeddings and projections; the two projections that write into the
residual stream (o_proj, down_proj) are scaled by 1/sqrt(2 * n_layers) so the residual's variance
does not grow with depth (GPT-2's rule); norm weights start at 1.

Pure PyTorch: no Ray, no DeepSpeed. Activation checkpointing is applied from outside through the
`activation_checkpoint` hook; the KV cache used for generation is the paged `KVCache` below. On a
CPU its decode steps attend through a small C kernel (paged_attention.c), built on first use; where
it cannot be built, SDPA does the same work.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from raylm.model.paged_attention import (
    DecodeBatch,
    load_decode_kernel,
    padded_block_table,
)


@dataclass
class ModelConfig:
    vocab_size: int = 8192  # tokens in the tokenizer (the dataset's manifest must agree)
    dim: int = 256  # hidden size (HF: hidden_size)
    n_layers: int = 4  # transformer blocks (HF: num_hidden_layers)
    n_heads: int = 4  # query heads (HF: num_attention_heads)
    n_kv_heads: int = 2  # key/value heads for GQA; equal to n_heads for plain multi-head attention
    ffn_dim: int = 768  # SwiGLU inner size (HF: intermediate_size)
    max_seq_len: int = 512  # longest context the model is trained and served at
    rope_theta: float = 10000.0  # RoPE base frequency
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = False  # share the embedding matrix with the LM head
    init_std: float = 0.02  # std of the normal init of weights

    def validate(self) -> None:
        from raylm.core.errors import UserError

        if self.dim % self.n_heads:
            raise UserError(f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads ({self.n_kv_heads})")
        if (self.dim // self.n_heads) % 2:
            raise UserError(f"model head size dim/n_heads ({self.dim // self.n_heads}) must be even for RoPE")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise UserError(f"model.{name} must be positive, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def count_params(cfg: ModelConfig, include_embedding: bool = True) -> int:
    attn = cfg.dim * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    mlp = 3 * cfg.dim * cfg.ffn_dim
    norms = 2 * cfg.dim
    body = cfg.n_layers * (attn + mlp + norms) + cfg.dim
    embedding = cfg.vocab_size * cfg.dim
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim
    return body + head + (embedding if include_embedding else 0)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM's estimate: 6N + 12·L·d·T.

    N counts the matmul weights (the LM head included, the embedding lookup not); the second
    term is attention's score and value matmuls at context length T.
    """
    n_matmul = count_params(cfg, include_embedding=False) - (2 * cfg.n_layers + 1) * cfg.dim
    if cfg.tie_embeddings:
        n_matmul += cfg.vocab_size * cfg.dim
    return 6.0 * n_matmul + 12.0 * cfg.n_layers * cfg.dim * seq_len


# ---- RoPE ---------------------------------------------------------------------------------------


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for `positions` [B, T] -> each [B, 1, T, head_dim], fp32 (HF's layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # [B, T, head_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, head_dim]
    return emb.cos()[:, None], emb.sin()[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D] rotated by position; computed in fp32, returned in x's dtype."""
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


# ---- blocks -------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


SOLO_DECODE_MIN_BYTES = 128 * 1024  # on a CPU, a decode whose keys and values (per layer) are one range at least this big attends alone
GATHER_MAX_BYTES = 256 * 1024 * 1024  # the batched decodes' gathered keys and values (per layer, padded) at most; the longest attend alone past it


class KVCache:
    """Keys and values of many sequences in fixed-size blocks: `k` and `v` [layers, kv heads,
    slots, head dim], where block b holds slots b*block_size .. (b+1)*block_size - 1.

    Each forward computes some new tokens of several sequences packed into one row (a decode's one
    token, a chunk of a prompt): `bind(slots, spans)` says where each new token's keys and values
    go and, per sequence, which rows are its queries and which slot ranges hold its keys so far.
    A query at position p attends to the keys of positions 0..p of its own sequence. On a CPU with
    the decode kernel (paged_attention.py), a step's decodes attend in one call that reads their
    blocks in place. Otherwise they attend in one SDPA call, their blocks gathered into a padded
    batch, except (on a CPU) a long one whose keys lie in one range, which attends alone over a view
    of them (`attends_alone`). A prompt's chunk attends alone, over a view of its keys or, spread
    over several ranges, a copy.

    Usage per forward: `cache.bind(slots, spans)`, then `model(tokens [1, N], positions=positions,
    cache=cache)`.
    """

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, device=None, dtype=torch.float32):
        shape = (cfg.n_layers, cfg.n_kv_heads, num_blocks * block_size, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.block_size = block_size
        self.bytes_per_key = 2 * cfg.n_kv_heads * cfg.head_dim * self.k.element_size()  # a position's keys and values, all heads
        kernel = load_decode_kernel() if self.k.device.type == "cpu" else None
        self.decode_kernel = kernel if kernel is not None and kernel.serves(dtype, cfg.head_dim, cfg.n_heads // cfg.n_kv_heads) else None
        self.slots: torch.Tensor | None = None
        self.paged_decode: DecodeBatch | None = None  # the step's decodes, for the kernel
        self.decode: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # for SDPA: rows, gathered blocks, key mask
        self.spans: list[tuple[int, int, list[tuple[int, int]], torch.Tensor | None]] = []  # the rest: row, rows, ranges, gather index

    def bind(self, slots: torch.Tensor, spans: list[tuple[int, int, list[tuple[int, int]]]]) -> None:
        """slots [N]: each new token's cache slot. spans: per sequence (its first row, its row count,
        the slot ranges [start, end) that hold its keys in order, the new tokens' included; each
        range starts at a block's start)."""
        self.slots = slots
        device, size = slots.device, self.block_size
        self.paged_decode = self.decode = None

        def blocks_of(ranges: list[tuple[int, int]]) -> list[int]:
            return [b for start, end in ranges for b in range(start // size, (end + size - 1) // size)]

        if self.decode_kernel is not None:  # every decode, in place
            decodes = [(row, ranges) for row, rows, ranges in spans if rows == 1]
            if decodes:
                self.paged_decode = self.decode_kernel.batch([row for row, _ in decodes], [blocks_of(ranges) for _, ranges in decodes],
                                                             [sum(end - start for start, end in ranges) for _, ranges in decodes], self.bytes_per_key)
        else:  # the decodes in one SDPA call, but those that attend alone
            batched = sorted(((row, ranges) for row, rows, ranges in spans if rows == 1 and not self.attends_alone(ranges)),
                             key=lambda decode: len(blocks_of(decode[1])))
            while batched and len(batched) * len(blocks_of(batched[-1][1])) * size * self.bytes_per_key > GATHER_MAX_BYTES:
                batched.pop()  # each one is padded to the longest: past the bound, the longest attend alone
            decodes = batched if len(batched) >= 2 else []
            if decodes:  # their blocks gathered into a padded batch
                table = padded_block_table([blocks_of(ranges) for _, ranges in decodes])  # padding gathers block 0, masked out
                lengths = torch.tensor([sum(end - start for start, end in ranges) for _, ranges in decodes])
                valid = torch.arange(table.shape[1] * size)[None, :] < lengths[:, None]  # [B, L]: the keys each one has
                self.decode = (torch.tensor([row for row, _ in decodes], device=device), table.flatten().to(device), valid[:, None, None].to(device))
        taken = {row for row, _ in decodes}  # the rest attend alone, prompts' chunks included
        self.spans = [(row, rows, ranges, None if len(ranges) == 1 else torch.cat([torch.arange(a, b) for a, b in ranges]).to(device))
                      for row, rows, ranges in spans if row not in taken]

    def attends_alone(self, ranges: list[tuple[int, int]]) -> bool:
        """Whether a decode whose keys lie in `ranges` is cheaper in a call of its own, over a view of
        its keys, than gathered into the batched call. On a CPU, a call costs about what copying
        100-200 keys does (bench/serve.py's decode steps), so a long sequence whose keys are one
        range attends alone. On a GPU the copy is cheap next to another kernel launch."""
        if self.k.device.type != "cpu" or len(ranges) != 1:
            return False
        (start, end), = ranges
        return (end - start) * self.bytes_per_key >= SOLO_DECODE_MIN_BYTES

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [1, Hkv, N, D] at the bound slots."""
        if self.k.dtype == torch.float16:  # saturate at float16's largest value: past it a cast gives inf
            k, v = k.clamp(-65504, 65504), v.clamp(-65504, 65504)
        self.k[layer][:, self.slots] = k[0].to(self.k.dtype)
        self.v[layer][:, self.slots] = v[0].to(self.v.dtype)

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """q [1, H, N, D] -> [1, H, N, D]: each sequence's queries over its own keys."""
        k, v = self.k[layer], self.v[layer]  # [Hkv, slots, D]
        hkv, (_, heads, _, dim) = k.shape[0], q.shape
        out = torch.empty_like(q)
        if self.paged_decode is not None:  # read from q and written into out in place, when they are float32
            if q.dtype == torch.float32 and q.stride(-1) == 1:
                self.decode_kernel(q, k, v, out, self.paged_decode, self.block_size)
            else:  # the decodes' rows alone, widened: [1, H, B, D]
                rows = self.paged_decode.rows
                queries = q[:, :, rows].float()
                attended = torch.empty_like(queries)
                self.decode_kernel(queries, k, v, attended, dataclasses.replace(self.paged_decode, rows=torch.arange(len(rows))), self.block_size)
                out[:, :, rows] = attended.to(q.dtype)
        if self.decode is not None:
            # Each decode's one query per head, laid out as rows of its KV head: [B, Hkv, H/Hkv, D]
            # against [B, Hkv, L, D], so GQA needs no repeated keys and one SDPA call serves them all.
            rows, table, valid = self.decode
            batch, size = rows.shape[0], self.block_size
            grouped = q[0, :, rows].transpose(0, 1).reshape(batch, hkv, heads // hkv, dim)
            # Whole blocks are copied (each a contiguous run of size * dim values per head), not single slots.
            keys = k.view(hkv, -1, size * dim).index_select(1, table).view(hkv, batch, -1, dim).transpose(0, 1).to(q.dtype)
            values = v.view(hkv, -1, size * dim).index_select(1, table).view(hkv, batch, -1, dim).transpose(0, 1).to(q.dtype)
            attended = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=valid)  # [B, Hkv, H/Hkv, D]
            out[0, :, rows] = attended.reshape(batch, heads, dim).transpose(0, 1)
        for row, rows, ranges, index in self.spans:
            if index is None:  # one range: a view, no copy
                (start, end), = ranges
                keys, values = k[:, start:end], v[:, start:end]
            else:
                keys, values = k.index_select(1, index), v.index_select(1, index)
            length = keys.shape[1]
            if rows == 1:  # a lone decode: its query heads as rows of their KV head, as above
                grouped = q[0, :, row].reshape(hkv, heads // hkv, dim)[None]  # [1, Hkv, H/Hkv, D]
                attended = F.scaled_dot_product_attention(grouped, keys[None].to(q.dtype), values[None].to(q.dtype))
                out[:, :, row] = attended.reshape(1, heads, dim)
                continue
            mask, causal = None, False
            if rows == length:  # a prompt from its start
                causal = True
            else:  # a chunk after earlier tokens: query i sits at position length - rows + i
                mask = torch.arange(length, device=q.device)[None, :] <= torch.arange(length - rows, length, device=q.device)[:, None]
            out[:, :, row : row + rows] = F.scaled_dot_product_attention(
                q[:, :, row : row + rows], keys[None].to(q.dtype), values[None].to(q.dtype), attn_mask=mask, is_causal=causal, enable_gqa=True)
        return out


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, cache: KVCache | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`mask` [B, 1, T, T] (True = may attend) replaces the causal mask, e.g. for packed rows."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # the new tokens' keys join their sequences' blocks; each attends over its own
            cache.store(self.layer_index, k, v)
            y = cache.attend(self.layer_index, q)  # [1, H, N, D]
            return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))
        causal = mask is None
        groups = self.n_heads // self.n_kv_heads
        if groups > 1:  # kv head i serves query heads i*groups .. i*groups+groups-1
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # [B, T, dim]


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_index)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache: KVCache | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


@torch.no_grad()
def init_module_weights(module: nn.Module, name: str, cfg: ModelConfig) -> None:
    """Initialise one module's own weights (see Init above); `name` is its name in the model.

    One module at a time, in `named_modules()` order, so that a caller holding the model in shards
    (DeepSpeed ZeRO-3) can gather each module, initialise it here, and get the same weights.
    """
    if isinstance(module, nn.Linear):
        residual = name.endswith(("o_proj", "down_proj"))
        nn.init.normal_(module.weight, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layers) if residual else cfg.init_std)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=cfg.init_std)
    elif isinstance(module, RMSNorm):
        nn.init.ones_(module.weight)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Set from outside (e.g. to torch.utils.checkpoint's or DeepSpeed's checkpoint function)
        # to recompute each block's activations in the backward pass instead of storing them.
        self.activation_checkpoint: Callable | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name, module in self.named_modules():
            init_module_weights(module, name, self.cfg)

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        segments: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ):
        """tokens [B, T] -> logits [B, T, vocab] (fp32), or the mean loss when targets [B, T] are given.

        `loss_mask` [B, T] (bool) keeps the loss on the True positions only (e.g. assistant
        tokens in chat SFT). `positions` [B, T] defaults to 0..T-1; with a `cache` they say where
        each token sits in its sequence. `segments` [B, T] marks packed rows: a token attends only
        to earlier tokens of its own segment, and its position counts from its segment's start
        (unless `positions` are given), so each packed example is computed as if it were alone.
        `rows` [R] picks the positions of a one-row batch whose logits are wanted ([1, R, vocab]):
        the last token of each sequence when several are packed with a cache, say.
        """
        B, T = tokens.shape
        mask = None
        if segments is not None:
            mask = segment_causal_mask(segments)
            if positions is None:
                positions = segment_positions(segments)
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)
        x = self.embed_tokens(tokens)  # [B, T, dim]
        for layer in self.layers:
            if self.activation_checkpoint is not None and self.training and cache is None:
                x = self.activation_checkpoint(layer, x, cos, sin, None, mask)
            else:
                x = layer(x, cos, sin, cache, mask)
        if rows is not None:
            x = x[:, rows]
        logits = self.lm_head(self.norm(x)).float()  # [B, T, vocab]
        if targets is None:
            return logits
        return cross_entropy_loss(logits, targets, loss_mask)


def segment_causal_mask(segments: torch.Tensor) -> torch.Tensor:
    """segments [B, T] -> [B, 1, T, T]: query t may attend key s when s <= t and both share a segment."""
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    same = segments[:, :, None] == segments[:, None, :]  # [B, T, T]
    return (same & causal)[:, None]


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """segments [B, T] -> positions [B, T] that restart at 0 where a new segment begins."""
    B, T = segments.shape
    index = torch.arange(T, device=segments.device).expand(B, T)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    start_index = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - start_index


def token_losses(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the next-token losses over the positions that count, how many count) as 0-d tensors.

    The caller divides: by the count of one micro-batch for its mean, or by the count of a whole
    global batch for a loss in which every token weighs the same (training/losses.py).
    """
    if loss_mask is not None:
        targets = targets.masked_fill(~loss_mask.bool(), -100)
    targets = targets.reshape(-1)
    total = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets, ignore_index=-100, reduction="sum")
    return total, (targets != -100).sum()


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token loss over the positions that count (all, or where loss_mask is True)."""
    total, count = token_losses(logits, targets, loss_mask)
    # A batch with no counted position (a chat row without an assistant turn) gives 0, not NaN.
    return total / count.clamp(min=1)
