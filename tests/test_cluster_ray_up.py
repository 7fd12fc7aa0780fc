"""The `ray up` YAMLs in cluster/ validate offline, the way `ray up` itself would check them.

First against Ray's installed `ray-schema.json` (jsonschema), then through Ray's own
`prepare_config` (defaults merged in) and `validate_config`. No cloud is contacted.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_DIR = Path(__file__).resolve().parents[1] / "cluster"
RAY_UP_YAMLS = sorted(CLUSTER_DIR.glob("*.yaml"))


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_both_clouds_have_a_definition():
    assert {path.name for path in RAY_UP_YAMLS} >= {"aws.yaml", "gcp.yaml"}


@pytest.mark.parametrize("path", RAY_UP_YAMLS, ids=lambda path: path.name)
def test_validates_against_ray_schema_and_ray_own_checks(path, ray_schema):
    config = load(path)
    jsonschema.validate(config, ray_schema)
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)


@pytest.mark.parametrize("path", RAY_UP_YAMLS, ids=lambda path: path.name)
def test_has_head_cpu_workers_and_autoscaled_8_gpu_nodes(path):
    config = load(path)
    node_types = config["available_node_types"]
    workers = {name: spec for name, spec in node_types.items() if name != config["head_node_type"]}
    cpu_workers = [spec for spec in workers.values() if not spec["resources"].get("GPU")]
    gpu_workers = [spec for spec in workers.values() if spec["resources"].get("GPU")]
    assert cpu_workers, "a CPU worker type for data work"
    assert gpu_workers, "GPU worker types for training"
    for spec in cpu_workers + gpu_workers:
        assert 0 <= spec["min_workers"] < spec["max_workers"], "autoscaled between min and max"
    assert all(spec["resources"]["GPU"] == 8 for spec in gpu_workers)
    assert sum(spec["min_workers"] for spec in workers.values()) <= config["max_workers"]


@pytest.mark.parametrize("path", RAY_UP_YAMLS, ids=lambda path: path.name)
def test_nodes_install_this_project(path):
    config = load(path)
    mounted = {target for target, source in config["file_mounts"].items() if source == "."}
    assert mounted, "the checkout is copied to the nodes"
    installs = [command for command in config["setup_commands"] if "pip install" in command]
    assert any(f"-e {target}" in command for target in mounted for command in installs)
