"""The model runner: the model, its device and dtype, and its KV cache; forwards for the engine.

`prefill(seqs)` runs the sequences' prompts into their cache slots (once per distinct prompt) and
returns the logits at every prompt position; `decode(seqs)` runs their last tokens and returns
next-token logits, one row per sequence. Building the padded token and position tensors and
binding the cache slots happens here; choosing tokens and text do not.
"""

from __future__ import annotations

from pathlib import Path

import torch

from raylm.inference.sequence import Sequence
from raylm.model.model_dir import load_model_dir
from raylm.model.transformer import KVCache


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class ModelRunner:
    def __init__(self, model_dir: str | Path, max_batch_size: int, max_model_len: int = 0, device: str = "auto", dtype: str = "auto", threads: int = 0):
        """`max_model_len` 0 is the model's max_position_embeddings; `threads` 0 is torch's default."""
        if threads > 0:
            torch.set_num_threads(threads)
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.model, self.model_config = load_model_dir(Path(model_dir), self.device, self.dtype)
        self.max_len = min(max_model_len or self.model_config.max_seq_len, self.model_config.max_seq_len)
        self.cache = KVCache(self.model_config, max_batch_size, self.max_len, self.device, self.dtype)

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> tuple[torch.Tensor, list[int]]:
        """Run the sequences' prompts into their slots: logits [P, T, vocab] at every position of
        each distinct prompt (P of them, right-padded to the longest, T), and each sequence's row.

        Sequences with the same prompt (the `n` choices of a request) share one row: the forward
        runs once, and its keys and values are copied into the other sequences' slots. Padding
        writes cache positions past a prompt's end, which that sequence's decode steps overwrite
        before any query can attend to them.
        """
        firsts: dict[tuple, int] = {}  # prompt -> its row
        rows = [firsts.setdefault(seq.prompt_key, len(firsts)) for seq in seqs]
        distinct = [seqs[rows.index(row)] for row in range(len(firsts))]
        longest = max(len(s.prompt_ids) for s in distinct)
        tokens = torch.zeros(len(distinct), longest, dtype=torch.long)  # [P, T]
        for row, seq in enumerate(distinct):
            tokens[row, : len(seq.prompt_ids)] = torch.tensor(seq.prompt_ids)
        positions = torch.arange(longest).expand(len(distinct), longest)  # [P, T]
        logits = self.forward(tokens, positions, distinct)  # [P, T, vocab]
        for seq, row in zip(seqs, rows):
            if seq is not distinct[row]:
                self.copy_prompt(distinct[row], seq)
        return logits, rows

    def copy_prompt(self, source: Sequence, target: Sequence) -> None:
        """The keys and values of `source`'s prompt into `target`'s slot (the same prompt)."""
        length = len(source.prompt_ids)
        for store in (self.cache.k, self.cache.v):  # [layers, slots, kv heads, positions, head dim]
            store[:, target.slot, :, :length] = store[:, source.slot, :, :length]

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """Logits [B, vocab] after each sequence's last output token, which joins its slot."""
        tokens = torch.tensor([[s.output_ids[-1]] for s in seqs])  # [B, 1]
        positions = torch.tensor([[s.length - 1] for s in seqs])  # [B, 1]
        return self.forward(tokens, positions, seqs)[:, -1]

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """tokens and positions [B, T] -> logits [B, T, vocab], reading and writing the sequences' slots."""
        slots = torch.tensor([s.slot for s in seqs], device=self.device)  # [B]
        positions = positions.to(self.device)
        self.cache.bind(slots, positions)
        return self.model(tokens.to(self.device), positions=positions, cache=self.cache)
