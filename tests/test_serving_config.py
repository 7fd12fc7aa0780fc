"""Serving's settings, without starting anything: each default is written once and reaches both
ways of running the app (`raylm serve` and Serve's own `serve run` of the builder), and a config
file or a flag overrides exactly what it sets."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import yaml

from raylm.core.errors import UserError
from raylm.inference.engine import EngineConfig
from raylm.serving import app as app_module
from raylm.serving import serve as serve_module
from raylm.serving.app import (
    DEFAULT_CONFIG,
    AppArgs,
    build_app,
    parse_app_args,
    read_serve_config,
)
from raylm.serving.serve import plan_command


def default_yaml() -> dict:
    return yaml.safe_load(DEFAULT_CONFIG.read_text())


def running_options(app) -> dict:
    """The deployment options Serve will deploy the app with, as Serve itself reports them."""
    from ray.serve.deployment import deployment_to_schema

    return deployment_to_schema(app._bound_deployment).model_dump(exclude_unset=True)


def bound_args(app) -> AppArgs:
    (args,) = app._bound_deployment.init_args
    return args


def write_config(tmp_path: Path, edit) -> Path:
    config = default_yaml()
    edit(config)
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_builder_alone_deploys_exactly_serve_yaml_s_options(debug_model_dir):
    [yaml_options] = default_yaml()["applications"][0]["deployments"]
    assert len(inspect.signature(build_app).parameters) == 1  # what `serve run`/`serve deploy` call it with
    assert running_options(build_app({"model": str(debug_model_dir)})) == yaml_options


def test_raylm_serve_without_flags_gets_serve_yaml_s_options_and_address_and_app_args_defaults(debug_model_dir):
    raw = default_yaml()
    [yaml_options] = raw["applications"][0]["deployments"]
    plan, address = plan_command(["--model", str(debug_model_dir)])
    assert running_options(plan.app) == yaml_options
    assert plan.http == raw["http_options"] and address is None
    assert plan.base_url == f"http://{raw['http_options']['host']}:{raw['http_options']['port']}"
    assert bound_args(plan.app) == AppArgs(model=str(debug_model_dir.resolve()))


def test_app_args_take_the_engine_s_defaults():
    args, engine = AppArgs(model="m"), EngineConfig()
    shared = {f.name for f in dataclasses.fields(AppArgs)} & {f.name for f in dataclasses.fields(EngineConfig)}
    assert shared >= {"max_batch_size", "max_model_len", "device", "dtype"}
    assert {name: getattr(args, name) for name in shared} == {name: getattr(engine, name) for name in shared}


def test_an_app_args_default_changed_in_app_args_reaches_raylm_serve(debug_model_dir, monkeypatch, capsys):
    # Nothing between AppArgs and the replica (serve.yaml's args, serve.py's flags) may pin the old value.
    changed = AppArgs.__dataclass_fields__["max_batch_size"].default + 5
    Changed = dataclasses.make_dataclass("AppArgs", [("max_batch_size", int, dataclasses.field(default=changed))], bases=(AppArgs,))
    monkeypatch.setattr(app_module, "AppArgs", Changed)
    monkeypatch.setattr(serve_module, "AppArgs", Changed)
    plan, _ = plan_command(["--model", str(debug_model_dir)])
    assert bound_args(plan.app).max_batch_size == changed
    with pytest.raises(SystemExit):
        plan_command(["--help"])
    assert f"(default: {changed})" in capsys.readouterr().out


def test_an_option_or_address_changed_in_serve_yaml_reaches_raylm_serve(debug_model_dir, tmp_path, monkeypatch):
    def edit(config):
        config["http_options"]["port"] += 1
        config["applications"][0]["deployments"][0]["max_queued_requests"] += 1

    changed = write_config(tmp_path, edit)
    monkeypatch.setattr(serve_module, "DEFAULT_CONFIG", changed)
    plan, _ = plan_command(["--model", str(debug_model_dir)])
    [options] = yaml.safe_load(changed.read_text())["applications"][0]["deployments"]
    assert running_options(plan.app)["max_queued_requests"] == options["max_queued_requests"]
    assert plan.http["port"] == default_yaml()["http_options"]["port"] + 1


def test_a_config_file_overrides_what_it_sets_and_flags_override_the_file(debug_model_dir, tmp_path):
    def edit(config):
        del config["http_options"]
        app = config["applications"][0]
        app["args"]["max_batch_size"] = 5
        app["args"]["model_name"] = "from-file"
        app["deployments"] = [{"name": "LLMServer", "max_queued_requests": 3}]

    path = write_config(tmp_path, edit)
    [defaults] = default_yaml()["applications"][0]["deployments"]
    plan, _ = plan_command(["--model", str(debug_model_dir), "--config", str(path), "--max-batch-size", "7", "--port", "9001"])
    options = running_options(plan.app)
    assert options["max_queued_requests"] == 3
    assert {k: options[k] for k in defaults if k != "max_queued_requests"} == {k: v for k, v in defaults.items() if k != "max_queued_requests"}
    args = bound_args(plan.app)
    assert (args.max_batch_size, args.model_name) == (7, "from-file")
    assert plan.http == {**default_yaml()["http_options"], "port": 9001}  # the file sets no address: the default file's


def test_the_kv_cache_flags_reach_the_app_and_a_bad_size_is_refused_before_anything_starts(debug_model_dir):
    plan, _ = plan_command(["--model", str(debug_model_dir), "--kv-cache-memory", "2GiB", "--no-prefix-caching", "--max-prefill-tokens", "256",
                            "--kv-cache-dtype", "bfloat16"])
    args = bound_args(plan.app)
    assert (args.kv_cache_memory, args.prefix_caching, args.max_prefill_tokens, args.kv_cache_dtype) == ("2GiB", False, 256, "bfloat16")
    with pytest.raises(UserError, match="args.kv_cache_memory '2 parsecs': expected a size such as 2GiB"):
        plan_command(["--model", str(debug_model_dir), "--kv-cache-memory", "2 parsecs"])


def test_builder_takes_serve_runs_string_args(debug_model_dir):
    args = parse_app_args({"model": str(debug_model_dir), "max_batch_size": "4", "api_key": "123", "stream_interval_s": "0.5"})
    assert (args.max_batch_size, args.api_key, args.stream_interval_s) == (4, "123", 0.5)


@pytest.mark.parametrize(
    "args, words",
    [
        ({}, "model"),
        ({"model": "/nonexistent/model"}, "does not exist"),
        ({"model": ".", "max_batch_size": "many"}, "config key 'args.max_batch_size': expected int, got 'many'"),
        ({"model": ".", "max_batch": 3}, r"unknown config key 'args.max_batch' \(did you mean 'args.max_batch_size'\?\)"),
        ({"model": ".", "qqq": 3}, r"unknown config key 'args.qqq' \(known keys here: api_key, device"),
        ({"model": ".", "stream_writes_per_s": "-5"}, r"args.stream_writes_per_s must be 0 or more, got -5.0"),
        ({"model": ".", "kv_cache_dtype": "int8"}, r"args.kv_cache_dtype 'int8': expected one of auto, float32, bfloat16, float16"),
    ],
)
def test_bad_builder_args_are_named(args, words):
    with pytest.raises(UserError, match=words):
        parse_app_args(args)


def test_an_unknown_or_ill_typed_flag_names_the_nearest_flag_or_the_type(debug_model_dir, capsys):
    for flags, words in [(["--max-bach-size", "4"], "unknown option '--max-bach-size' (did you mean '--max-batch-size'?)"),
                         (["--max-batch-size", "many"], "argument --max-batch-size: expected int, got 'many'")]:
        with pytest.raises(SystemExit):
            plan_command(["--model", str(debug_model_dir), *flags])
        assert words in capsys.readouterr().err


def test_bad_serve_config_is_named(tmp_path):
    path = write_config(tmp_path, lambda c: c["applications"][0]["deployments"][0].update(max_ongoing_requests="lots"))
    with pytest.raises(UserError, match="max_ongoing_requests"):
        read_serve_config(path)


def test_an_exposed_address_without_a_key_needs_the_loud_opt_out(debug_model_dir, capsys, monkeypatch):
    monkeypatch.delenv("RAYLM_API_KEY", raising=False)
    with pytest.raises(UserError, match="refusing to serve on 10.1.2.3 without an API key.*--insecure-no-api-key"):
        plan_command(["--model", str(debug_model_dir), "--host", "10.1.2.3"])
    plan, _ = plan_command(["--model", str(debug_model_dir), "--host", "10.1.2.3", "--insecure-no-api-key"])
    assert plan.http["host"] == "10.1.2.3" and "WITHOUT an API key" in capsys.readouterr().err
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        plan_command(["--model", str(debug_model_dir), "--host", host])  # loopback needs no key
    assert plan_command(["--model", str(debug_model_dir), "--host", "192.0.2.1", "--api-key", "k"])[0].http["host"] == "192.0.2.1"
