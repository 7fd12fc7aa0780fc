"""A fine-tuning run's chat data: the settings that turn chat records into SFT rows, and the chat
dataset dir the run trains on.

`raylm finetune --data` takes a chat dataset dir (`raylm prepare-chat --tokenizer BASE --out DIR`,
data/chat_dataset.py) or chat JSONL records; records are first turned into such a dir inside the
run dir (`RUN_DIR/chat-data`), by the same Ray Data stage, with the run's `sft.*` settings and
`data.seq_len`, and a rerun keeps it. The rules that make rows of records (encoding, the
assistant-only loss mask, packing, over-long conversations) are data/chat_rows.py's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from raylm.core import storage
from raylm.core.errors import UserError
from raylm.core.files import file_sha256

CHAT_DATA_SUBDIR = "chat-data"


@dataclass
class SftDataConfig:
    val_fraction: float = 0.05  # share of the chat records held out for the SFT val loss
    split_seed: int = 0  # salt of the per-record hash that picks the val records; the same records and seed give the same split
    overlong: Literal["truncate", "drop"] = "truncate"  # conversations longer than seq_len+1 tokens: cut the end, or drop
    max_records: int | None = None  # read only the first N records (lines) of the chat file (quick runs); null = all
    pack: bool = True  # several conversations per row (attention kept within each); false = one per row, padded

    def validate(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"sft.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_records is not None and self.max_records < 1:
            raise UserError(f"sft.max_records must be positive or null, got {self.max_records}")


def base_tokenizer_sha(base: str | Path) -> str:
    return file_sha256(Path(base) / "tokenizer.json")


def check_chat_dataset(data_dir: str, manifest: dict, base: str, seq_len: int) -> None:
    """A chat dataset dir must be encoded with the base model's tokenizer, at the run's row length."""
    if manifest["tokenizer_sha256"] != base_tokenizer_sha(base):
        raise UserError(f"{data_dir} was encoded with the tokenizer of {manifest['tokenizer']}, not that of --base {base}; "
                        f"rebuild it with `raylm prepare-chat --tokenizer {base}` or pass the chat JSONL file")
    if manifest["seq_len"] != seq_len:
        raise UserError(f"{data_dir} holds rows of seq_len {manifest['seq_len']} but the run trains data.seq_len={seq_len}; "
                        f"leave data.seq_len out (it follows the chat dataset) or rebuild with --seq-len {seq_len}")


def chat_dataset_for_run(data: str, base: str, seq_len: int, sft: SftDataConfig, home: str | Path, address: str | None) -> tuple[str, dict]:
    """(dataset dir, manifest) that the run trains on: `data` itself when it is a chat dataset dir,
    else the records of `data` encoded into RUN_DIR/chat-data (kept when a rerun asks the same;
    `home`: the run dir as given, a path or a URI)."""
    from raylm.data.chat_dataset import (
        ChatDatasetConfig,
        existing_chat_dataset,
        is_chat_dataset,
        prepare_chat_dataset,
        read_chat_dataset,
    )

    if is_chat_dataset(data):
        manifest = read_chat_dataset(data)
        check_chat_dataset(data, manifest, base, seq_len)
        return data, manifest
    out = storage.child(home, CHAT_DATA_SUBDIR)
    cfg = ChatDatasetConfig(source=data, out=str(out), tokenizer=base, seq_len=seq_len, val_fraction=sft.val_fraction,
                            split_seed=sft.split_seed, overlong=sft.overlong, pack=sft.pack, max_records=sft.max_records,
                            address=address)
    cfg.validate()
    try:
        existing_chat_dataset(cfg)
    except UserError:
        cfg.overwrite = True  # the run's own dir, built for other settings: rebuilt for these
    return str(out), prepare_chat_dataset(cfg)
