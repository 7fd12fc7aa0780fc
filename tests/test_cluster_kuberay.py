"""The KubeRay manifests in cluster/kuberay/ validate offline, the way the API server and Ray would.

- Each manifest against its CRD's `openAPIV3Schema` (from ../shared/kuberay-crds/), and with no
  field the schema does not know (Kubernetes would drop or refuse it).
- The RayService's `serveConfigV2` with `ServeDeploySchema`, with no unknown keys (Serve ignores
  them silently), and with serving/configs/serve.yaml's application and autoscaling.
- The RayJob's `runtimeEnvYAML` with `RuntimeEnv`, again with no unknown keys.
"""

from __future__ import annotations

import shlex
import types
import typing
from pathlib import Path

import jsonschema
import pydantic
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
KUBERAY_DIR = REPO / "cluster" / "kuberay"
CRD_DIR = Path(__file__).resolve().parents[2] / "shared" / "kuberay-crds"
SERVE_YAML = REPO / "serving" / "configs" / "serve.yaml"
MANIFESTS = sorted(KUBERAY_DIR.glob("*.yaml"))
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml", "RayService": "ray.io_rayservices.yaml"}
# Deployment options that may differ on a cluster: what a replica runs on (a GPU there).
CLUSTER_SPECIFIC_DEPLOYMENT_KEYS = {"ray_actor_options"}
CLUSTER_SPECIFIC_APP_ARGS = {"model"}

needs_crds = pytest.mark.skipif(not CRD_DIR.is_dir(), reason=f"KubeRay CRDs not found at {CRD_DIR}")


def load_manifest(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def manifests_of_kind(kind: str) -> list[dict]:
    return [doc for doc in map(load_manifest, MANIFESTS) if doc["kind"] == kind]


@pytest.fixture(scope="module")
def crd_schemas() -> dict[str, dict]:
    """kind -> the openAPIV3Schema of its ray.io/v1 version."""
    schemas = {}
    for kind, name in CRD_FILES.items():
        crd = yaml.load((CRD_DIR / name).read_text(), Loader=yaml.CSafeLoader)
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schemas[kind] = version["schema"]["openAPIV3Schema"]
    return schemas


def unknown_fields(value, schema: dict, path: str = "") -> list[str]:
    """Dotted paths in `value` that an OpenAPI schema does not declare (structural schemas prune them)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(value, dict):
        properties = schema.get("properties")
        extra_schema = schema.get("additionalProperties")
        for key, item in value.items():
            if properties is not None and key in properties:
                found += unknown_fields(item, properties[key], f"{path}.{key}")
            elif isinstance(extra_schema, dict):
                found += unknown_fields(item, extra_schema, f"{path}.{key}")
            elif properties is not None:
                found.append(f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{path}[{index}]")
    return found


def models_in(annotation) -> list[type[pydantic.BaseModel]]:
    """The pydantic models an annotation can hold directly or inside lists/dict values/unions."""
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType, list, tuple):
        return [model for arg in args for model in models_in(arg)]
    if origin is dict and len(args) == 2:
        return models_in(args[1])
    return []


def unknown_model_keys(value, model: type[pydantic.BaseModel], path: str = "") -> list[str]:
    """Dotted paths in `value` that `model` (and the models nested in it) do not declare."""
    if not isinstance(value, dict):
        return []
    names = {}
    for name, field in model.model_fields.items():
        names[name] = field
        if field.alias:
            names[field.alias] = field
    found = []
    for key, item in value.items():
        if key not in names:
            found.append(f"{path}.{key}")
            continue
        for nested in models_in(names[key].annotation)[:1]:
            items = item if isinstance(item, list) else [item]
            for index, element in enumerate(items):
                suffix = f"[{index}]" if isinstance(item, list) else ""
                found += unknown_model_keys(element, nested, f"{path}.{key}{suffix}")
    return found


def test_the_three_kinds_are_there():
    assert {load_manifest(path)["kind"] for path in MANIFESTS} == set(CRD_FILES)


@needs_crds
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda path: path.name)
def test_manifest_validates_against_its_crd(path, crd_schemas):
    manifest = load_manifest(path)
    assert manifest["apiVersion"] == "ray.io/v1"
    schema = crd_schemas[manifest["kind"]]
    jsonschema.Draft7Validator(schema).validate(manifest)
    assert unknown_fields(manifest, schema) == []


@needs_crds
def test_unknown_field_check_catches_a_typo(crd_schemas):
    manifest = load_manifest(KUBERAY_DIR / "raycluster.yaml")
    manifest["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    assert unknown_fields(manifest, crd_schemas["RayCluster"]) == [".spec.workerGroupSpecs[0].maxReplica"]


def serve_config_of(service: dict) -> dict:
    return yaml.safe_load(service["spec"]["serveConfigV2"])


def cluster_spec_of(manifest: dict) -> dict:
    spec = manifest["spec"]
    return {"RayCluster": spec, "RayService": spec.get("rayClusterConfig"), "RayJob": spec.get("rayClusterSpec")}[manifest["kind"]]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda path: path.name)
def test_every_cluster_uses_rays_token_auth_with_one_secret(path):
    manifest = load_manifest(path)
    assert cluster_spec_of(manifest).get("authOptions") == {"mode": "token", "secretName": "raylm-auth"}, (
        f"{path.name}: the cluster must turn on Ray's token auth (authOptions) with the raylm-auth Secret"
    )
    assert "kubectl create secret generic raylm-auth" in path.read_text(), f"{path.name}: say how to create the Secret"


def test_serve_config_validates_with_no_unknown_keys():
    from ray.serve.schema import ServeDeploySchema

    (service,) = manifests_of_kind("RayService")
    config = serve_config_of(service)
    ServeDeploySchema.model_validate(config)
    assert unknown_model_keys(config, ServeDeploySchema) == []


def test_unknown_key_check_catches_a_serve_typo():
    from ray.serve.schema import ServeDeploySchema

    (service,) = manifests_of_kind("RayService")
    config = serve_config_of(service)
    config["applications"][0]["deployments"][0]["autoscaling_config"]["target_ongoing_request"] = 2
    assert unknown_model_keys(config, ServeDeploySchema) == [
        ".applications[0].deployments[0].autoscaling_config.target_ongoing_request"
    ]


def test_rayservice_serves_serve_yaml_with_the_same_autoscaling():
    local = yaml.safe_load(SERVE_YAML.read_text())
    (service,) = manifests_of_kind("RayService")
    cluster = serve_config_of(service)
    local_apps = {app["name"]: app for app in local["applications"]}
    cluster_apps = {app["name"]: app for app in cluster["applications"]}
    assert cluster_apps.keys() == local_apps.keys()
    for name, app in local_apps.items():
        deployed = cluster_apps[name]
        for key in ("import_path", "route_prefix"):
            assert deployed.get(key) == app.get(key), f"{name}.{key} differs from {SERVE_YAML}"
        assert {k: v for k, v in deployed["args"].items() if k not in CLUSTER_SPECIFIC_APP_ARGS} == {
            k: v for k, v in app["args"].items() if k not in CLUSTER_SPECIFIC_APP_ARGS
        }, f"{name}.args differ from {SERVE_YAML} (other than the model dir)"
        local_deployments = {d["name"]: d for d in app["deployments"]}
        cluster_deployments = {d["name"]: d for d in deployed["deployments"]}
        assert cluster_deployments.keys() == local_deployments.keys()
        for deployment, options in local_deployments.items():
            strip = lambda d: {k: v for k, v in d.items() if k not in CLUSTER_SPECIFIC_DEPLOYMENT_KEYS}  # noqa: E731
            assert strip(cluster_deployments[deployment]) == strip(options), (
                f"deployment {deployment} in cluster/kuberay/rayservice.yaml has drifted from {SERVE_YAML}; "
                "copy its options (autoscaling_config included) over"
            )


def test_runtime_env_validates_with_no_unknown_keys():
    from ray.runtime_env import RuntimeEnv

    (job,) = manifests_of_kind("RayJob")
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    RuntimeEnv(**runtime_env)
    assert set(runtime_env) <= RuntimeEnv.known_fields


def test_rayjob_runs_pretraining_with_a_recipe_that_exists():
    from raylm.training.config import recipe_path

    (job,) = manifests_of_kind("RayJob")
    command = shlex.split(job["spec"]["entrypoint"])
    assert command[:3] == ["python", "-m", "raylm.training.pretrain"]
    recipe = command[command.index("--config") + 1]
    assert recipe_path(recipe).is_file(), f"the RayJob's recipe {recipe!r} is not in training/configs/"
