"""The Ray Serve side: the `LLMServer` deployment (one engine per replica) and the app builder.

`build_app(args)` is the `import_path` of serving/configs/serve.yaml, so `serve run` / `serve deploy`
of that file (or `serve run raylm.serving.app:build_app model=DIR`) build the same app that
`raylm serve` runs. Each default is written once: the args' in `AppArgs` (the engine's own from
`EngineConfig`), the deployment options (autoscaling, queue limits, CPUs/GPUs per replica, health
checks, graceful shutdown) and the HTTP address in serving/configs/serve.yaml, which the decorator
reads. Another config file overrides those options one by one, as Serve's config files do.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import get_type_hints

from ray import serve

from raylm.core import storage
from raylm.core.config import from_dict, read_yaml, value_from_text
from raylm.core.errors import UserError
from raylm.inference.engine import EngineConfig, refuse_unknown_dtypes
from raylm.inference.kv_budget import parse_size

API_KEY_ENV = "RAYLM_API_KEY"
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "serve.yaml"
IMPORT_PATH = "raylm.serving.app:build_app"


@dataclass
class AppArgs:
    model: str  # the model dir (HF Llama format: config.json, model.safetensors, tokenizer files)
    model_name: str = ""  # the id clients ask for as `model`; "" = the model dir's name
    api_key: str = ""  # required as `Authorization: Bearer ...` when set; "" = RAYLM_API_KEY or none
    max_batch_size: int = EngineConfig.max_batch_size  # sequences running at once per replica (they share its KV cache)
    max_model_len: int = EngineConfig.max_model_len  # longest prompt + output; 0 = the model's context
    kv_cache_memory: str = EngineConfig.kv_cache_memory  # each replica's KV cache, e.g. 2GiB; "" = kv_cache_fraction of the memory free after the weights load
    kv_cache_fraction: float = EngineConfig.kv_cache_fraction  # without kv_cache_memory: this share of the free memory (at most max_batch_size full-length sequences' worth)
    kv_block_size: int = EngineConfig.kv_block_size  # tokens per KV cache block
    prefix_caching: bool = EngineConfig.prefix_caching  # start a prompt from the cached blocks of an earlier one's equal prefix (a system prompt, a chat history)
    max_prefill_tokens: int = EngineConfig.max_prefill_tokens  # prompt tokens computed per step; longer prompts are prefilled in chunks while the others decode
    max_body_bytes: int = 1 << 20  # request bodies above this get 413
    stream_interval_s: float = 0.0  # least time between two SSE writes of a stream; > 0 trades smoothness for throughput
    stream_writes_per_s: float = 500.0  # SSE writes a second of a replica's streams together at most: each stream's writes are spaced by (open streams / this); 0 = a write per step for every stream
    device: str = EngineConfig.device  # cpu | cuda | auto (cuda when the replica has a GPU)
    dtype: str = EngineConfig.dtype  # float32 | bfloat16 | float16 | auto (bfloat16 on CUDA, float32 on CPU)
    kv_cache_dtype: str = EngineConfig.kv_cache_dtype  # the KV cache's float32 | bfloat16 | float16 | auto (= dtype); 16 bits hold twice the tokens and speed long decodes
    ingress: bool = False  # HTTP in a deployment of its own (serving/ingress.py): a dead replica's requests are retried once, or get a JSON 503

    def validate(self) -> None:
        for name in ("stream_interval_s", "stream_writes_per_s"):
            if getattr(self, name) < 0:
                raise UserError(f"args.{name} must be 0 or more, got {getattr(self, name)}")
        if self.max_body_bytes < 1024:
            raise UserError(f"max_body_bytes must be at least 1024, got {self.max_body_bytes}")
        if self.kv_cache_memory:
            parse_size(self.kv_cache_memory, "args.kv_cache_memory")  # refused here, not in a replica
        refuse_unknown_dtypes(self, "args.")  # here, not in a replica


def parse_app_args(args: dict) -> AppArgs:
    """Builder args -> AppArgs. `serve run ... key=value` passes every value as a string."""
    hints = get_type_hints(AppArgs)
    typed = {k: value_from_text(v, hints[k], f"args.{k}") if isinstance(v, str) and k in hints else v for k, v in args.items()}
    app_args = from_dict(AppArgs, typed, prefix="args.")
    if not storage.is_dir(app_args.model):
        raise UserError(f"args.model: model dir {app_args.model!r} does not exist")
    # Replicas may not share the builder's working directory; a URI stays one (each replica copies it).
    return dataclasses.replace(app_args, model=storage.join(app_args.model))


def read_serve_config(path: str | Path):
    """A Ray Serve config file (a ServeDeploySchema), validated by Serve's schema, whose first
    application is raylm's with at most one deployment (LLMServer)."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:
        config = ServeDeploySchema(**read_yaml(path))
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UserError(f"serve config {str(path)!r}: {where}: {first['msg']}") from None
    if not config.applications:
        raise UserError(f"serve config {str(path)!r} has no applications")
    app = config.applications[0]
    if app.import_path != IMPORT_PATH:
        raise UserError(f"serve config {str(path)!r}: import_path is {app.import_path!r}, expected {IMPORT_PATH!r}")
    if len(app.deployments) > 1:
        raise UserError(f"serve config {str(path)!r}: expected one deployment (LLMServer), found {len(app.deployments)}")
    return config


def deployment_options(config) -> dict:
    """The LLMServer options a serve config sets, as Serve applies them (options not set keep the decorator's)."""
    deployments = config.applications[0].deployments
    return deployments[0].model_dump(exclude_unset=True) if deployments else {}


def replica_cpu_threads() -> int:
    """torch threads for this replica: the CPUs Ray gave it (at least 1), so replicas do not fight."""
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, int(cpus))


def export_engine_metrics(loop, stop: threading.Event, period_s: float = 2.0) -> None:
    """Mirror the engine's counters into Ray's metrics (Prometheus, Grafana), beside Serve's own."""
    from ray.util.metrics import Gauge

    from raylm.inference.engine import EngineFailed

    gauges: dict = {}
    while not stop.wait(period_s):
        try:
            stats = loop.stats()
        except EngineFailed:  # the replica is being replaced; its health check says why
            return
        except TimeoutError:  # a very long step; the next round asks again
            continue
        for name, value in stats.items():
            if isinstance(value, (int, float)):
                if name not in gauges:
                    gauges[name] = Gauge(f"raylm_engine_{name}", description=f"raylm engine: {name.replace('_', ' ')}")
                gauges[name].set(value)


# serve.yaml's options, so that the builder run bare (`serve run raylm.serving.app:build_app`) deploys
# what `raylm serve` does, and a config file's options override them one by one.
@serve.deployment(**deployment_options(read_serve_config(DEFAULT_CONFIG)))
@serve.ingress()
class LLMServer:
    def __init__(self, args: AppArgs):
        from raylm.inference.engine_process import EngineProcess

        config = EngineConfig(
            max_batch_size=args.max_batch_size,
            max_model_len=args.max_model_len,
            max_prefill_tokens=args.max_prefill_tokens,
            kv_cache_memory=args.kv_cache_memory,
            kv_cache_fraction=args.kv_cache_fraction,
            kv_block_size=args.kv_block_size,
            prefix_caching=args.prefix_caching,
            device=args.device,
            dtype=args.dtype,
            kv_cache_dtype=args.kv_cache_dtype,
            threads=replica_cpu_threads(),
        )
        # The engine steps in a child process, so HTTP and decoding do not share one GIL (engine_process.py).
        self.loop = EngineProcess(storage.local_dir(args.model), config)  # a model dir on object storage: copied to this node
        self.args = args
        self.stop_metrics = threading.Event()
        threading.Thread(target=export_engine_metrics, args=(self.loop, self.stop_metrics), daemon=True).start()
        # Printed, not only logged: Ray forwards a replica's stdout to the console of `raylm serve`.
        print(f"raylm engine ready: {args.model} on {self.loop.ready['device']}, {self.loop.ready['kv_cache']}", flush=True)

    def __serve_build_asgi_app__(self):
        from raylm.serving.api import ApiSettings, build_api

        settings = ApiSettings(
            model_name=self.args.model_name or Path(self.args.model).name,
            api_key=self.args.api_key or os.environ.get(API_KEY_ENV) or None,
            max_body_bytes=self.args.max_body_bytes,
            stream_interval_s=self.args.stream_interval_s,
            stream_writes_per_s=self.args.stream_writes_per_s,
        )
        return build_api(self.loop, settings)

    def check_health(self) -> None:
        if not self.loop.alive():
            raise RuntimeError(f"the engine has stopped: {self.loop.failure}")

    def __del__(self) -> None:
        if hasattr(self, "loop"):  # not when the engine did not start
            self.stop_metrics.set()
            self.loop.stop()


def build_app(args: dict) -> serve.Application:
    """The app builder of `import_path: raylm.serving.app:build_app` (Serve passes exactly the args dict)."""
    return configured_app(args, None)


def configured_app(args: dict, options: dict | None) -> serve.Application:
    """The Serve application for `args` (see AppArgs), with deployment options as a config file gives them."""
    app_args = parse_app_args(args)
    if app_args.ingress:
        from raylm.serving.ingress import (
            bind_ingress,  # it builds on this module's LLMServer
        )

        return bind_ingress(app_args, options)
    deployment = LLMServer.options(**options) if options else LLMServer
    return deployment.bind(app_args)
