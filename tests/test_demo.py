"""The README's quick-start demo runs end to end, and a second run skips what is complete.

The commands are read out of README.md, so the README cannot drift from what works. They run
in-process through the same CLI entry (`raylm.cli.main`) on the session's Ray cluster.
"""

from __future__ import annotations

import re
import shlex
import socket
from pathlib import Path

import pytest

from raylm.cli import main as raylm_main

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_demo_commands() -> list[str]:
    """Every `raylm demo --quick ...` line in the README's code blocks."""
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", README.read_text(), flags=re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith("raylm demo --quick")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def quick_demo(ray_cluster, tmp_path_factory):
    commands = readme_demo_commands()
    assert commands, "README.md shows no `raylm demo --quick` command"
    out = tmp_path_factory.mktemp("demo") / "demo"
    argv = shlex.split(commands[0])[1:] + ["--out", str(out), "--port", str(free_port())]
    return argv, out


def test_readme_quick_demo_runs_every_stage_and_answers(quick_demo, capsys):
    argv, out = quick_demo
    assert raylm_main(argv) == 0
    printed = capsys.readouterr().out
    for stage in ("prepare", "pretrain", "prepare-chat", "finetune", "serve", "ask"):
        assert f"] {stage}" in printed
    # Every artifact is in place and the answers came back through the OpenAI client.
    for path in ("data/manifest.json", "pretrain/model/model.safetensors", "pretrain/report.md", "chat.jsonl",
                 "finetune/model/model.safetensors", "finetune/report.md", "demo-report.md"):
        assert (out / path).is_file(), path
    # The debug model's answers are noise; that four came back through HTTP is what counts here.
    assert len(re.findall(r"^  A: ", printed, flags=re.M)) == 4, printed[-2000:]
    assert "W&B offline runs" in printed


def test_second_demo_skips_complete_stages(quick_demo, capsys):
    argv, out = quick_demo
    weights = out / "finetune" / "model" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert raylm_main(argv) == 0
    printed = capsys.readouterr().out
    for stage in ("prepare", "pretrain", "prepare-chat", "finetune"):
        assert f"] {stage} (complete, skipped)" in printed
    assert weights.stat().st_mtime_ns == before
    assert len(re.findall(r"^  A: ", printed, flags=re.M)) == 4


def test_demo_refuses_a_port_in_use(tmp_path, capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert raylm_main(["demo", "--quick", "--out", str(tmp_path / "d"), "--port", str(port)]) == 2
    assert f"port {port} on 127.0.0.1 is in use" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_demo_refuses_an_open_endpoint_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAYLM_API_KEY", raising=False)
    # A documentation address (RFC 5737): beyond loopback, and refused before anything binds it.
    assert raylm_main(["demo", "--quick", "--out", str(tmp_path / "d"), "--host", "192.0.2.1", "--port", "8000"]) == 2
    assert "refusing to serve on 192.0.2.1 without an API key" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()  # refused before the first stage
