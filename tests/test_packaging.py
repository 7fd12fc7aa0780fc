"""The wheel: everything installs under `raylm` (no generic top-level `data`, `training`, ...), the
stages' configs and cluster definitions ship as package data, and the installed wheel works from
outside the repository.

The wheel is built offline from a copy of the working tree (so the build's `build/` and
`*.egg-info` never land in the repository) and installed with `--no-deps` into a fresh venv.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGE_FOLDERS = ("data", "training", "serving", "cluster")
NOT_SHIPPED = (*STAGE_FOLDERS, "tests", "bench", "docs")


def run(argv: list, cwd: Path, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".*", "build", "dist", "runs", "out", "wandb", "*.egg-info", "__pycache__", "*.pyc"))
    out = root / "dist"
    result = run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", out], cwd=source)
    assert result.returncode == 0, result.stdout + result.stderr
    (path,) = out.glob("raylm-*.whl")
    return path


@pytest.fixture(scope="module")
def names(wheel) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def test_everything_installs_under_raylm(names):
    top = {name.split("/")[0] for name in names}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert len(dist_info) == 1 and dist_info.pop().startswith("raylm-")
    assert top - {t for t in top if t.endswith(".dist-info")} == {"raylm"}
    for folder in NOT_SHIPPED:
        assert not any(name.startswith(f"{folder}/") for name in names), folder


def test_the_wheel_holds_every_module_and_the_stage_files(names):
    for expected in ("raylm/data/prepare.py", "raylm/training/configs/tiny.yaml", "raylm/serving/configs/serve.yaml",
                     "raylm/cli.py", "raylm/core/errors.py", "raylm/model/transformer.py", "raylm/inference/engine.py"):
        assert expected in names, expected
    kuberay = sorted(p.name for p in (REPO / "cluster" / "kuberay").glob("*.yaml"))
    assert kuberay and all(f"raylm/cluster/kuberay/{name}" in names for name in kuberay)
    # Every module of the tree, wherever it lives, is in the wheel (a subpackage missing from
    # pyproject's `packages` list would be silently dropped).
    expected = {f"raylm/{p.relative_to(REPO / 'raylm').as_posix()}" for p in (REPO / "raylm").rglob("*.py")}
    for folder in STAGE_FOLDERS:
        expected |= {f"raylm/{folder}/{p.relative_to(REPO / folder).as_posix()}" for p in (REPO / folder).rglob("*.py")}
    expected |= {f"raylm/training/configs/{p.name}" for p in (REPO / "training" / "configs").glob("*.yaml")}
    assert expected - names == set()


def test_the_installed_wheel_works_outside_the_repo(wheel, tmp_path):
    venv = tmp_path / "venv"
    assert run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], cwd=tmp_path).returncode == 0
    python = venv / "bin" / "python"
    # The base interpreter has none of raylm's dependencies; this venv's site-packages provides them
    # (added as a plain path, so the editable install's finder there stays inactive).
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path).stdout.strip())
    (site / "raylm-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel], cwd=tmp_path)
    assert installed.returncode == 0, installed.stdout + installed.stderr

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"

    code = "import raylm.data.prepare, raylm.training.config as c; print(raylm.data.prepare.__file__); print(c.recipe_path('tiny'))"
    probe = run([python, "-c", code], cwd=outside, env=env)
    assert probe.returncode == 0, probe.stderr
    prepare_file, tiny = (Path(line) for line in probe.stdout.split())
    assert prepare_file == site / "raylm" / "data" / "prepare.py"  # the wheel's copy, not the repo's
    assert tiny == site / "raylm" / "training" / "configs" / "tiny.yaml" and tiny.is_file()

    for generic in ("data", "training", "serving", "cluster"):
        missing = run([python, "-c", f"import {generic}"], cwd=outside, env=env)
        assert missing.returncode != 0 and "ModuleNotFoundError" in missing.stderr, generic

    script = venv / "bin" / "raylm"
    assert script.is_file()
    helped = run([script, "--help"], cwd=outside, env=env)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: raylm <command>") and "prepare" in helped.stdout
