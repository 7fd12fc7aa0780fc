"""serving/configs/serve.yaml and the app builder, without starting anything."""

from __future__ import annotations

import inspect

import pytest
import yaml

from raylm.core.errors import UserError
from raylm.serving.app import build_app, parse_app_args
from raylm.serving.serve import DEFAULT_CONFIG, read_serve_config


def test_serve_yaml_is_a_serve_config_for_our_builder_with_limits_and_autoscaling():
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    ServeDeploySchema(**raw)
    assert raw["http_options"]["host"] == "127.0.0.1"
    app = read_serve_config(DEFAULT_CONFIG)
    assert app.import_path == "raylm.serving.app:build_app"
    [deployment] = app.deployments
    assert deployment.name == "LLMServer" and deployment.max_queued_requests > 0
    assert deployment.autoscaling_config["min_replicas"] < deployment.autoscaling_config["max_replicas"]


def test_builder_takes_serve_runs_string_args(debug_model_dir):
    assert len(inspect.signature(build_app).parameters) == 1  # what `serve run`/`serve deploy` call it with
    args = parse_app_args({"model": str(debug_model_dir), "max_batch_size": "4", "api_key": "123"})
    assert (args.max_batch_size, args.api_key) == (4, "123")
    build_app({"model": str(debug_model_dir)})


@pytest.mark.parametrize(
    "args, words",
    [
        ({}, "model"),
        ({"model": "/nonexistent/model"}, "does not exist"),
        ({"model": ".", "max_batch_size": "many"}, "args.max_batch_size"),
        ({"model": ".", "batch": 3}, "args.batch"),
    ],
)
def test_bad_builder_args_are_named(args, words):
    with pytest.raises(UserError, match=words):
        parse_app_args(args)


def test_bad_serve_config_is_named(tmp_path):
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw["applications"][0]["deployments"][0]["max_ongoing_requests"] = "lots"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match="max_ongoing_requests"):
        read_serve_config(tmp_path / "bad.yaml")
