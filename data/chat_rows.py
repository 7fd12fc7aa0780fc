"""Chat conversations -> SFT training rows: `input_ids`, `loss_mask` and `segment_ids`, packed.

The rules, in the order they apply (the chat dataset stage, data/chat_dataset.py, runs them on
Ray Data's workers, a batch of conversations at a time):
- Encoding: `raylm.model.chat.encode_chat` renders the ChatML template and marks the assistant
  tokens (every assistant turn, with its closing `<|im_end|>`); only those are trained.
- Packing (`pack`, default on): conversations are packed first-fit, longest first, into rows
  of `seq_len + 1` tokens; the rest of a row is padding (pad id, loss_mask False, segment 0).
  `segment_ids` numbers the conversations of a row 1, 2, ...; the model attends only within a
  segment and restarts positions at its start (raylm/model/transformer.py), so each conversation
  is computed exactly as it would be alone, and its first token, never a target, keeps the loss
  from crossing examples. Chat records are short, so padding one per row would spend most of the
  compute on pad tokens (57% on the embedded set). `pack=False` gives one conversation per row.
- Over-long conversations (more than `seq_len + 1` tokens), `overlong`:
  `truncate` (default) keeps the first `seq_len + 1` tokens — system prompt and first turns, the
  later turns cut; a conversation whose kept part trains no token is dropped;
  `drop` drops every over-long conversation. Both are counted.
- Row semantics follow the train loop's: loss_mask[i] True means token i is a prediction
  target (the loss uses loss_mask[1:] against input_ids[1:]).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from raylm.core.errors import UserError


@dataclass
class SftRows:
    """Encoded rows of one split and what happened on the way."""

    rows: list[dict[str, np.ndarray]]
    counts: dict[str, int] = field(default_factory=dict)


def pack_sequences(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of sequences grouped into bins of at most `capacity` tokens: first fit, longest first.

    Deterministic for given lengths; each bin lists its sequences in their original order.
    """
    bins: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, free in enumerate(room):
            if lengths[index] <= free:
                bins[b].append(index)
                room[b] -= lengths[index]
                break
        else:
            bins.append([index])
            room.append(capacity - lengths[index])
    return [sorted(members) for members in bins]


def build_row(pieces: list[tuple[list[int], list[bool]]], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """One row of `length` tokens from (ids, mask) pieces, numbered segments 1, 2, ...; padding after them."""
    input_ids = np.full(length, pad_id, dtype=np.int32)
    loss_mask = np.zeros(length, dtype=bool)
    segment_ids = np.zeros(length, dtype=np.int32)
    start = 0
    for segment, (ids, mask) in enumerate(pieces, start=1):
        end = start + len(ids)
        input_ids[start:end] = ids
        loss_mask[start + 1 : end] = mask[1:]  # a piece's first token is never a target
        segment_ids[start:end] = segment
        start = end
    return {"input_ids": input_ids, "loss_mask": loss_mask, "segment_ids": segment_ids}


def encode_rows(records: list, tokenizer, seq_len: int, pad_id: int, overlong: str = "truncate", pack: bool = True) -> SftRows:
    """Conversations -> rows of seq_len + 1 tokens (packed, or one per row), by the module's rules, with counts."""
    from raylm.model.chat import encode_chat

    length = seq_len + 1
    out = SftRows(rows=[], counts={"conversations": len(records), "rows": 0, "truncated": 0, "dropped_overlong": 0,
                                  "dropped_no_target": 0, "tokens": 0, "target_tokens": 0, "pad_tokens": 0})
    counts = out.counts
    pieces: list[tuple[list[int], list[bool]]] = []
    for messages in records:
        ids, mask = encode_chat(tokenizer, messages)
        if len(ids) > length:
            if overlong == "drop":
                counts["dropped_overlong"] += 1
                continue
            ids, mask = ids[:length], mask[:length]
            counts["truncated"] += 1
        targets = sum(mask[1:])  # position 0 is never predicted
        if targets == 0:
            counts["dropped_no_target"] += 1
            continue
        pieces.append((ids, mask))
        counts["tokens"] += len(ids)
        counts["target_tokens"] += targets
    groups = pack_sequences([len(ids) for ids, _ in pieces], length) if pack else [[i] for i in range(len(pieces))]
    out.rows = [build_row([pieces[i] for i in group], length, pad_id) for group in groups]
    counts["rows"] = len(out.rows)
    counts["pad_tokens"] = len(out.rows) * length - counts["tokens"]
    return out


def load_base_tokenizer(model_dir: str | Path):
    """The base model dir's own tokenizer, checked to speak ChatML, and the id that pads rows."""
    from raylm.model.chat import check_chatml, load_tokenizer, special_token_ids

    tokenizer = load_tokenizer(model_dir)
    check_chatml(model_dir, tokenizer)
    ids = special_token_ids(model_dir)
    # Pad positions are never attended to by real tokens and never trained, so any id works
    # when the tokenizer has no pad token (many open models): use eos.
    pad_id = ids["pad"] if ids["pad"] is not None else ids["eos"]
    if pad_id is None:
        raise UserError(f"{model_dir}: tokenizer_config.json names neither pad_token nor eos_token; one is needed to pad rows")
    return tokenizer, pad_id
