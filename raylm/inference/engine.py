"""The generation engine: ties the scheduler, the model runner and output processing together.

`Engine.step()` is one round of continuous batching:
1. the scheduler retires cancelled sequences, gives each decoding sequence the KV cache block its
   next token needs (preempting the newest when none is free), and admits waiting ones while
   blocks are free, starting each from the cached blocks of its prompt's prefix and cutting long
   prompts into chunks within a per-step budget (`scheduler.py`, `block_manager.py`);
2. the model runner computes every scheduled token in one forward: the decodes' one token each
   and the prefills' chunks, packed together, each sequence over its own blocks (`runner.py`);
3. output processing samples the next token of each sequence whose known tokens are now all
   computed, applies its stops and streams its new text to its consumer (`output.py`);
4. the scheduler retires the finished sequences, whose blocks are free for the next step (and
   whose full blocks stay registered for later prefixes).

So a request that arrives mid-generation joins at the next step instead of waiting for a batch to
drain, and one long prompt delays the running decodes by a chunk per step, not by all of it. The
cache is sized once, from a memory budget (`kv_budget.py`). `Engine` itself is synchronous (the
`generate` CLI drives it directly); `EngineStreams` hands out asyncio streams over one that steps
elsewhere: `EngineLoop` in a thread of this process, `EngineProcess` (engine_process.py, what a Serve
replica runs) in a process of its own. What a request needs before it is queued (the tokenizer,
the chat template, the request checks) is `RequestFrontend`, which the engine is too.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from raylm.core.errors import UserError
from raylm.inference.block_manager import BlockManager
from raylm.inference.detokenize import TextStream
from raylm.inference.kv_budget import free_memory, parse_size, plan_kv_cache
from raylm.inference.output import OutputProcessor
from raylm.inference.runner import ModelRunner
from raylm.inference.sampling import SamplingParams, new_generator
from raylm.inference.scheduler import Scheduler
from raylm.inference.sequence import ERROR, Output, Sequence
from raylm.model.chat import (
    ChatTemplate,
    load_tokenizer,
    read_tokenizer_config,
    special_token_ids,
)
from raylm.model.model_dir import read_model_config

log = logging.getLogger(__name__)


class InvalidRequest(UserError):
    """A request the engine cannot run; `param` names the offending field (OpenAI's error shape)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


DTYPES = ("auto", "float32", "bfloat16", "float16")  # what `dtype` and `kv_cache_dtype` take


def refuse_unknown_dtypes(config, prefix: str = "") -> None:
    """`config.dtype` and `config.kv_cache_dtype` must be DTYPES; `prefix` names where they were set."""
    for name in ("dtype", "kv_cache_dtype"):
        if getattr(config, name) not in DTYPES:
            raise UserError(f"{prefix}{name} {getattr(config, name)!r}: expected one of {', '.join(DTYPES)}")


@dataclass
class EngineConfig:
    max_batch_size: int = 32  # sequences running at once (they share the KV cache's blocks)
    max_model_len: int = 0  # longest prompt + output; 0 = the model's max_position_embeddings
    max_prefill_tokens: int = 2048  # prompt tokens computed per step; longer prompts are prefilled in chunks while the others decode
    kv_cache_memory: str = ""  # the KV cache's size, e.g. 2GiB or 512MiB; "" = kv_cache_fraction of the free memory
    kv_cache_fraction: float = 0.9  # without kv_cache_memory: this share of the device's memory free after the weights load (at most max_batch_size full-length sequences' worth)
    kv_block_size: int = 16  # tokens per KV cache block
    prefix_caching: bool = True  # start a prompt from the cached blocks of an earlier one's equal prefix
    device: str = "auto"  # "cpu", "cuda", "cuda:1", ...; auto = cuda when available
    dtype: str = "auto"  # float32 | bfloat16 | float16; auto = bfloat16 on CUDA, float32 on CPU
    kv_cache_dtype: str = "auto"  # the KV cache's float32 | bfloat16 | float16; auto = dtype. A 16-bit cache holds twice the tokens and halves what a long decode reads
    threads: int = 0  # torch CPU threads for this engine (0 = torch's default)

    def validate(self) -> None:
        if self.max_batch_size < 1:
            raise UserError(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        if self.max_model_len < 0:
            raise UserError(f"max_model_len must be 0 (the model's) or positive, got {self.max_model_len}")
        refuse_unknown_dtypes(self)
        if self.max_prefill_tokens < 1:
            raise UserError(f"max_prefill_tokens must be at least 1, got {self.max_prefill_tokens}")
        if self.kv_block_size < 1:
            raise UserError(f"kv_block_size must be at least 1, got {self.kv_block_size}")
        if not 0 < self.kv_cache_fraction <= 1:
            raise UserError(f"kv_cache_fraction must be in (0, 1], got {self.kv_cache_fraction}")
        if self.kv_cache_memory:
            parse_size(self.kv_cache_memory)


@dataclass
class EngineStats:
    steps: int = 0
    requests_finished: int = 0
    requests_cancelled: int = 0
    requests_failed: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    batch_size_last: int = 0
    batch_size_max: int = 0
    batch_size_sum: int = 0  # over decode steps, for the mean
    decode_seconds: float = 0.0  # time in the steps that decode (their forward, prefill chunks packed in it included, and sampling)
    ttft: deque = field(default_factory=lambda: deque(maxlen=1000))  # recent times to first token (s)


def read_stop_token_ids(model_dir: Path) -> set[int]:
    """Ids that end a generation: generation_config.json's eos ids and the tokenizer's end markers."""
    ids = set(special_token_ids(model_dir)["stop"])
    path = model_dir / "generation_config.json"
    if path.is_file():
        eos = json.loads(path.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids


def percentile(values, q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class RequestFrontend:
    """What a request needs before it is queued, and no model: the tokenizer, the chat template, the
    context length and the checks that name a bad field. The engine is one; the Serve replica holds
    one of its own in front of an engine in another process (engine_process.py)."""

    def __init__(self, model_dir: str | Path, max_model_len: int = 0):
        """`max_model_len` 0 is the model's max_position_embeddings (it can only be lowered)."""
        self.model_dir = Path(model_dir)
        self.model_config = read_model_config(self.model_dir)
        self.max_len = min(max_model_len or self.model_config.max_seq_len, self.model_config.max_seq_len)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.chat_template = ChatTemplate(read_tokenizer_config(self.model_dir))

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt).ids
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise InvalidRequest(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})", "prompt")
        return list(prompt)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        try:
            text = self.chat_template.render(messages)
        except UserError as err:
            raise InvalidRequest(str(err), "messages") from None
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def check_request(self, prompt_ids: list[int], params: SamplingParams, prompt_param: str = "prompt") -> None:
        """Refuse what the engine cannot run, naming the field (`prompt_param`: where the prompt came from)."""
        if not prompt_ids:
            raise InvalidRequest(f"{prompt_param}: the prompt is empty; it must hold at least one token", prompt_param)
        if len(prompt_ids) >= self.max_len:
            raise InvalidRequest(
                f"{prompt_param}: the prompt is {len(prompt_ids)} tokens, but the model's context is {self.max_len} "
                "tokens and must also hold at least one generated token; shorten it",
                prompt_param,
            )
        vocab = self.model_config.vocab_size
        for param, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias)):
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise InvalidRequest(f"{param}: token id {bad[0]} is outside the vocabulary [0, {vocab})", param)
        if len(prompt_ids) + params.max_tokens > self.max_len:
            raise InvalidRequest(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
                f"context of {self.max_len} tokens; shorten the prompt or lower max_tokens",
                "max_tokens",
            )


class Engine(RequestFrontend):
    def __init__(self, model_dir: str | Path, config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        self.config.validate()
        cfg = self.config
        self.runner = ModelRunner(Path(model_dir), cfg.device, cfg.dtype, cfg.threads, cfg.kv_cache_dtype)
        super().__init__(model_dir, cfg.max_model_len)
        self.model, self.device = self.runner.model, self.runner.device
        self.kv_cache = plan_kv_cache(
            self.model_config, self.runner.kv_dtype, cfg.max_batch_size, self.max_len, cfg.kv_block_size, cfg.kv_cache_memory,
            cfg.kv_cache_fraction, None if cfg.kv_cache_memory else free_memory(self.device),
        )
        self.runner.allocate_cache(self.kv_cache)
        log.info("%s", self.kv_cache.describe())
        self.blocks = BlockManager(self.kv_cache.num_blocks, cfg.kv_block_size, cfg.prefix_caching)
        self.scheduler = Scheduler(cfg.max_batch_size, cfg.max_prefill_tokens, self.blocks)
        self.output = OutputProcessor(read_stop_token_ids(self.model_dir), self.max_len)
        self.ids = itertools.count()
        self.counters = EngineStats()

    # Callers and tests read the free slots and override the model's stop tokens on the engine.
    @property
    def free_slots(self) -> int:
        return self.scheduler.free_slots

    @property
    def stop_token_ids(self) -> set[int]:
        return self.output.stop_token_ids

    @stop_token_ids.setter
    def stop_token_ids(self, ids: set[int]) -> None:
        self.output.stop_token_ids = ids

    # ---- requests ---------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: SamplingParams, on_output: Callable[[Output], None]) -> Sequence:
        """Queue a request; `on_output` is called (from the stepping thread) after each of its steps."""
        self.check_request(prompt_ids, params)
        seq = Sequence(
            id=next(self.ids),
            prompt_ids=prompt_ids,
            params=params,
            on_output=on_output,
            stream=TextStream(self.tokenizer, params.stop),
            generator=new_generator(params.seed),
        )
        self.scheduler.add(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Mark a request as abandoned; the next step frees its blocks (safe from any thread)."""
        self.scheduler.cancel(seq)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- the step -----------------------------------------------------------------------------

    def step(self) -> None:
        """One round of continuous batching: schedule, forward, sample and stream, retire.

        A step that raises (out of memory, a bad kernel, a bug anywhere in it) first ends every
        request the engine holds with an `error` output, so no consumer waits for a step that will
        not come, then raises again: what it left behind (a CUDA context, the KV cache, a half-fed
        text stream) cannot be trusted, and the caller decides whether to go on (EngineLoop and the
        engine process stop, and the replica is replaced).
        """
        try:
            self.run_step()
        except Exception:
            self.fail_all()
            raise

    def run_step(self) -> None:
        scheduled = self.scheduler.schedule()
        self.counters.requests_cancelled += len(scheduled.cancelled)
        if scheduled.decode or scheduled.prefill:
            self.compute(scheduled.decode, scheduled.prefill)
        self.emit(self.scheduler.running)
        finished = self.scheduler.retire_finished()
        self.counters.requests_finished += len(finished)

    def fail_all(self) -> None:
        """End every running and waiting request with an `error` output; their blocks are free again.

        The output is built here, not by output processing, which may be what failed.
        """
        seqs = self.scheduler.remove_all()
        self.counters.requests_failed += len(seqs)
        for seq in seqs:
            seq.finish_reason = ERROR
            output = Output("", [], [], ERROR, len(seq.prompt_ids), len(seq.output_ids))
            try:
                seq.on_output(output)
            except Exception:  # a consumer that is gone must not keep the others from hearing
                log.exception("telling request %d that it failed did not work", seq.id)

    def compute(self, decode: list[Sequence], prefill: list[tuple[Sequence, int]]) -> None:
        """One forward over the step's tokens, then a token for each sequence whose known tokens are
        all computed (every decode, and each prefill whose last chunk this was)."""
        started = time.perf_counter()
        chunks = [(seq, 1) for seq in decode] + prefill
        scoring = [seq.params.prompt_logprobs is not None and not seq.output_ids and seq.num_computed < len(seq.prompt_ids) for seq, _ in chunks]
        logits, given = self.runner.run(chunks, scoring)
        ready, rows = [], []
        for (seq, n), scores, rows_of_seq in zip(chunks, scoring, given):
            seq.num_computed += n
            self.blocks.register(seq)
            if scores:
                seq.prompt_logits.append(logits[rows_of_seq][: len(seq.prompt_ids) - seq.num_computed + n])
                if seq.num_computed >= len(seq.prompt_ids):
                    self.output.score_prompt(seq, torch.cat(seq.prompt_logits))
                    seq.prompt_logits = []
            if seq.num_computed == seq.length:
                ready.append(seq)
                rows.append(rows_of_seq.stop - 1)
        first = [seq for seq in ready if not seq.output_ids]
        self.output.sample(ready, logits[torch.tensor(rows, device=logits.device, dtype=torch.long)])
        now = time.perf_counter()
        stats = self.counters
        stats.ttft.extend(now - s.arrived for s in first)
        stats.prompt_tokens += sum(len(s.prompt_ids) for s in first)
        stats.generated_tokens += sum(s.params.max_tokens > 0 for s in ready)
        if decode:
            stats.steps += 1
            stats.batch_size_last = len(decode)
            stats.batch_size_max = max(stats.batch_size_max, len(decode))
            stats.batch_size_sum += len(decode)
            stats.decode_seconds += now - started

    def emit(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            output = self.output.emit(seq)
            if output is None:
                continue
            try:
                seq.on_output(output)
            except Exception:  # a consumer that is gone (e.g. its event loop closed) must not stop the engine
                log.exception("delivering output of request %d failed; cancelling it", seq.id)
                self.scheduler.cancel(seq)

    # ---- driving it ----------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[tuple[str, list[int], str]]:
        """Run requests to completion in this thread: [(text, output token ids, finish reason)]."""
        all_params = params if isinstance(params, list) else [params] * len(prompts)
        texts = [[] for _ in prompts]
        reasons: list[str | None] = [None] * len(prompts)
        seqs = []
        for i, (ids, p) in enumerate(zip(prompts, all_params)):

            def collect(out: Output, i: int = i) -> None:
                texts[i].append(out.text)
                reasons[i] = out.finish_reason

            seqs.append(self.submit(ids, p, collect))
        while self.has_work():
            self.step()
        return [("".join(t), s.output_ids, r or "stop") for t, s, r in zip(texts, seqs, reasons)]

    def stats(self) -> dict:
        c = self.counters
        ttft = list(c.ttft)
        return {
            "requests_running": len(self.scheduler.running),
            "requests_waiting": len(self.scheduler.waiting),
            "requests_finished": c.requests_finished,
            "requests_cancelled": c.requests_cancelled,
            "requests_failed": c.requests_failed,
            "free_slots": self.free_slots,
            "max_batch_size": self.config.max_batch_size,
            "kv_blocks_total": self.blocks.num_blocks,
            "kv_blocks_used": self.blocks.num_blocks - self.blocks.num_free,
            "kv_block_size": self.blocks.block_size,
            "prefix_cache_queried_tokens": self.blocks.queried_tokens,
            "prefix_cache_hit_tokens": self.blocks.hit_tokens,
            "prefix_cache_hit_rate": self.blocks.hit_tokens / self.blocks.queried_tokens if self.blocks.queried_tokens else 0.0,
            "preemptions": self.scheduler.preemptions,
            "decode_steps": c.steps,
            "batch_size_last": c.batch_size_last,
            "batch_size_max": c.batch_size_max,
            "batch_size_mean": c.batch_size_sum / c.steps if c.steps else 0.0,
            "prompt_tokens": c.prompt_tokens,
            "generated_tokens": c.generated_tokens,
            "decode_step_seconds_mean": c.decode_seconds / c.steps if c.steps else 0.0,
            "ttft_seconds_p50": percentile(ttft, 0.5),
            "ttft_seconds_p99": percentile(ttft, 0.99),
        }


class EngineFailed(Exception):
    """The engine loop stopped after a failed step; this engine takes no more requests."""


class EngineStreams:
    """asyncio streams of requests over an engine that steps elsewhere: in a thread of this process
    (`EngineLoop`) or in a process of its own (`EngineProcess`, engine_process.py). Each says how
    to queue requests (`submit`), cancel them and read the engine's stats; the streams are written
    once, here. `frontend` encodes and checks requests before they are queued."""

    frontend: RequestFrontend
    failure: Exception | None = None

    def __init__(self) -> None:
        self.open_streams = 0  # streams being iterated, which share the write budget

    def submit(self, requests: list[tuple[list[int], SamplingParams]], on_output: Callable[[int, Output], None]) -> list:
        """Queue the requests together (all or none; EngineFailed once the engine has failed);
        `on_output(i, output)` hears the i-th's outputs. Returns a handle per request."""
        raise NotImplementedError

    def cancel(self, handles: list) -> None:
        """Abandon the requests (safe from any thread); the next step frees their blocks."""
        raise NotImplementedError

    def stats(self) -> dict:
        raise NotImplementedError

    def alive(self) -> bool:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    async def stream(self, requests: list[tuple[list[int], SamplingParams]], min_interval_s: float = 0.0,
                     writes_per_s: float = 0.0) -> AsyncIterator[list[tuple[int, Output]]]:
        """Yield (request index, output) pairs as they come, several at once when the consumer falls
        behind, until every request has finished.

        Batches after the first are spaced: by at least `min_interval_s`, and with `writes_per_s` by
        the open streams' count over it, so that all of these streams together make about that
        many batches a second at most. Each batch is one write through Serve's proxy, whose cost
        is per write, not per token: with few streams each still gets every step's tokens; with
        many, each gets fewer, larger batches, and the CPU the writes would have taken goes to
        decoding. Leaving the iteration early (a client that disconnected) cancels the unfinished
        requests, which frees their cache blocks at the next step.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, Output]] = asyncio.Queue()
        handles = self.submit(requests, lambda i, out: loop.call_soon_threadsafe(queue.put_nowait, (i, out)))
        running = set(range(len(handles)))
        paced = writes_per_s > 0  # only streams that share the budget count against it
        self.open_streams += paced
        try:
            while running:
                batch = [await queue.get()]
                while not queue.empty():
                    batch.append(queue.get_nowait())
                running -= {i for i, out in batch if out.finish_reason is not None}
                yield batch
                interval = max(min_interval_s, self.open_streams / writes_per_s if writes_per_s > 0 else 0.0)
                if running and interval > 0:
                    await asyncio.sleep(interval)
        finally:
            self.open_streams -= paced
            if running:
                self.cancel([handles[i] for i in running])


class EngineLoop(EngineStreams):
    """Runs an Engine's steps in a background thread of this process.

    torch releases the GIL inside its kernels, so the event loop (HTTP, SSE) keeps running while a
    step computes; but the two share the GIL between kernels, which costs the engine a share of its
    speed under load (engine_process.py runs it in a process of its own). The first exception in
    the thread ends it: every request is answered with an `error` output, later ones are refused
    (EngineFailed), and `alive()` turns False.
    """

    def __init__(self, engine: Engine):
        super().__init__()
        self.engine = self.frontend = engine
        self.wakeup = threading.Event()
        self.stopping = False
        # Held while a request is queued and while the loop fails its requests, so every request is
        # either failed by the loop or refused by `submit`, never left waiting for a dead thread.
        self.submit_lock = threading.Lock()
        self.thread = threading.Thread(target=self.run, name="raylm-engine", daemon=True)
        self.thread.start()

    def run(self) -> None:
        try:
            while not self.stopping:
                if not self.engine.has_work():
                    self.wakeup.wait(timeout=0.5)
                    self.wakeup.clear()
                    continue
                self.engine.step()
        except Exception as err:  # a failed step (see Engine.step) or a bug between steps
            log.exception("the engine failed: every request in it failed, and it takes no more (the replica reports unhealthy)")
            with self.submit_lock:
                self.failure = err
                self.engine.fail_all()

    def alive(self) -> bool:
        return self.thread.is_alive()

    def stats(self) -> dict:
        return self.engine.stats()

    def stop(self) -> None:
        self.stopping = True
        self.wakeup.set()
        self.thread.join(timeout=10)

    def submit(self, requests: list[tuple[list[int], SamplingParams]], on_output: Callable[[int, Output], None]) -> list[Sequence]:
        with self.submit_lock:
            if self.failure is not None:
                raise EngineFailed(f"the engine stopped after a failed step ({type(self.failure).__name__}: {self.failure})")
            for prompt_ids, params in requests:
                self.engine.check_request(prompt_ids, params)
            # Queued back to back, a request's choices share their prompt's blocks: the first computes
            # them, the others start from them (the scheduler holds them back until it has).
            seqs = [self.engine.submit(ids, params, lambda out, i=i: on_output(i, out)) for i, (ids, params) in enumerate(requests)]
        self.wakeup.set()
        return seqs

    def cancel(self, handles: list[Sequence]) -> None:
        for seq in handles:
            if seq.finish_reason is None:
                self.engine.cancel(seq)
        self.wakeup.set()
