"""The OpenAI-compatible endpoint: a real Serve app on 127.0.0.1, the real `openai` client.

One app (started through `start_serving` with a test copy of serving/configs/serve.yaml, an API
key and a model whose context is long enough to watch a client disconnect mid-stream) serves most
tests; the autoscaling and overload tests deploy their own small apps beside it.
"""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import yaml
from tiny_artifacts import make_model_dir

from raylm.inference.engine import Engine, EngineConfig
from raylm.inference.sampling import SamplingParams
from raylm.serving.serve import DEFAULT_CONFIG

openai = pytest.importorskip("openai")

API_KEY = "test-key-123"
MODEL = "served"
PROMPTS = ["def add(a, b):", "import os\n", "The json module", "class Point:", "x = [1, 2,", "for i in range(", "print('hi')", "# a comment"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, timeout_s: float, what: str, every_s: float = 0.25):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


@pytest.fixture(scope="module")
def server(ray_cluster, tokenizer_dir, tmp_path_factory):
    from ray import serve

    from raylm.serving.serve import start_serving

    root = tmp_path_factory.mktemp("serving")
    model_dir = make_model_dir(root / MODEL, tokenizer_dir, max_seq_len=2048)
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    app = config["applications"][0]
    app["args"]["max_batch_size"] = 16
    deployment = app["deployments"][0]
    deployment["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 1}  # one engine: its counters are the app's
    deployment["ray_actor_options"]["num_cpus"] = 0.25
    (root / "serve.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    try:
        base_url = start_serving(str(model_dir), port=port, api_key=API_KEY, config=root / "serve.yaml")
        yield base_url, model_dir, port
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def engine(server):
    """The same model dir, driven directly in this process."""
    return Engine(server[1], EngineConfig(max_batch_size=4, threads=1))


def stats(base_url: str) -> dict:
    return httpx.get(f"{base_url}/stats", headers={"Authorization": f"Bearer {API_KEY}"}).json()


def direct(engine: Engine, prompt_ids: list[int], max_tokens: int, **kw) -> tuple[str, list[int], str]:
    return engine.generate([prompt_ids], SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw))[0]


def test_models_completions_and_chat_through_the_openai_client(client, engine):
    assert [m.id for m in client.models.list().data] == [MODEL]

    reply = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=20, temperature=0)
    text, ids, reason = direct(engine, engine.encode_prompt(PROMPTS[0]), 20)
    assert reply.choices[0].text == text and reply.choices[0].finish_reason == reason
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(engine.encode_prompt(PROMPTS[0])), len(ids))

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is json?"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    text, ids, reason = direct(engine, engine.encode_chat(messages), 20)
    assert chat.choices[0].message.content == text and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason == reason and chat.usage.completion_tokens == len(ids)


def test_streaming_completions_and_chat_with_usage(client, engine):
    chunks = list(client.completions.create(
        model=MODEL, prompt=PROMPTS[1], max_tokens=25, temperature=0, stream=True, stream_options={"include_usage": True}
    ))
    text, ids, reason = direct(engine, engine.encode_prompt(PROMPTS[1]), 25)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ids)

    messages = [{"role": "user", "content": "hello"}]
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=25, temperature=0, stream=True, stream_options={"include_usage": True}
    ))
    text, ids, reason = direct(engine, engine.encode_chat(messages), 25)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
    assert chunks[-1].usage.completion_tokens == len(ids)


def test_logprobs_stop_strings_and_seeds_over_http(client, engine):
    reply = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=6, temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 6 and all(len(top) <= 2 for top in logprobs.top_logprobs)
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0, logprobs=True, top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    assert [len(t.top_logprobs) for t in chat.choices[0].logprobs.content] == [3, 3, 3, 3]

    full = direct(engine, engine.encode_prompt(PROMPTS[3]), 30, ignore_eos=True)[0]
    stop = full[10:13]
    cut = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=30, temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"

    def sampled(seed: int) -> str:
        return client.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=12, temperature=1.0, top_p=0.95, seed=seed).choices[0].text

    assert sampled(11) == sampled(11) != sampled(12)


def test_greedy_over_http_equals_transformers_generate(client, engine, server):
    transformers = pytest.importorskip("transformers")
    import torch

    hf = transformers.LlamaForCausalLM.from_pretrained(server[1]).eval()
    for prompt in PROMPTS[:3]:
        prompt_ids = engine.encode_prompt(prompt)
        with torch.no_grad():
            theirs = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=16, do_sample=False)[0, len(prompt_ids):].tolist()
        text, ids, _ = direct(engine, prompt_ids, 16)
        assert ids == theirs
        assert client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0).choices[0].text == text


def test_16_concurrent_streams_are_batched_and_independent(client, engine, server):
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(16)]

    def stream(prompt: str) -> str:
        chunks = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
        return "".join(c.choices[0].text for c in chunks if c.choices)

    with ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(stream, prompts))
    for prompt, text in zip(prompts, texts):
        assert text == direct(engine, engine.encode_prompt(prompt), 40, ignore_eos=True)[0]
    counters = stats(server[0])
    assert counters["batch_size_max"] > 1
    assert counters["requests_running"] == 0 and counters["free_slots"] == counters["max_batch_size"]


def test_client_that_disconnects_mid_stream_frees_its_slot(server):
    base_url = server[0]
    before = stats(base_url)["requests_cancelled"]
    body = {"model": MODEL, "prompt": "def", "max_tokens": 2000, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{base_url}/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            assert stats(base_url)["requests_running"] == 1
    after = wait_until(lambda: (s := stats(base_url))["requests_running"] == 0 and s, 60, "the cancelled request to leave")
    assert after["requests_cancelled"] == before + 1
    assert after["free_slots"] == after["max_batch_size"]


def completion(**fields) -> dict:
    return {"model": MODEL, "prompt": "hello", "max_tokens": 4, **fields}


BAD_REQUESTS = [
    # (name, path, body (dict or raw bytes), headers override, status, param, words in the message)
    ("malformed json", "completions", b'{"model": "served", "prompt": ', None, 400, None, "not valid JSON"),
    ("wrong type", "completions", completion(max_tokens="many"), None, 400, "max_tokens", "integer"),
    ("missing prompt", "completions", {"model": MODEL}, None, 400, "prompt", "required"),
    ("max_tokens 0", "completions", completion(max_tokens=0), None, 400, "max_tokens", "greater than or equal to 1"),
    ("beyond context", "completions", completion(max_tokens=2048), None, 400, "max_tokens", "context of 2048"),
    ("negative temperature", "completions", completion(temperature=-0.5), None, 400, "temperature", "greater than or equal to 0"),
    ("top_p 0", "completions", completion(top_p=0), None, 400, "top_p", "greater than 0"),
    ("top_p above 1", "completions", completion(top_p=1.5), None, 400, "top_p", "less than or equal to 1"),
    ("unknown field", "completions", completion(best_of_everything=3), None, 400, "best_of_everything", "unknown field"),
    ("unknown model", "completions", completion(model="gpt-9"), None, 404, "model", "does not exist"),
    ("oversized body", "completions", completion(prompt="x" * (2 << 20)), None, 413, None, "limit"),
    ("missing messages", "chat/completions", {"model": MODEL}, None, 400, "messages", "required"),
    ("bad role", "chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, None, 400, "messages[0].role", "role"),
    ("missing key", "completions", completion(), {}, 401, None, "API key"),
    ("wrong key", "completions", completion(), {"Authorization": "Bearer nope"}, 401, None, "API key"),
    # Every field has a bound (issue 14): a 400 naming it, never a 500 nor silent acceptance.
    ("seed beyond int64", "completions", completion(seed=2**70), None, 400, "seed", "less than or equal to 9223372036854775807"),
    ("seed below int64", "completions", completion(seed=-(2**70)), None, 400, "seed", "greater than or equal to"),
    ("100,000 stop_token_ids", "completions", completion(stop_token_ids=list(range(100_000))), None, 400, "stop_token_ids", "at most 64 items"),
    ("stop token outside vocab", "completions", completion(stop_token_ids=[10**6]), None, 400, "stop_token_ids", "outside the vocabulary"),
    ("200 KB stop string", "completions", completion(stop="x" * 200_000), None, 400, "stop", "at most 256 characters"),
    ("17 stop strings", "completions", completion(stop=["a"] * 17), None, 400, "stop", "at most 16 items"),
    ("empty stop string", "chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stop": [""]}, None, 400, "stop", "at least 1 character"),
    ("301 logit_bias", "completions", completion(logit_bias={str(i): 1 for i in range(301)}), None, 400, "logit_bias", "at most 300 items"),
    ("logit_bias above 100", "completions", completion(logit_bias={"5": 101}), None, 400, "logit_bias.5", "less than or equal to 100"),
    ("logit_bias not a token id", "completions", completion(logit_bias={"the": 1}), None, 400, "logit_bias.the", "valid integer"),
    ("logit_bias outside vocab", "completions", completion(logit_bias={"1000000": 1}), None, 400, "logit_bias", "outside the vocabulary"),
    ("n 2", "completions", completion(n=2), None, 400, "n", "should be 1"),
    ("max_tokens 10**12", "completions", completion(max_tokens=10**12), None, 400, "max_tokens", "context of 2048"),
    ("top_k 2**40", "completions", completion(top_k=2**40), None, 400, "top_k", "less than or equal to"),
    ("long user", "completions", completion(user="u" * 300), None, 400, "user", "at most 256 characters"),
    ("prompt beyond context", "completions", completion(prompt="def add(a, b): " * 2000), None, 400, "prompt", "context is 2048 tokens"),
    ("chat beyond context", "chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "def add(a, b): " * 2000}]}, None, 400, "messages", "context is 2048 tokens"),
    ("json 50,000 deep", "completions", b'{"model": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", None, 400, None, "nested more than 32 levels"),
    ("json 40 deep", "completions", b'{"model": "served", "prompt": "hi", "user": ' + b"[" * 40 + b"]" * 40 + b"}", None, 400, None, "nested more than 32 levels"),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_4xx_naming_the_field(server, case):
    _, path, body, headers, status, param, words = case
    headers = {"Authorization": f"Bearer {API_KEY}"} if headers is None else headers
    kwargs = {"content": body, "headers": {**headers, "Content-Type": "application/json"}} if isinstance(body, bytes) else {"json": body, "headers": headers}
    response = httpx.post(f"{server[0]}/v1/{path}", timeout=30, **kwargs)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"]
    assert not param or error["message"].startswith(param) or param in error["message"]
    assert httpx.get(f"{server[0]}/health").json() == {"status": "ok"}


def test_every_route_but_health_needs_the_key_and_a_new_route_does_too(server, engine):
    """The routes are read off the app the replica builds (build_api), then each is called over HTTP
    on the real endpoint without a key; a route added to such an app is guarded as it stands."""
    from fastapi.routing import APIRoute
    from fastapi.testclient import TestClient

    from raylm.inference.engine import EngineLoop
    from raylm.serving.api import OPEN_PATHS, ApiSettings, build_api

    loop = EngineLoop(engine)
    try:
        app = build_api(loop, ApiSettings(model_name=MODEL, api_key=API_KEY, max_body_bytes=1 << 20))
        routes = [(method, route.path) for route in app.routes if isinstance(route, APIRoute) for method in route.methods]
        assert {path for _, path in routes} >= {"/v1/models", "/v1/completions", "/v1/chat/completions", "/stats", "/metrics", "/health"}
        for method, path in routes:
            response = httpx.request(method, f"{server[0]}{path}", json=completion(), timeout=30)
            expected = 200 if path in OPEN_PATHS else 401
            assert response.status_code == expected, f"{method} {path} without a key: {response.status_code}"

        @app.get("/v1/added-later")
        async def added_later():
            return {"secret": True}

        local = TestClient(app)
        assert local.get("/v1/added-later").status_code == 401
        assert local.get("/v1/added-later", headers={"Authorization": f"Bearer {API_KEY}"}).json() == {"secret": True}
    finally:
        loop.stop()


def test_openai_client_sees_auth_and_validation_errors(server):
    wrong = openai.OpenAI(base_url=f"{server[0]}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    right = openai.OpenAI(base_url=f"{server[0]}/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        right.completions.create(model=MODEL, prompt="hi", temperature=-1)
    metrics = httpx.get(f"{server[0]}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    assert "raylm_engine_generated_tokens " in metrics and "raylm_engine_requests_running 0" in metrics


def running_replicas(app: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or "LLMServer" not in status.deployments:
        return 0
    return status.deployments["LLMServer"].replica_states.get("RUNNING", 0)


def deploy_side_app(server, name: str, options: dict) -> str:
    from ray import serve

    from raylm.serving.app import configured_app

    app = configured_app({"model": str(server[1]), "model_name": MODEL, "max_batch_size": 8}, options)
    serve.run(app, name=name, route_prefix=f"/{name}")
    return f"http://127.0.0.1:{server[2]}/{name}"


def fresh_replica_answers(url: str) -> bool:
    try:
        response = httpx.get(f"{url}/stats", timeout=5)
    except httpx.HTTPError:
        return False
    return response.status_code == 200 and response.json()["requests_failed"] == 0


def test_a_failing_engine_step_ends_its_requests_at_once_and_serve_replaces_the_replica(server):
    """A fault inside a step of a real replica's engine: the stream in flight gets an `error` event and
    the request in flight a JSON 500 within about a second, the replica then fails its health check,
    and Serve replaces it. The fault is injected through a deployment handle into a subclass of the
    real replica class defined here (so it ships by value), because it must happen inside the replica."""
    import json

    from ray import serve

    from raylm.serving.app import LLMServer, parse_app_args

    class FaultyLLMServer(LLMServer.func_or_class):
        def inject_step_fault(self) -> None:
            def failing_decode(seqs):
                raise RuntimeError("injected fault: a decode step failed")

            self.loop.engine.runner.decode = failing_decode

    deployment = LLMServer.options(
        func_or_class=FaultyLLMServer, num_replicas=1, health_check_period_s=1, health_check_timeout_s=10,
        ray_actor_options={"num_cpus": 0.25},
    )
    serve.run(deployment.bind(parse_app_args({"model": str(server[1]), "model_name": MODEL})), name="faulty", route_prefix="/faulty")
    url = f"http://127.0.0.1:{server[2]}/faulty"
    body = {"model": MODEL, "prompt": "def", "max_tokens": 2000, "temperature": 0}
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    try:
        with ThreadPoolExecutor(1) as pool, httpx.Client(timeout=120) as http:
            plain = pool.submit(lambda: client.completions.create(**body, extra_body={"ignore_eos": True}))
            with http.stream("POST", f"{url}/v1/completions", json={**body, "stream": True, "ignore_eos": True}) as response:
                events = (line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: "))
                assert "choices" in json.loads(next(events))
                wait_until(lambda: stats(url)["requests_running"] == 2, 60, "both requests to be decoding", every_s=0.1)
                serve.get_app_handle("faulty").inject_step_fault.remote().result()
                injected = time.monotonic()
                error = next(json.loads(e) for e in events if "error" in e)
                stream_took = time.monotonic() - injected
                assert list(events) == ["[DONE]"]
            with pytest.raises(openai.InternalServerError) as failed:
                plain.result(timeout=60)
            plain_took = time.monotonic() - injected
        assert error["error"]["code"] == "engine_failed" and "replaces it" in error["error"]["message"]
        assert failed.value.status_code == 500 and failed.value.body["code"] == "engine_failed"
        assert stream_took < 1.5 and plain_took < 1.5, (stream_took, plain_took)
        # The health check fails; Serve starts a fresh replica, which serves (and has failed nothing).
        wait_until(lambda: fresh_replica_answers(url), 120, "a replacement replica", every_s=1)
        assert client.completions.create(**{**body, "max_tokens": 4}).choices[0].finish_reason == "length"
    finally:
        serve.delete("faulty")


def test_overload_gets_429_with_retry_after(server):
    from ray import serve

    url = deploy_side_app(server, "tight", {
        "num_replicas": 1, "max_ongoing_requests": 1, "max_queued_requests": 1,
        "backpressure_config": {"status_code": 429, "retry_after_s": 3}, "ray_actor_options": {"num_cpus": 0.25},
    })
    try:
        body = {"model": MODEL, "prompt": "def", "max_tokens": 400, "temperature": 0, "ignore_eos": True}
        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(lambda _: httpx.post(f"{url}/v1/completions", json=body, timeout=120), range(6)))
        codes = sorted(r.status_code for r in responses)
        assert 200 in codes and 429 in codes and set(codes) <= {200, 429}
        assert all(r.headers.get("retry-after") == "3" for r in responses if r.status_code == 429)
        assert httpx.get(f"{url}/health").status_code == 200
    finally:
        serve.delete("tight")


def test_autoscaling_grows_under_load_and_shrinks_after(server):
    from ray import serve

    url = deploy_side_app(server, "scale", {
        "autoscaling_config": {
            "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
            "upscale_delay_s": 0.5, "downscale_delay_s": 2,
        },
        "max_ongoing_requests": 8,
        "ray_actor_options": {"num_cpus": 0.25},
    })
    stop = threading.Event()

    def keep_busy() -> None:  # bounded: 4 clients, one request at a time each, until told to stop
        body = {"model": MODEL, "prompt": "def", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
        with httpx.Client(timeout=120) as http:
            while not stop.is_set():
                assert http.post(f"{url}/v1/completions", json=body).status_code == 200

    try:
        assert running_replicas("scale") == 1
        with ThreadPoolExecutor(4) as pool:
            workers = [pool.submit(keep_busy) for _ in range(4)]
            try:
                wait_until(lambda: running_replicas("scale") >= 2, 90, "a second replica under load", every_s=0.5)
            finally:
                stop.set()
            for worker in workers:
                worker.result()
        wait_until(lambda: running_replicas("scale") == 1, 90, "the deployment to shrink back to 1 replica", every_s=0.5)
    finally:
        stop.set()
        serve.delete("scale")
