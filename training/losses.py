"""Training objectives: what a micro-batch costs, chosen by the run's kind.

A loss takes the model (the DeepSpeed engine: calling it runs ZeRO's hooks) and a micro-batch of
whole rows from training/data_order.py, and returns the SUM of its per-token losses and the number
of tokens that count, not their mean. The trainer divides by the count of the whole global batch
(every rank holds it, so it needs no communication), so every token of a step weighs the same
however the batch is cut into micro-batches and ranks (torchtitan's rule). Pretraining and chat
SFT share next-token cross-entropy; they differ only in their rows: SFT rows carry a `loss_mask`
that keeps the loss on assistant tokens, and packed SFT rows a `segment_ids` column. Another
objective (e.g. DPO on chosen/rejected pairs) is another entry in LOSSES.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from raylm.model.transformer import token_losses

LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


def next_token_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy of each row's next tokens over the targets its loss_mask keeps, their count)."""
    ids = batch["input_ids"]
    inputs = {"tokens": ids[:, :-1]}
    if "segment_ids" in batch:
        inputs["segments"] = batch["segment_ids"][:, :-1]
    logits = model(**inputs)  # [B, T, vocab]
    # The mask marks row tokens; the target at position t is row token t + 1.
    mask = batch["loss_mask"][:, 1:] if "loss_mask" in batch else None
    return token_losses(logits, ids[:, 1:], mask)


def target_count(rows: dict[str, np.ndarray]) -> int:
    """Tokens that count in the loss of these rows (the denominator of a step's loss)."""
    if "loss_mask" in rows:
        return int(rows["loss_mask"][:, 1:].sum())
    ids = rows["input_ids"]
    return ids.shape[0] * (ids.shape[1] - 1)


LOSSES: dict[str, LossFn] = {
    "pretrain": next_token_loss,
    "finetune": next_token_loss,
}


def loss_for(kind: str) -> LossFn:
    """The loss of a run kind ("pretrain", "finetune", ...)."""
    if kind not in LOSSES:
        raise ValueError(f"no loss for run kind {kind!r}; known kinds: {', '.join(LOSSES)}")
    return LOSSES[kind]
