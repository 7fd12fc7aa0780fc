"""Directories on object storage (raylm/core/storage.py) against the session's S3-compatible server
(moto on 127.0.0.1): the local cache of a remote dir, and `raylm serve --model s3://...` planning
(each replica copies the model dir; the plan refuses a URI that holds nothing)."""

from __future__ import annotations

from pathlib import Path

import pytest

from raylm.core import storage
from raylm.core.errors import UserError


def test_a_remote_dir_is_copied_once_and_again_when_it_changes(s3_server, tmp_path, monkeypatch):
    import pyarrow.fs as pafs

    monkeypatch.setenv("RAYLM_CACHE_DIR", str(tmp_path / "cache"))
    remote = s3_server("cache-test") + "/model"
    fs, inner = storage.filesystem(remote)
    for name, body in (("config.json", b"{}"), ("sub/weights.bin", b"x" * 3000)):
        with fs.open_output_stream(f"{inner}/{name}") as out:
            out.write(body)
    first = storage.local_dir(remote)
    assert (tmp_path / "cache") in Path(first).parents
    assert open(f"{first}/sub/weights.bin", "rb").read() == b"x" * 3000
    assert storage.local_dir(remote) == first  # unchanged: the same copy
    with fs.open_output_stream(f"{inner}/sub/weights.bin") as out:
        out.write(b"y" * 10)
    second = storage.local_dir(remote)
    assert second != first and open(f"{second}/sub/weights.bin", "rb").read() == b"y" * 10
    assert storage.files_under(remote) == {"config.json": 2, "sub/weights.bin": 10}
    assert storage.local_dir(str(tmp_path)) == str(tmp_path)  # a local dir is used where it is
    with pytest.raises(UserError, match="holds no file"):
        storage.local_dir(s3_server("empty-bucket") + "/nothing")
    assert fs.get_file_info(inner).type == pafs.FileType.Directory


def test_serving_plans_a_model_dir_on_object_storage(s3_server, debug_model_dir, tmp_path, monkeypatch):
    from tiny_artifacts import upload_dir

    from raylm.serving.app import parse_app_args
    from raylm.serving.serve import plan_command

    monkeypatch.setenv("RAYLM_CACHE_DIR", str(tmp_path / "cache"))
    remote = s3_server("serve-models") + "/debug"
    upload_dir(debug_model_dir, remote)
    plan, _ = plan_command(["--model", remote])
    (args,) = plan.app._bound_deployment.init_args
    assert args.model == remote  # the replicas get the URI, and each copies the dir where it runs
    assert parse_app_args({"model": remote}).model == remote
    with pytest.raises(UserError, match="does not exist"):
        parse_app_args({"model": remote + "-missing"})


def test_generate_reads_a_model_dir_from_object_storage(s3_server, debug_model_dir, tmp_path, monkeypatch, capsys):
    from tiny_artifacts import upload_dir

    from raylm.cli import main as raylm

    monkeypatch.setenv("RAYLM_CACHE_DIR", str(tmp_path / "cache"))
    remote = s3_server("generate-models") + "/debug"
    upload_dir(debug_model_dir, remote)
    argv = ["generate", "--prompt", "def add(a, b):", "--max-tokens", "8"]
    assert raylm([*argv, "--model", str(debug_model_dir)]) == 0
    local = capsys.readouterr().out
    assert raylm([*argv, "--model", remote]) == 0
    assert capsys.readouterr().out == local  # the same model, the same greedy text


def test_an_unreachable_object_store_is_one_line_that_says_where_credentials_and_endpoints_come_from(monkeypatch):
    from conftest import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(UserError, match=r"cannot read 's3://no-server/ds/manifest.json': .*endpoint \(AWS_ENDPOINT_URL\)"):
        storage.is_file("s3://no-server/ds/manifest.json")
