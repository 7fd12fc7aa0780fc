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
import hypothesis
import pytest
import yaml
from tiny_artifacts import make_model_dir

from raylm.inference.engine import Engine, EngineConfig
from raylm.inference.sampling import SamplingParams, choice_seed
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
def server(ray_cluster, tokenizer_dir, tmp_path_factory, s3_server):
    """The endpoint, serving a model dir from the S3-compatible server (each replica copies it to its node's cache)."""
    from ray import serve
    from tiny_artifacts import upload_dir

    from raylm.serving.serve import start_serving

    root = tmp_path_factory.mktemp("serving")
    model_dir = make_model_dir(root / MODEL, tokenizer_dir, max_seq_len=2048)
    remote_model = f"{s3_server('served-models')}/{MODEL}"
    upload_dir(model_dir, remote_model)
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    app = config["applications"][0]
    app["args"]["max_batch_size"] = 16
    deployment = app["deployments"][0]
    deployment["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 1}  # one engine: its counters are the app's
    deployment["ray_actor_options"]["num_cpus"] = 0.25
    (root / "serve.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    try:
        base_url = start_serving(remote_model, port=port, api_key=API_KEY, config=root / "serve.yaml")
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


def test_every_prompt_form_gives_n_choices_per_prompt_in_prompt_major_order(client, engine):
    ids = [engine.encode_prompt(p) for p in PROMPTS[:3]]
    expected = [direct(engine, i, 8)[0] for i in ids]
    forms = [(PROMPTS[0], 1), (ids[0], 1), (PROMPTS[:3], 3), (ids, 3)]  # string, token ids, strings, token-id lists
    for prompt, count in forms:
        reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, n=2)
        assert [c.index for c in reply.choices] == list(range(2 * count))
        assert [c.text for c in reply.choices] == [text for text in expected[:count] for _ in range(2)]
        assert reply.usage.prompt_tokens == sum(len(i) for i in ids[:count])  # each prompt counted once, not per choice
        assert reply.usage.completion_tokens == 2 * sum(len(direct(engine, i, 8)[1]) for i in ids[:count])


def test_n_choices_sample_independently_each_from_its_own_seed(client, engine):
    sampling = dict(max_tokens=12, temperature=1.0, top_p=0.95)
    reply = client.completions.create(model=MODEL, prompt=PROMPTS[4], n=4, seed=7, **sampling)
    texts = [c.text for c in reply.choices]
    prompt_ids = engine.encode_prompt(PROMPTS[4])
    alone = [engine.generate([prompt_ids], SamplingParams(seed=choice_seed(7, j), **sampling))[0][0] for j in range(4)]
    assert texts == alone and len(set(texts)) > 1
    assert client.completions.create(model=MODEL, prompt=PROMPTS[4], seed=7, **sampling).choices[0].text == texts[0]

    messages = [{"role": "user", "content": "hello"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, n=3, seed=5, **sampling)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, n=3, seed=5, stream=True, stream_options={"include_usage": True}, **sampling
    ))
    streamed: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
    assert streamed == {c.index: c.message.content for c in whole.choices} and len(set(streamed.values())) > 1
    finished = [c.index for chunk in chunks for c in chunk.choices if c.finish_reason]
    assert sorted(finished) == [0, 1, 2] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def prompt_scores(engine: Engine, ids: list[int]) -> tuple[list[float], list[int]]:
    """Each token after the first: its logprob given the ones before, and the most likely token there,
    from one forward of the model over all of them (no cache, no engine)."""
    import torch

    with torch.inference_mode():
        logprobs = engine.model(torch.tensor([ids]))[0].float().log_softmax(-1)  # [T, vocab]
    return [float(logprobs[t, ids[t + 1]]) for t in range(len(ids) - 1)], logprobs[:-1].argmax(-1).tolist()


def test_echo_with_logprobs_scores_the_prompt_as_legacy_completions_do(server, engine):
    """lm-evaluation-harness' loglikelihood request, byte for byte (local-completions' payload),
    and every field of the legacy logprobs it reads, checked against the model's own forward."""
    ids = [engine.encode_prompt(p) for p in PROMPTS[:3]]
    payload = {"model": MODEL, "prompt": ids, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True}
    response = httpx.post(f"{server[0]}/v1/completions", json=payload, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert response.status_code == 200
    choices = sorted(response.json()["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == [0, 1, 2]
    for prompt_ids, choice in zip(ids, choices):
        logprobs = choice["logprobs"]
        generated = direct(engine, prompt_ids, 1)
        assert choice["text"] == engine.tokenizer.decode(prompt_ids) + generated[0]
        assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == len(logprobs["text_offset"]) == len(prompt_ids) + 1
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        scores, best = prompt_scores(engine, prompt_ids + generated[1])
        assert logprobs["token_logprobs"][1:] == pytest.approx(scores, abs=1e-4)
        for position, (token_logprob, top) in enumerate(zip(logprobs["token_logprobs"][1:], logprobs["top_logprobs"][1:])):
            assert len(top) == 1 and (max(top.values()) == token_logprob) == (best[position] == (prompt_ids + generated[1])[position + 1])
        prompt_text = engine.tokenizer.decode(prompt_ids)
        assert "".join(logprobs["tokens"][:-1]) == prompt_text  # ASCII prompts: each of their tokens is whole characters
        assert logprobs["text_offset"] == [len("".join(logprobs["tokens"][:i])) for i in range(len(prompt_ids))] + [len(prompt_text)]

    scored_only = httpx.post(
        f"{server[0]}/v1/completions", json={**payload, "prompt": PROMPTS[0], "max_tokens": 0, "logprobs": 3},
        headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60,
    ).json()
    choice = scored_only["choices"][0]
    assert choice["text"] == PROMPTS[0] and choice["finish_reason"] == "length" and scored_only["usage"]["completion_tokens"] == 0
    assert len(choice["logprobs"]["tokens"]) == len(ids[0]) and all(len(top) == 3 for top in choice["logprobs"]["top_logprobs"][1:])


def test_lm_eval_local_completions_loglikelihood_equals_the_models_own(server, engine):
    """lm-eval itself (its `local-completions` model, its HTTP client and its response parser)
    against the endpoint: the loglikelihood and is-greedy of each continuation."""
    completions_api = pytest.importorskip("lm_eval.models.openai_completions")
    from lm_eval.api.instance import Instance

    lm = completions_api.LocalCompletionsAPI(
        base_url=f"{server[0]}/v1/completions", model=MODEL, tokenizer=str(server[1]), tokenizer_backend="huggingface",
        header={"Authorization": f"Bearer {API_KEY}"}, batch_size=2, max_retries=1,
    )
    pairs = [("def add(a, b):", " return a + b"), ("import os\n", "print(os.getcwd())"), ("The json module", " encodes")]
    results = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)], disable_tqdm=True)
    for (context, continuation), (loglikelihood, is_greedy) in zip(pairs, results):
        context_ids, continuation_ids = lm._encode_pair(context, continuation)  # as lm-eval splits them (trailing space moves)
        whole, start = context_ids + continuation_ids, len(context_ids)
        scores, best = prompt_scores(engine, whole)
        assert loglikelihood == pytest.approx(sum(scores[start - 1 :]), abs=1e-3)
        assert is_greedy == (best[start - 1 :] == whole[start:])


def test_streams_never_show_half_a_character_in_text_or_logprobs(server, monkeypatch):
    """The model is scripted (its logits force each next token) to write characters of 2, 3 and 4
    UTF-8 bytes, each split across byte tokens: no streamed text nor logprob token holds U+FFFD,
    and the logprobs' bytes add up to the text. The real engine and API, in this process."""
    import json

    import torch
    from fastapi.testclient import TestClient

    from raylm.inference.engine import EngineLoop
    from raylm.serving.api import ApiSettings, build_api

    engine = Engine(server[1], EngineConfig(max_batch_size=2, threads=1))
    target = "é€😀 ok ü"
    script = engine.tokenizer.encode(target).ids
    assert any("\ufffd" in engine.tokenizer.decode([t]) for t in script)
    run = engine.runner.run

    def forcing_run(chunks, all_rows) -> tuple[torch.Tensor, list[slice]]:
        """Logits whose argmax, for each sequence, is its next scripted token."""
        logits, given = run(chunks, all_rows)
        forced = torch.zeros_like(logits)
        for (seq, _), rows in zip(chunks, given):
            forced[rows, script[len(seq.output_ids)]] = 1.0
        return forced, given

    monkeypatch.setattr(engine.runner, "run", forcing_run)
    loop = EngineLoop(engine)
    try:
        http = TestClient(build_api(loop, ApiSettings(model_name=MODEL, api_key=None, max_body_bytes=1 << 20)))
        common = {"model": MODEL, "max_tokens": len(script), "temperature": 0, "stream": True, "ignore_eos": True}
        for path, body in [
            ("/v1/completions", {"prompt": "hi", "logprobs": 1}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 1}),
        ]:
            response = http.post(path, json={**common, **body})
            chunks = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
            choices = [c for chunk in chunks for c in chunk["choices"]]
            texts = [c["text"] if "text" in c else c["delta"].get("content") or "" for c in choices]
            assert "".join(texts) == target and not any("\ufffd" in t for t in texts)
            if "text" in choices[0]:
                tokens = [t for c in choices if c["logprobs"] for t in c["logprobs"]["tokens"]]
                assert "bytes:\\xc3" in tokens
            else:
                entries = [e for c in choices if c["logprobs"] for e in c["logprobs"]["content"]]
                tokens = [e["token"] for e in entries]
                assert bytes(b for e in entries for b in e["bytes"]) == target.encode()
            assert len(tokens) == len(script) and not any("\ufffd" in t for t in tokens)
    finally:
        loop.stop()


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
    ("max_tokens 0", "completions", completion(max_tokens=0), None, 400, "max_tokens", "allowed only with echo"),
    ("max_tokens -1 with echo", "completions", completion(max_tokens=-1, echo=True), None, 400, "max_tokens", "greater than or equal to 0"),
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
    ("n 17", "completions", completion(n=17), None, 400, "n", "less than or equal to 16"),
    ("n 0", "chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 0}, None, 400, "n", "greater than or equal to 1"),
    ("prompts x n over 256", "completions", completion(prompt=["a"] * 100, n=3), None, 400, "n", "at most 256"),
    ("257 prompts", "completions", completion(prompt=["a"] * 257), None, 400, "prompt", "at most 256 items"),
    ("empty prompt list", "completions", completion(prompt=[]), None, 400, "prompt", "at least 1 item"),
    ("empty token-id list", "completions", completion(prompt=[[1, 2], []]), None, 400, "prompt", "at least 1 item"),
    ("token ids mixed with text", "completions", completion(prompt=[[1, 2], "a"]), None, 400, "prompt", "valid"),
    ("negative token id", "completions", completion(prompt=[1, -2]), None, 400, "prompt", "greater than or equal to 0"),
    ("token id outside vocab in a list", "completions", completion(prompt=[[1, 2], [10**6]]), None, 400, "prompt", "outside the vocabulary"),
    ("echo on chat", "chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "echo": True}, None, 400, "echo", "unknown field"),
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


def test_metrics_are_prometheus_counters_and_gauges_of_the_engines_stats(server):
    from prometheus_client.parser import text_string_to_metric_families

    headers = {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.get(f"{server[0]}/metrics").status_code == 401
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 3, "ignore_eos": True}
    assert httpx.post(f"{server[0]}/v1/completions", json=body, headers=headers, timeout=60).status_code == 200
    response = httpx.get(f"{server[0]}/metrics", headers=headers)
    assert response.headers["content-type"].startswith("text/plain; version=")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    counters = stats(server[0])
    assert families["raylm_engine_generated_tokens"].type == "counter"  # the parser strips counters' _total
    assert families["raylm_engine_requests_running"].type == "gauge"
    assert families["raylm_engine_requests_running"].samples[0].value == 0
    assert 3 <= families["raylm_engine_generated_tokens"].samples[0].value == counters["generated_tokens"]
    assert families["raylm_engine_free_slots"].samples[0].value == counters["free_slots"] == counters["max_batch_size"]


def running_replicas(app: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or "LLMServer" not in status.deployments:
        return 0
    return status.deployments["LLMServer"].replica_states.get("RUNNING", 0)


def deploy_side_app(server, name: str, options: dict, **args) -> str:
    from ray import serve

    from raylm.serving.app import configured_app

    app = configured_app({"model": str(server[1]), "model_name": MODEL, "max_batch_size": 8, **args}, options)
    serve.run(app, name=name, route_prefix=f"/{name}")
    return f"http://127.0.0.1:{server[2]}/{name}"


def fresh_replica_answers(url: str) -> bool:
    try:
        response = httpx.get(f"{url}/stats", timeout=5)
    except httpx.HTTPError:
        return False
    return response.status_code == 200 and response.json()["requests_failed"] == 0


@pytest.mark.parametrize("fault", ["step-raises", "process-killed"])
def test_a_failing_engine_ends_its_requests_at_once_and_serve_replaces_the_replica(server, fault):
    """A fault in a real replica's engine process: a step that raises inside it (a token id past the
    vocabulary, sent past the replica's checks, as an out-of-memory error would), or the process
    killed (as the kernel's OOM killer would). The stream in flight gets an `error` event and the
    request in flight a JSON 500 within about a second, the replica then fails its health check,
    and Serve replaces it. The fault goes through a deployment handle into a subclass of the real
    replica class defined here (so it ships by value), because it must happen inside the replica."""
    import json
    import os
    import signal

    from ray import serve

    from raylm.inference.sampling import SamplingParams
    from raylm.serving.app import LLMServer, parse_app_args

    class FaultyLLMServer(LLMServer.func_or_class):
        def inject_step_fault(self, fault: str) -> None:
            if fault == "process-killed":
                os.kill(self.loop.process.pid, signal.SIGKILL)
                return
            with self.loop.lock:  # what EngineProcess.submit sends, without its checks
                self.loop.post(("submit", [(-1, [self.loop.frontend.model_config.vocab_size + 5], SamplingParams(max_tokens=1))]))

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
                serve.get_app_handle("faulty").inject_step_fault.remote(fault).result()
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


def test_a_replica_killed_under_load_gets_a_retry_or_json_behind_the_ingress(server, engine):
    """The ingress app (serving/ingress.py): HTTP in one deployment, the engine behind a handle. It
    answers as the plain app does; then the engine replica is killed with 8 requests and 2 streams
    in flight: each request is retried once, on the replica Serve starts in its place, and answered;
    each stream, already under way, ends with an `error` event (JSON, `replica_failed`) and [DONE].
    Never Serve's plain-text 500, and nobody has to act."""
    import json

    import ray
    from ray import serve

    from raylm.serving.app import configured_app

    app = configured_app({"model": str(server[1]), "model_name": MODEL, "max_batch_size": 16, "api_key": API_KEY, "ingress": "true"},
                         {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}})
    serve.run(app, name="failover", route_prefix="/failover")
    url = f"http://127.0.0.1:{server[2]}/failover"
    headers = {"Authorization": f"Bearer {API_KEY}"}
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        text, _, _ = direct(engine, engine.encode_prompt(PROMPTS[0]), 12)
        assert client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0).choices[0].text == text
        streamed = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in streamed if c.choices) == text
        refused = httpx.post(f"{url}/v1/completions", json=completion(), timeout=30)
        assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
        long = {"model": MODEL, "prompt": "def", "max_tokens": 2000, "temperature": 0, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=long, headers=headers, timeout=60) as response:
            assert next(line for line in response.iter_lines() if line.startswith("data:"))
        wait_until(lambda: (s := stats(url))["requests_running"] == 0 and s["requests_cancelled"] == 1, 60, "a client that left to free its slot")

        body = {"model": MODEL, "prompt": "def", "max_tokens": 600, "temperature": 0, "ignore_eos": True}

        def plain(_) -> httpx.Response:
            return httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=180)

        def stream(_) -> list[str]:
            with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, headers=headers, timeout=180) as response:
                assert response.status_code == 200
                return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]

        with ThreadPoolExecutor(10) as pool:
            plains = [pool.submit(plain, i) for i in range(8)]
            streams = [pool.submit(stream, i) for i in range(2)]
            wait_until(lambda: stats(url)["requests_running"] == 10, 60, "all ten to be generating", every_s=0.1)
            [victim] = [a for a in ray.util.list_named_actors(all_namespaces=True) if "failover#LLMServer" in a["name"]]
            ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
            killed = time.monotonic()
            answers = [p.result(timeout=180) for p in plains]
            recovered = time.monotonic() - killed
            events = [s.result(timeout=180) for s in streams]
        for response in answers:
            assert response.status_code == 200 and response.headers["x-raylm-retried"] == "1"
            assert response.json()["choices"][0]["finish_reason"] == "length"
        for lines in events:
            assert lines[-1] == "[DONE]" and json.loads(lines[-2])["error"]["code"] == "replica_failed"
        assert recovered < 60, f"the retries were answered {recovered:.0f}s after the kill"
    finally:
        serve.delete("failover")


def flood_of_six(url: str) -> list:
    """Six long completions at once at an app that runs one and queues one: some answered, the rest 429."""
    body = {"model": MODEL, "prompt": "def", "max_tokens": 400, "temperature": 0, "ignore_eos": True}
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: httpx.post(f"{url}/v1/completions", json=body, timeout=120), range(6)))
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 429 in codes and set(codes) <= {200, 429}
    return responses


def test_overload_gets_429_with_retry_after(server):
    from ray import serve

    url = deploy_side_app(server, "tight", {
        "num_replicas": 1, "max_ongoing_requests": 1, "max_queued_requests": 1,
        "backpressure_config": {"status_code": 429, "retry_after_s": 3}, "ray_actor_options": {"num_cpus": 0.25},
    })
    try:
        responses = flood_of_six(url)
        assert all(r.headers.get("retry-after") == "3" for r in responses if r.status_code == 429)
        assert httpx.get(f"{url}/health").status_code == 200
    finally:
        serve.delete("tight")


def test_overload_behind_the_ingress_gets_a_json_429_with_retry_after(server):
    from ray import serve

    from raylm.serving.app import configured_app

    serve.run(configured_app({"model": str(server[1]), "model_name": MODEL, "ingress": True}, {
        "num_replicas": 1, "max_ongoing_requests": 1, "max_queued_requests": 1,
        "backpressure_config": {"status_code": 429, "retry_after_s": 3}, "ray_actor_options": {"num_cpus": 0.25},
    }), name="tight-ingress", route_prefix="/tight-ingress")
    url = f"http://127.0.0.1:{server[2]}/tight-ingress"
    try:
        responses = flood_of_six(url)
        for refused in (r for r in responses if r.status_code == 429):
            assert refused.headers["retry-after"] == "3" and refused.json()["error"]["code"] == "overloaded"
    finally:
        serve.delete("tight-ingress")


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


@pytest.fixture(scope="module")
def fuzzed_app(server):
    """A side app with a 32-token context, so that any request the schema allows generates little."""
    from ray import serve

    url = deploy_side_app(server, "fuzz", {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}}, api_key=API_KEY, max_model_len=32)
    try:
        yield url
    finally:
        serve.delete("fuzz")


@pytest.fixture(scope="module")
def published_schema(fuzzed_app):
    schemathesis = pytest.importorskip("schemathesis")
    assert httpx.get(f"{fuzzed_app}/openapi.json").status_code == 401  # behind the key, as every route but /health
    return schemathesis.openapi.from_url(f"{fuzzed_app}/openapi.json", headers={"Authorization": f"Bearer {API_KEY}"})


def test_published_schema_shows_the_bounds(published_schema, engine):
    """The bounds of serving/protocol.py, and this server's own: its model, vocabulary and context."""
    schema = published_schema.raw_schema
    fields = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert fields["model"]["enum"] == [MODEL] and (fields["n"]["minimum"], fields["n"]["maximum"]) == (1, 16)
    assert (fields["max_tokens"]["minimum"], fields["max_tokens"]["maximum"]) == (0, 31)
    assert next(b for b in fields["stop"]["anyOf"] if b.get("type") == "array")["maxItems"] == 16
    assert next(b for b in fields["seed"]["anyOf"] if b.get("type") == "integer")["maximum"] == 2**63 - 1
    token_lists = next(b for b in fields["prompt"]["anyOf"] if b.get("items", {}).get("type") == "array")
    assert token_lists["maxItems"] == 256 and token_lists["items"]["maxItems"] == 31
    assert token_lists["items"]["items"]["maximum"] == engine.model_config.vocab_size - 1
    assert set(schema["paths"]) == {"/health", "/v1/models", "/v1/completions", "/v1/chat/completions", "/stats", "/metrics"}
    assert all("401" in op["responses"] for path, ops in schema["paths"].items() if path != "/health" for op in ops.values())


# Each operation's requests come from a hypothesis test run inside this one (schemathesis' own
# pytest loader, `from_fixture`, does not run under pytest 9): at most EXAMPLES per operation and
# mode, derandomized, so CI sees the same requests on every run.
FUZZ_EXAMPLES = 60


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzzed_requests_get_no_5xx_and_answers_that_match_the_schema(published_schema, fuzzed_app, mode):
    """Schemathesis' requests, valid (positive) or breaking the schema (negative), against the real app:
    never a 5xx, and every answer's status, content type and body as the published schema says."""
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    operations = [result.ok() for result in published_schema.get_all_operations()]
    assert len(operations) == 6
    if mode == "negative":  # only a body can break the schema: the GET routes take no input
        operations = [op for op in operations if op.method.upper() == "POST"]
    for operation in operations:

        @hypothesis.given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
        @hypothesis.settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None, suppress_health_check=list(hypothesis.HealthCheck))
        def answers_as_published(case) -> None:
            case.call_and_validate(base_url=fuzzed_app, headers={"Authorization": f"Bearer {API_KEY}"}, checks=checks, timeout=60)

        answers_as_published()
