"""Chat records -> SFT training rows: `input_ids`, `loss_mask` and `segment_ids`, packed.

The rules, in the order they apply:
- Records come from `data.chat.read_chat_jsonl` (its rule: bad lines are skipped and counted by
  reason with their line numbers; a file where nothing survives is refused).
- Split: a seeded shuffle of the good records puts `round(n * val_fraction)` of them (at least
  one when there are two or more) in val, the rest in train. Same file + seed -> same split.
- Encoding: `data.chat.encode_chat` renders the ChatML template and marks the assistant tokens
  (every assistant turn, with its closing `<|im_end|>`); only those are trained.
- Packing (`sft.pack`, default on): conversations are packed first-fit, longest first, into rows
  of `seq_len + 1` tokens; the rest of a row is padding (pad id, loss_mask False, segment 0).
  `segment_ids` numbers the conversations of a row 1, 2, ...; the model attends only within a
  segment and restarts positions at its start (raylm/model/transformer.py), so each conversation
  is computed exactly as it would be alone, and its first token, never a target, keeps the loss
  from crossing examples. Chat records are short, so padding one per row would spend most of the
  compute on pad tokens (57% on the embedded set). `sft.pack=false` gives one conversation per row.
- Over-long conversations (more than `seq_len + 1` tokens), `overlong`:
  `truncate` (default) keeps the first `seq_len + 1` tokens — system prompt and first turns, the
  later turns cut; a conversation whose kept part trains no token is dropped;
  `drop` drops every over-long conversation. Both are counted.
- Row semantics follow the train loop's: loss_mask[i] True means token i is a prediction
  target (the loss uses loss_mask[1:] against input_ids[1:]).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from raylm.core.errors import UserError


@dataclass
class SftDataConfig:
    val_fraction: float = 0.05  # share of the chat records held out for the SFT val loss
    split_seed: int = 0  # seed of the train/val shuffle; the same file and seed give the same split
    overlong: Literal["truncate", "drop"] = "truncate"  # conversations longer than seq_len+1 tokens: cut the end, or drop
    max_records: int | None = None  # use only the first N good records (quick runs); null = all
    pack: bool = True  # several conversations per row (attention kept within each); false = one per row, padded

    def validate(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"sft.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_records is not None and self.max_records < 1:
            raise UserError(f"sft.max_records must be positive or null, got {self.max_records}")


@dataclass
class SftRows:
    """Encoded rows of one split and what happened on the way."""

    rows: list[dict[str, np.ndarray]]
    counts: dict[str, int] = field(default_factory=dict)


def split_records(records: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """(train, val) by a seeded shuffle; val gets round(n * val_fraction), at least 1 when n >= 2."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = round(len(records) * val_fraction)
    if val_fraction > 0 and len(records) >= 2:
        n_val = max(1, n_val)
    val_idx = sorted(order[:n_val])
    train_idx = sorted(order[n_val:])  # sorted: the file's order; the loop shuffles per epoch
    return [records[i] for i in train_idx], [records[i] for i in val_idx]


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


def build_sft_rows(chat_path: str | Path, model_dir: str | Path, seq_len: int, cfg: SftDataConfig) -> dict[str, Any]:
    """Read, split and encode a chat JSONL file with the base model's tokenizer.

    Returns {"train": SftRows, "val": SftRows, "stats": {...}} where stats records the file's
    skipped lines by reason and the counts of each split (they go into the run report).
    """
    from raylm.data.chat import read_chat_jsonl

    records, skipped = read_chat_jsonl(str(chat_path))
    if cfg.max_records is not None:
        records = records[: cfg.max_records]
    tokenizer, pad_id = load_base_tokenizer(model_dir)
    train_records, val_records = split_records(records, cfg.val_fraction, cfg.split_seed)
    train = encode_rows(train_records, tokenizer, seq_len, pad_id, cfg.overlong, cfg.pack)
    val = encode_rows(val_records, tokenizer, seq_len, pad_id, cfg.overlong, cfg.pack)
    if not train.rows:
        raise UserError(f"{chat_path}: no conversation fits seq_len={seq_len} with an assistant token to train ({train.counts})")
    stats = {
        "records": len(records),
        "skipped_lines": {reason: len(lines) for reason, lines in skipped.items()},
        "skipped_line_numbers": {reason: lines[:20] for reason, lines in skipped.items()},
        "train": train.counts,
        "val": val.counts,
    }
    return {"train": train, "val": val, "stats": stats}
