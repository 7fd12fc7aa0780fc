"""Recipes fit the data: a built-in recipe's vocab size and context follow the dataset (pretraining)
or the base model (fine-tuning); only what the user set is held to, and a real conflict is an error
that names both numbers.

The resolution is a pure function of the recipe, the command line and the dataset dir, tested
without Ray on a dataset dir written here (the dataset-dir contract, checked by the real reader),
packed at 48 with the ~300-token test tokenizer: neither the `debug` recipe's 32/64 nor its 512.
One end-to-end run (`raylm prepare` + `raylm pretrain --config debug`, 2 steps) closes it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from raylm.core.errors import UserError
from raylm.training.finetune import finetune_config, load_finetune_config
from raylm.training.pretrain import pretrain_config

SEQ_LEN = 48


def write_dataset_dir(path: Path, tokenizer_dir: Path, seq_len: int, rows: dict[str, int]) -> Path:
    """A dataset dir as `raylm prepare` lays it out: tokenizer/, packed random ids, manifest.json."""
    from tokenizers import Tokenizer

    from raylm.core.files import file_sha256
    from raylm.data.dataset_dir import FORMAT_VERSION, KIND, read_dataset_manifest
    from raylm.data.pack import ShardWriter
    from raylm.data.tokenizer import special_token_map

    shutil.copytree(tokenizer_dir, path / "tokenizer")
    tokenizer = Tokenizer.from_file(str(path / "tokenizer" / "tokenizer.json"))
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in rows.items():
        writer = ShardWriter(path, split, seq_len, "uint16", rows_per_shard=64)
        writer.add(rng.integers(0, vocab, n * (seq_len + 1), dtype=np.uint16))
        splits[split] = writer.close()
    tokens = sum(entry["tokens"] for entry in splits.values())
    manifest = {
        "kind": KIND, "format_version": FORMAT_VERSION, "source": "test:random", "seq_len": seq_len,
        "vocab_size": vocab, "dtype": "uint16", "tokenizer_sha256": file_sha256(path / "tokenizer" / "tokenizer.json"),
        "special_tokens": special_token_map(tokenizer), "documents": {"read": 1, "kept": 1, "skipped": {}},
        "tokens": {"produced": tokens, "separators": 0, "written": tokens, "tail_dropped": 0},
        "splits": splits, "created_by": "tests/test_recipes_fit.py",
    }
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2))
    read_dataset_manifest(path)  # the contract the commands check
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tokenizer_dir) -> Path:
    return write_dataset_dir(tmp_path_factory.mktemp("fit") / "data", tokenizer_dir, SEQ_LEN, {"train": 32, "val": 8})


@pytest.fixture(scope="module")
def vocab(dataset) -> int:
    return json.loads((dataset / "manifest.json").read_text())["vocab_size"]


def test_the_debug_recipe_takes_the_datasets_vocab_and_context(dataset, vocab):
    assert vocab < 512  # the recipe's is larger: a default, not a choice
    draft = pretrain_config("debug", [], str(dataset))
    cfg = draft.build()
    assert (cfg.data.seq_len, cfg.model.max_seq_len, cfg.model.vocab_size) == (SEQ_LEN, SEQ_LEN, vocab)
    assert draft.adapted_line() == (
        f"[raylm] data.seq_len 32 -> {SEQ_LEN} from the dataset's rows; model.max_seq_len 64 -> {SEQ_LEN} = data.seq_len; "
        f"model.vocab_size 512 -> {vocab} from the dataset's tokenizer"
    )
    # the rest of the recipe is untouched
    assert (cfg.model.dim, cfg.model.n_layers, cfg.data.micro_batch, cfg.max_steps) == (64, 2, 4, 20)


def test_every_recipe_fits(dataset, vocab):
    from raylm.training.config import recipe_names

    for name in recipe_names():
        if name.startswith("sft-"):
            continue
        cfg = pretrain_config(name, [], str(dataset)).build()
        assert (cfg.data.seq_len, cfg.model.max_seq_len, cfg.model.vocab_size) == (SEQ_LEN, SEQ_LEN, vocab), name


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.seq_len=32", "data.seq_len=32 asked for a dataset packed at 48 ({where}): its rows hold exactly 48 + 1 tokens; "
                            "leave data.seq_len out (it follows the dataset) or re-prepare with --seq-len 32"),
        ("model.max_seq_len=40", "model.max_seq_len=40 asked for a dataset packed at 48 ({where}): the context must hold a row; "
                                 "set model.max_seq_len=48 or more, or leave it out (it follows data.seq_len)"),
        ("model.vocab_size=256", "model.vocab_size=256 asked for a dataset whose tokenizer has {vocab} tokens ({where}): "
                                 "set model.vocab_size={vocab} or more, or leave it out (it follows the tokenizer)"),
    ],
)
def test_a_conflicting_user_setting_is_refused_naming_both_numbers(dataset, vocab, override, message):
    from raylm.training.pretrain import main

    expected = message.format(where=f"{dataset}/manifest.json", vocab=vocab)
    with pytest.raises(UserError) as err:
        pretrain_config("debug", [override], str(dataset))
    assert str(err.value) == expected
    with pytest.raises(UserError, match="^" + expected.split(" (")[0]):  # the command stops before Ray starts
        main(["--config", "debug", "--data", str(dataset), "--out", "/tmp/never-written", override])


def test_legal_user_settings_are_kept(dataset, vocab):
    # A longer context than the rows, a padded vocab, the dataset's own seq_len: all kept, nothing adapted.
    draft = pretrain_config("debug", ["model.max_seq_len=128", "model.vocab_size=512", f"data.seq_len={SEQ_LEN}"], str(dataset))
    cfg = draft.build()
    assert (cfg.data.seq_len, cfg.model.max_seq_len, cfg.model.vocab_size) == (SEQ_LEN, 128, 512)
    assert draft.adapted == [] and draft.adapted_line() is None
    # A section given as a mapping counts key by key.
    cfg = pretrain_config("debug", [("model", {"vocab_size": 1024, "dim": 64, "n_heads": 4, "n_kv_heads": 2})], str(dataset)).build()
    assert (cfg.model.vocab_size, cfg.model.max_seq_len) == (1024, SEQ_LEN)


def test_a_users_yaml_file_is_their_choice_a_built_in_recipe_path_is_not(dataset, vocab, tmp_path):
    from raylm.training.config import CONFIG_DIR

    mine = tmp_path / "mine.yaml"
    mine.write_text((CONFIG_DIR / "debug.yaml").read_text())  # a copy sets data.seq_len 32 explicitly
    with pytest.raises(UserError, match=r"^data\.seq_len=32 asked for a dataset packed at 48"):
        pretrain_config(str(mine), [], str(dataset))
    # Without seq_len its 512 vocab and 64 context are kept (legal: larger), the rows' length followed.
    mine.write_text((CONFIG_DIR / "debug.yaml").read_text().replace("  seq_len: 32\n", ""))
    cfg = pretrain_config(str(mine), [], str(dataset)).build()
    assert (cfg.data.seq_len, cfg.model.max_seq_len, cfg.model.vocab_size) == (SEQ_LEN, 64, 512)
    # The built-in recipe named by its path is still the built-in recipe: its values adapt.
    cfg = pretrain_config(str(CONFIG_DIR / "debug.yaml"), [], str(dataset)).build()
    assert (cfg.data.seq_len, cfg.model.max_seq_len, cfg.model.vocab_size) == (SEQ_LEN, SEQ_LEN, vocab)


def test_sft_recipes_cap_their_rows_at_the_base_models_context(tmp_path, tokenizer_dir, debug_model_dir):
    from tiny_artifacts import make_model_dir

    # A base with room: the recipe's row length stands (sft-tiny 128, the debug base 256 positions).
    draft = finetune_config("sft-tiny", str(debug_model_dir), [])
    assert draft.build().data.seq_len == 128 and draft.adapted == []
    # A base pretrained on short rows (context 48): sft-tiny's 128 and sft-debug's 64 come down to 48.
    short = make_model_dir(tmp_path / "short", tokenizer_dir, max_seq_len=48)
    for recipe, rows in (("sft-tiny", 128), ("sft-debug", 64)):
        draft = finetune_config(recipe, str(short), [])
        assert draft.build().data.seq_len == 48
        assert draft.adapted_line() == f"[raylm] data.seq_len {rows} -> 48 = the base model's context"
    # The user's row length is kept when it fits, refused when it does not.
    assert load_finetune_config("sft-tiny", str(short), ["data.seq_len=32"]).data.seq_len == 32
    with pytest.raises(UserError) as err:
        load_finetune_config("sft-tiny", str(short), ["data.seq_len=100"])
    assert str(err.value) == (
        f"data.seq_len=100 asked for a base model whose context is 48 tokens ({short}/config.json: max_position_embeddings); "
        "set data.seq_len=48 or less, or leave it out (the recipe's, capped at the base's context)"
    )


def test_pretrain_debug_on_a_prepared_dataset_of_another_shape(ray_cluster, tmp_path, capfd):
    """`raylm prepare` (vocab 400, seq_len 48) then `raylm pretrain --config debug`, no vocab/seq overrides."""
    from raylm.data.prepare import main as prepare
    from raylm.training.pretrain import main as pretrain

    data, run = tmp_path / "data", tmp_path / "run"
    assert prepare(["--source", "stdlib", "--out", str(data), "--max-docs", "30", "--vocab-size", "400", "--seq-len", "48",
                    "--val-fraction", "0.3", "--tokenizer-sample-bytes", "200000"]) == 0  # fmt: skip
    manifest = json.loads((data / "manifest.json").read_text())
    capfd.readouterr()
    assert pretrain(["--config", "debug", "--data", str(data), "--out", str(run), "--num-workers", "1", "--max-steps", "2",
                     "checkpoint.every=0"]) == 0  # fmt: skip
    out = capfd.readouterr().out
    line = (f"[raylm] data.seq_len 32 -> 48 from the dataset's rows; model.max_seq_len 64 -> 48 = data.seq_len; "
            f"model.vocab_size 512 -> {manifest['vocab_size']} from the dataset's tokenizer")  # fmt: skip
    assert out.count(line) == 1, out
    resolved = json.loads((run / "run.json").read_text())["config"]
    assert (resolved["data"]["seq_len"], resolved["model"]["max_seq_len"], resolved["model"]["vocab_size"]) == (48, 48, manifest["vocab_size"])
    exported = json.loads((run / "model" / "config.json").read_text())
    assert (exported["vocab_size"], exported["max_position_embeddings"]) == (manifest["vocab_size"], 48)
