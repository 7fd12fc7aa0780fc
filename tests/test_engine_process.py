"""The engine in a child process (raylm/inference/engine_process.py), as a Serve replica runs it,
without Ray: the same tokens as the engine in process, cancellation, stats, stopping, and the two
ways it fails (a step that raises inside the child; the child killed from outside)."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from raylm.inference.engine import Engine, EngineConfig, EngineFailed
from raylm.inference.engine_process import EngineProcess
from raylm.inference.sampling import SamplingParams

PROMPTS = ["def add(a, b):", "import os\nprint(", "The json module encodes"]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def process(debug_model_dir):
    engine = EngineProcess(debug_model_dir, EngineConfig(max_batch_size=8, threads=1))
    yield engine
    engine.stop()


async def collect(engine, requests) -> list:
    async def pairs() -> list:
        return [pair async for batch in engine.stream(requests) for pair in batch]

    return await asyncio.wait_for(pairs(), 60)  # a regression fails here instead of hanging the suite


def test_it_streams_what_the_engine_makes_in_process_and_counts_it(process, debug_model_dir):
    local = Engine(debug_model_dir, EngineConfig(max_batch_size=8, threads=1))
    prompts = [local.encode_prompt(p) for p in PROMPTS]
    expected = local.generate(prompts, greedy(16))
    generated_before = process.stats()["generated_tokens"]

    async def all_at_once() -> list:
        return await asyncio.gather(*(collect(process, [(ids, greedy(16))]) for ids in prompts))

    for (text, ids, reason), pairs in zip(expected, asyncio.run(all_at_once())):
        outputs = [out for _, out in pairs]
        assert [t for out in outputs for t in out.token_ids] == ids
        assert "".join(out.text for out in outputs) == text and outputs[-1].finish_reason == reason
    assert process.stats()["generated_tokens"] == generated_before + 3 * 16
    assert process.alive() and process.ready["device"] == "cpu" and "KV cache:" in process.ready["kv_cache"]


def test_a_stream_left_early_cancels_its_request_in_the_child(process):
    ids = process.frontend.encode_prompt(PROMPTS[0])
    cancelled_before = process.stats()["requests_cancelled"]

    async def leave_early() -> None:
        stream = process.stream([(ids, greedy(200))])
        await anext(stream)
        await stream.aclose()  # as when a client disconnects

    asyncio.run(leave_early())
    deadline = time.monotonic() + 10
    while process.stats()["requests_running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = process.stats()
    assert stats["requests_running"] == 0 and stats["requests_cancelled"] == cancelled_before + 1
    assert stats["free_slots"] == 8


def test_a_request_the_frontend_refuses_names_its_field_without_reaching_the_child(process):
    with pytest.raises(Exception, match="max_tokens") as refused:
        process.submit([(process.frontend.encode_prompt(PROMPTS[1]), greedy(10_000))], lambda i, out: None)
    assert getattr(refused.value, "param", None) == "max_tokens" and process.alive()


def test_a_step_that_raises_in_the_child_fails_every_request_and_the_child_ends(debug_model_dir):
    """A token id past the vocabulary, sent past the frontend's checks, makes the child's next
    forward raise (as an out-of-memory error would): the request running beside it and the bad one
    both end with `error` at once, the child exits, and the engine refuses what comes next."""
    engine = EngineProcess(debug_model_dir, EngineConfig(max_batch_size=4, threads=1))
    good = engine.frontend.encode_prompt(PROMPTS[0])

    async def run() -> tuple[list, list, float]:
        running = asyncio.create_task(collect(engine, [(good, greedy(200))]))
        while engine.stats()["generated_tokens"] < 2:
            await asyncio.sleep(0.01)
        bad: list = []
        loop = asyncio.get_running_loop()
        finished = loop.create_future()
        with engine.lock:  # what `submit` sends, without its checks
            engine.listeners[10**6] = lambda out: (bad.append(out), out.finish_reason and loop.call_soon_threadsafe(finished.set_result, None))
            engine.post(("submit", [(10**6, [engine.frontend.model_config.vocab_size + 5], greedy(4))]))
        started = time.monotonic()
        await asyncio.wait_for(finished, 5)
        pairs = await asyncio.wait_for(running, 5)
        return pairs, bad, time.monotonic() - started

    try:
        pairs, bad, took = asyncio.run(run())
        assert pairs[-1][1].finish_reason == "error" and bad[-1].finish_reason == "error" and took < 2.0
        assert engine.process.wait(timeout=10) == 1 and not engine.alive()
        with pytest.raises(EngineFailed, match="failed step .*IndexError"):
            engine.submit([(good, greedy(4))], lambda i, out: None)
        with pytest.raises(EngineFailed, match="IndexError"):  # no figures from a child that is gone, and no wait
            engine.stats()
    finally:
        engine.stop()


def test_a_child_killed_from_outside_fails_its_streams_at_once_and_refuses_new_requests(debug_model_dir):
    """What the kernel's OOM killer would do: every open stream gets an `error` output within a
    second, alive() turns False (the replica's health check), and new requests are refused."""
    engine = EngineProcess(debug_model_dir, EngineConfig(max_batch_size=4, threads=1))
    ids = engine.frontend.encode_prompt(PROMPTS[2])

    async def run() -> tuple[list, float]:
        streams = [asyncio.create_task(collect(engine, [(ids, greedy(200))])) for _ in range(2)]
        while engine.stats()["requests_running"] < 2:
            await asyncio.sleep(0.01)
        os.kill(engine.process.pid, signal.SIGKILL)
        killed = time.monotonic()
        outputs = await asyncio.wait_for(asyncio.gather(*streams), 5)
        return outputs, time.monotonic() - killed

    try:
        outputs, took = asyncio.run(run())
        assert [pairs[-1][1].finish_reason for pairs in outputs] == ["error", "error"] and took < 2.0
        assert not engine.alive()
        with pytest.raises(EngineFailed, match="killed by signal 9"):
            engine.submit([(ids, greedy(4))], lambda i, out: None)
    finally:
        engine.stop()


def test_a_model_dir_the_child_cannot_load_is_refused_with_its_reason(tmp_path, debug_model_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in debug_model_dir.iterdir():
        if path.name != "model.safetensors":
            (broken / path.name).write_bytes(path.read_bytes())
    with pytest.raises(Exception, match="the engine process did not start: .*safetensors"):
        EngineProcess(broken, EngineConfig(max_batch_size=2, threads=1))


def test_the_child_exits_at_once_when_its_replica_is_killed_mid_generation(debug_model_dir, tmp_path):
    """A replica SIGKILLed (by Serve, or the OOM killer) cannot stop its engine: the child must see
    it go by itself and free its memory (a GPU's, for the replica that replaces it). With this tiny
    model's short steps the child may see it through its socket between steps as well as through
    its watch pipe; this checks that it goes, not which of the two told it."""
    import subprocess
    import sys

    script = tmp_path / "replica.py"
    script.write_text(
        "import asyncio, sys\n"
        "from raylm.inference.engine import EngineConfig\n"
        "from raylm.inference.engine_process import EngineProcess\n"
        "from raylm.inference.sampling import SamplingParams\n"
        f"engine = EngineProcess({str(debug_model_dir)!r}, EngineConfig(max_batch_size=4, threads=1))\n"
        "print(engine.process.pid, flush=True)\n"
        "async def forever():\n"
        "    ids = engine.frontend.encode_prompt('def')\n"
        "    while True:\n"
        "        async for batch in engine.stream([(ids, SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True))] * 4):\n"
        "            print('tokens', flush=True)\n"
        "asyncio.run(forever())\n"
    )
    replica = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        child = int(replica.stdout.readline())
        assert replica.stdout.readline().startswith("tokens")  # generating
        replica.kill()
        replica.wait()
        killed = time.monotonic()
        while time.monotonic() - killed < 10:
            try:
                with open(f"/proc/{child}/stat") as stat:
                    if stat.read().rsplit(")", 1)[1].split()[0] == "Z":  # exited, not yet reaped by init
                        break
            except FileNotFoundError:
                break
            time.sleep(0.05)
        else:
            os.kill(child, signal.SIGKILL)
            pytest.fail("the engine process outlived its replica by 10 s")
    finally:
        replica.kill()
