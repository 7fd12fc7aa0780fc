"""Small real artifacts that several test files build on: a tokenizer dir and a random model dir.

The tokenizer follows the dataset-dir contract (byte-level BPE, `<|endoftext|>`, `<|pad|>`,
ChatML `<|im_start|>`/`<|im_end|>`, a chat template in tokenizer_config.json) so serving and
fine-tuning tests see the same shapes the data stage writes.
"""

from __future__ import annotations

import json
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
SAMPLE_TEXT = [
    "def add(a, b):\n    return a + b\n",
    "The json module encodes and decodes JSON documents.\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n",
    "import os\nprint(os.path.join('a', 'b'))\n",
]


def make_tokenizer_dir(path: Path, vocab_size: int = 300) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # its bar prints blank lines where nothing draws it
    )
    tok.train_from_iterator(SAMPLE_TEXT * 50, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|pad|>",
        "model_max_length": 256,
        "chat_template": CHATML_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return path


def make_model_dir(path: Path, tokenizer_dir: Path, seed: int = 0, **model_overrides) -> Path:
    """A randomly initialised debug-sized model dir in HF Llama format."""
    import torch
    from tokenizers import Tokenizer

    from raylm.model.model_dir import save_model_dir
    from raylm.model.transformer import ModelConfig, Transformer

    vocab = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()
    fields = dict(vocab_size=vocab, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=256)
    cfg = ModelConfig(**{**fields, **model_overrides})
    torch.manual_seed(seed)
    model = Transformer(cfg)
    return save_model_dir(path, model.state_dict(), cfg, tokenizer_dir)


def upload_dir(local: Path, uri: str) -> None:
    """Copy a local dir to an object-store URI (the tests' S3 server: conftest's `s3_server`)."""
    import pyarrow.fs as pafs

    from raylm.core.storage import filesystem

    fs, inner = filesystem(uri)
    pafs.copy_files(str(local), inner, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
