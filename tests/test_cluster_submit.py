"""`raylm submit`'s pieces that need no cluster: the entrypoint, the env, what the job ships."""

from __future__ import annotations

import zipfile

import pytest

from raylm.cli import main as raylm
from raylm.cluster.client import resolve_address
from raylm.cluster.runtime_env import (
    build_runtime_env,
    parse_env_assignments,
    passed_through_env,
)
from raylm.cluster.submit import build_entrypoint
from raylm.core.errors import UserError


def test_entrypoint_is_the_stage_module_with_its_arguments_quoted():
    assert build_entrypoint("pretrain", ["--config", "debug", "--out", "s3://b/my run"]) == (
        "python -m raylm.training.pretrain --config debug --out 's3://b/my run'"
    )
    assert build_entrypoint("serve", ["--model", "m"]) == "python -m raylm.serving.serve --model m"


@pytest.mark.parametrize("stage", ["nope", "submit", "jobs"])
def test_unknown_or_recursive_stage_is_refused(stage):
    with pytest.raises(UserError, match=f"unknown stage '{stage}'.*expected one of: prepare"):
        build_entrypoint(stage, [])


def test_env_assignments_and_pass_through(monkeypatch):
    assert parse_env_assignments(["A=1", "B_2=x=y", "C="]) == {"A": "1", "B_2": "x=y", "C": ""}
    for bad in ("NOVALUE", "=1", "1A=2", "A-B=1"):
        with pytest.raises(UserError, match="KEY=VALUE"):
            parse_env_assignments([bad])
    monkeypatch.setenv("WANDB_API_KEY", "k")
    monkeypatch.setenv("HF_TOKEN", "")
    monkeypatch.setenv("UNRELATED_SECRET", "s")
    passed = passed_through_env()
    assert passed["WANDB_API_KEY"] == "k"
    assert "HF_TOKEN" not in passed and "UNRELATED_SECRET" not in passed
    assert build_runtime_env({"WANDB_API_KEY": "override"})["env_vars"]["WANDB_API_KEY"] == "override"


def test_address_flag_then_environment_then_local_head(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address(None) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert resolve_address(None) == "http://head:8265"
    assert resolve_address("http://other:8265") == "http://other:8265"


def test_working_dir_ships_the_package_as_installed_and_nothing_else(tmp_path):
    from ray._private.runtime_env.packaging import create_package

    project = tmp_path / "project"
    for name in [
        "pyproject.toml", "raylm/__init__.py", "raylm/cli.py", "data/__init__.py", "data/prepare.py",
        "training/__init__.py", "training/configs/debug.yaml", "serving/__init__.py", "cluster/__init__.py",
        "runs/r1/checkpoint.pt", "wandb/run/x.wandb", ".venv/bin/python", "data/__pycache__/prepare.cpython-311.pyc",
        ".git/HEAD", "bench/train.py", "tests/test_x.py",
    ]:  # fmt: skip
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text("x")
    runtime_env = build_runtime_env({}, project=project)
    package = tmp_path / "package.zip"
    create_package(runtime_env["working_dir"], package, include_gitignore=True, excludes=runtime_env["excludes"])
    shipped = {name for name in zipfile.ZipFile(package).namelist() if not name.endswith("/")}
    assert shipped == {
        "raylm/__init__.py", "raylm/cli.py", "raylm/data/__init__.py", "raylm/data/prepare.py",
        "raylm/training/__init__.py", "raylm/training/configs/debug.yaml", "raylm/serving/__init__.py",
        "raylm/cluster/__init__.py",
    }  # fmt: skip


def test_no_cluster_is_a_plain_error(capsys):
    assert raylm(["jobs", "--address", "http://127.0.0.1:9", "list"]) == 2
    err = capsys.readouterr().err
    assert "no Ray cluster answers at http://127.0.0.1:9" in err and "Traceback" not in err
