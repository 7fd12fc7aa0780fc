"""The dataset's tokenizer: train a byte-level BPE, or reuse one, and save it in Hugging Face form.

A dataset dir's `tokenizer/` holds `tokenizer.json` (the `tokenizers` file) and
`tokenizer_config.json` (what `transformers.AutoTokenizer` needs: the special tokens, the
maximum length and the ChatML chat template), so that `AutoTokenizer.from_pretrained` and
`tokenizers.Tokenizer.from_file` encode alike. Byte-level BPE can encode any Unicode string
without an unknown token. The tokenizer adds nothing around a text (no BOS): the data pipeline
puts `<|endoftext|>` after every document itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from raylm.core.errors import UserError
from raylm.core.files import file_sha256
from raylm.model.chat import (
    CHAT_TEMPLATE,
    ENDOFTEXT,
    IM_END,
    IM_START,
    PAD,
    SPECIAL_TOKEN_NAMES,
    SPECIAL_TOKENS,
)
from raylm.model.chat import load_tokenizer as load_tokenizer_file

# 256 byte symbols + the special tokens: a smaller vocabulary has no room for any merge.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + 1


def new_bpe_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE with GPT-2's pre-tokenizer and no post-processing."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` tokens (special tokens included) on `texts`."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise UserError(f"--vocab-size {vocab_size} is too small: byte-level BPE needs at least {MIN_VOCAB_SIZE}")
    tokenizer = new_bpe_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer to reuse (`--tokenizer`), with the special tokens the dataset contract needs."""
    tokenizer = load_tokenizer_file(path)
    missing = [token for token in SPECIAL_TOKENS if tokenizer.token_to_id(token) is None]
    if missing:
        tokenizer.add_special_tokens(missing)  # a reused tokenizer gains them (its vocabulary grows)
    return tokenizer


def tokenizer_config(seq_len: int) -> dict:
    """tokenizer_config.json: what AutoTokenizer reads besides tokenizer.json."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": ENDOFTEXT,
        "eos_token": ENDOFTEXT,
        "pad_token": PAD,
        "additional_special_tokens": [IM_START, IM_END],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": seq_len,
        "chat_template": CHAT_TEMPLATE,
    }


def save_tokenizer(tokenizer: Tokenizer, directory: str | Path, seq_len: int) -> str:
    """Write tokenizer.json + tokenizer_config.json into `directory`; return tokenizer.json's sha256."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(seq_len), indent=2) + "\n")
    return file_sha256(directory / "tokenizer.json")


def special_token_map(tokenizer: Tokenizer) -> dict[str, int]:
    return {name: tokenizer.token_to_id(token) for name, token in SPECIAL_TOKEN_NAMES.items()}
