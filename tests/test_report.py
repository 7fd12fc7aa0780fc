"""The run report from a hand-written run dir: plots, figures, samples, config; W&B images."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from raylm.core.errors import UserError
from raylm.training.report import main, write_report


def write_run_dir(path, steps=40, eval_every=10, torn_tail=False):
    """A run dir as the train loop leaves it: metrics.jsonl and run.json."""
    path.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(1, steps + 1):
        row = {
            "step": step,
            "loss": 6.0 * math.exp(-step / 15) + 1.0,
            "lr": 1e-3 * min(1.0, step / 5),
            "grad_norm": 1.0,
            "tokens_per_s": 1000.0 + step,
            "elapsed_s": step * 0.5,
        }
        if step % eval_every == 0:
            row["val_loss"] = row["loss"] + 0.2
            row["val_ppl"] = math.exp(row["val_loss"])
        lines.append(json.dumps(row))
    text = "\n".join(lines) + "\n"
    if torn_tail:
        text += '{"step": 41, "lo'
    (path / "metrics.jsonl").write_text(text)
    run = {
        "kind": "finetune",
        "base": "/models/base",
        "summary": {"steps": steps, "tokens": 12345, "seconds": 20.0},
        "config": {"optimizer": {"lr": 0.001}, "max_steps": steps},
    }
    (path / "run.json").write_text(json.dumps(run))
    return path


def test_report_has_plots_final_figures_samples_and_config(tmp_path):
    run_dir = write_run_dir(tmp_path / "run", torn_tail=True)
    samples = [{"prompt": "What does `json.dumps` do?", "before": "x ``` y", "after": "Serialize obj."}]
    report = write_report(run_dir, samples=samples, sections={"Evaluation": {"held-out loss before": 3.5, "held-out loss after": 2.1}})
    text = report.read_text()

    for name in ("loss", "lr", "tokens_per_s"):
        png = run_dir / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](plots/{name}.png)" in text
    assert "# Run report: run (finetune)" in text
    assert "| final train loss | " in text and "| best val loss | 1.617 |" in text
    assert "| logged steps | 40 |" in text  # the torn last line is ignored
    assert "## Evaluation\n" in text and "| held-out loss after | 2.1 |" in text
    assert "| tokens | 12345 |" in text
    assert "What does `json.dumps` do?" in text and "Serialize obj." in text
    assert "````\nx ``` y\n````" in text  # backticks in a sample cannot close its fence
    assert "optimizer:\n  lr: 0.001" in text
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # no temp files left


def test_metrics_never_logged_leave_their_plot_out(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    text = write_report(run_dir).read_text()
    assert sorted(p.name for p in (run_dir / "plots").iterdir()) == ["loss.png"]
    assert "lr.png" not in text and "Sample generations" not in text


def test_bad_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        write_report(tmp_path / "missing")
    run_dir = write_run_dir(tmp_path / "run")
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write("not json\n{}\n")  # a bad line in the middle is not a torn tail
    with pytest.raises(UserError, match="metrics.jsonl: line 41"):
        write_report(run_dir)


def test_cli_writes_the_report(tmp_path, capsys):
    run_dir = write_run_dir(tmp_path / "run")
    assert main([str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(run_dir / "report.md")


def test_cli_rewrites_the_report_of_a_run_dir_on_object_storage(tmp_path, s3_server, monkeypatch):
    from tiny_artifacts import upload_dir

    from raylm.core import storage

    monkeypatch.setenv("RAYLM_CACHE_DIR", str(tmp_path / "cache"))
    home = s3_server("report-runs") + "/run"
    upload_dir(write_run_dir(tmp_path / "run"), home)
    assert main([home]) == 0
    files = storage.files_under(home)
    assert "report.md" in files and "plots/loss.png" in files
    assert "# Run report: run (finetune)" in storage.read_text(f"{home}/report.md")


def test_figures_go_to_an_active_wandb_run(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run_dir = write_run_dir(tmp_path / "run")
    run = wandb.init(project="raylm-test-report", dir=str(tmp_path))
    try:
        write_report(run_dir)
        files_dir = run.dir
    finally:
        wandb.finish()
    # W&B stores each logged image under media/images/<key>_<step>_<hash>.png
    images = sorted(p.relative_to(files_dir).as_posix() for p in Path(files_dir, "media", "images").rglob("*.png"))
    assert [name.split("_")[0] for name in images] == ["media/images/report/loss", "media/images/report/lr", "media/images/report/tokens"]


def test_cli_attaches_the_plots_to_the_run_dirs_own_wandb_run(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = write_run_dir(tmp_path / "run")
    trained = wandb.init(project="raylm-test-report", id="reporttest1", dir=str(run_dir))  # as the loop's rank 0 does
    trained.log({"loss": 1.0})
    trained.finish()
    assert main([str(run_dir), "--wandb"]) == 0
    # The resumed run writes a folder of its own (or shares the first one, when within the same second).
    folders = sorted((run_dir / "wandb").glob("offline-run-*-reporttest1*"))
    images = sorted(p.name.split("_")[0] for folder in folders for p in folder.rglob("media/images/report/*.png"))
    assert images == ["loss", "lr", "tokens"]


def test_default_samples_are_continuations_by_the_runs_model(tmp_path, tokenizer_dir):
    from tiny_artifacts import make_model_dir

    from raylm.training.report import DEFAULT_PROMPTS

    run_dir = write_run_dir(tmp_path / "run")
    make_model_dir(run_dir / "model", tokenizer_dir)
    text = write_report(run_dir).read_text()
    assert "## Sample generations" in text and text.count("**completion**") == len(DEFAULT_PROMPTS)
    assert "def read_lines(path):" in text
