"""Training objectives: what a micro-batch costs, chosen by the run's kind.

A loss takes the model (the DeepSpeed engine: calling it runs ZeRO's hooks) and a micro-batch of
whole rows from training/data_order.py, and returns the scalar that the step backpropagates and
the eval averages. Pretraining and chat SFT share next-token cross-entropy; they differ only in
their rows: SFT rows carry a `loss_mask` that keeps the loss on assistant tokens. Another
objective (e.g. DPO on chosen/rejected pairs) is another entry in LOSSES.
"""

from __future__ import annotations

from typing import Callable

import torch

LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def next_token_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of predicting each row's next token, over the positions its loss_mask keeps (or all)."""
    ids = batch["input_ids"]
    inputs = {"tokens": ids[:, :-1], "targets": ids[:, 1:]}
    if "loss_mask" in batch:
        # The mask marks row tokens; the target at position t is row token t + 1.
        inputs["loss_mask"] = batch["loss_mask"][:, 1:]
    return model(**inputs)


LOSSES: dict[str, LossFn] = {
    "pretrain": next_token_loss,
    "finetune": next_token_loss,
}


def loss_for(kind: str) -> LossFn:
    """The loss of a run kind ("pretrain", "finetune", ...)."""
    if kind not in LOSSES:
        raise ValueError(f"no loss for run kind {kind!r}; known kinds: {', '.join(LOSSES)}")
    return LOSSES[kind]
