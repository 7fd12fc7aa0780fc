"""The generation engine: one model, one KV cache, continuous batching.

Every `step()`:
1. retires cancelled sequences (their cache slot is free again at once);
2. admits waiting requests into free cache slots and prefills them together in one forward
   (prompts right-padded: padding writes cache positions past a prompt's end, which that
   sequence's later decode steps overwrite before they can attend to them), sampling each one's
   first token;
3. decodes every running sequence in one batched forward (one token each, each at its own
   position and slot) and samples per request;
4. streams each sequence's new text to its consumer and retires the finished ones.

So a request that arrives mid-generation joins at the next step instead of waiting for a batch to
drain. `Engine` itself is synchronous (the `generate` CLI drives it directly); `EngineLoop` runs it
in a thread and hands out asyncio streams (the Serve replica).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable

import torch

from raylm.core.errors import UserError
from raylm.inference.detokenize import TextStream
from raylm.inference.sampling import (
    SamplingParams,
    TokenChoice,
    choose_token,
    new_generator,
)
from raylm.model.chat import (
    ChatTemplate,
    load_tokenizer,
    read_tokenizer_config,
    special_token_ids,
)
from raylm.model.model_dir import load_model_dir
from raylm.model.transformer import KVCache

log = logging.getLogger(__name__)


class InvalidRequest(UserError):
    """A request the engine cannot run; `param` names the offending field (OpenAI's error shape)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class EngineConfig:
    max_batch_size: int = 32  # sequences decoded together (KV cache slots)
    max_model_len: int = 0  # longest prompt + output; 0 = the model's max_position_embeddings
    max_prefill_tokens: int = 4096  # padded prompt tokens prefilled in one step (bounds decode stalls)
    device: str = "auto"  # "cpu", "cuda", "cuda:1", ...; auto = cuda when available
    dtype: str = "auto"  # float32 | bfloat16 | float16; auto = bfloat16 on CUDA, float32 on CPU
    threads: int = 0  # torch CPU threads for this engine (0 = torch's default)

    def validate(self) -> None:
        if self.max_batch_size < 1:
            raise UserError(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        if self.max_model_len < 0:
            raise UserError(f"max_model_len must be 0 (the model's) or positive, got {self.max_model_len}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise UserError(f"dtype {self.dtype!r}: expected auto, float32, bfloat16 or float16")


@dataclass
class Output:
    """What a request gets after a step: new text and tokens, and why it ended once it has."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenChoice]
    finish_reason: str | None  # None while running; "stop", "length", "cancelled" or "error"
    prompt_tokens: int
    completion_tokens: int


@dataclass(eq=False)  # a request is itself: identity, not field-by-field equality
class Sequence:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    on_output: Callable[[Output], None]
    stream: TextStream
    generator: torch.Generator
    arrived: float
    slot: int = -1
    output_ids: list[int] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)  # generated token -> times, for penalties
    new_choices: list[TokenChoice] = field(default_factory=list)  # logprobs not handed out yet
    emitted_tokens: int = 0  # output tokens already handed out
    finish_reason: str | None = None
    cancelled: bool = False

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


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
    decode_seconds: float = 0.0  # time in decode forwards + sampling
    ttft: deque = field(default_factory=lambda: deque(maxlen=1000))  # recent times to first token (s)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def read_stop_token_ids(model_dir: Path) -> set[int]:
    """Ids that end a generation: generation_config.json's eos ids and the tokenizer's end markers."""
    ids = set(special_token_ids(model_dir)["stop"])
    path = model_dir / "generation_config.json"
    if path.is_file():
        eos = json.loads(path.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids


def is_plain_greedy(params: SamplingParams) -> bool:
    return params.temperature == 0.0 and params.logprobs is None and params.presence_penalty == 0.0 and params.frequency_penalty == 0.0


def percentile(values, q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Engine:
    def __init__(self, model_dir: str | Path, config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        self.config.validate()
        self.model_dir = Path(model_dir)
        if self.config.threads > 0:
            torch.set_num_threads(self.config.threads)
        self.device = pick_device(self.config.device)
        self.dtype = pick_dtype(self.config.dtype, self.device)
        self.model, self.model_config = load_model_dir(self.model_dir, self.device, self.dtype)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.chat_template = ChatTemplate(read_tokenizer_config(self.model_dir))
        self.stop_token_ids = read_stop_token_ids(self.model_dir)
        self.max_len = min(self.config.max_model_len or self.model_config.max_seq_len, self.model_config.max_seq_len)
        self.cache = KVCache(self.model_config, self.config.max_batch_size, self.max_len, self.device, self.dtype)
        self.free_slots = list(range(self.config.max_batch_size - 1, -1, -1))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.lock = threading.Lock()  # guards `waiting` against submitters on other threads
        self.ids = itertools.count()
        self.counters = EngineStats()

    # ---- requests ---------------------------------------------------------------------------

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

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise InvalidRequest("prompt is empty: it must hold at least one token", "prompt")
        if len(prompt_ids) + params.max_tokens > self.max_len:
            raise InvalidRequest(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
                f"context of {self.max_len} tokens; shorten the prompt or lower max_tokens",
                "max_tokens",
            )

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
            arrived=time.perf_counter(),
        )
        with self.lock:
            self.waiting.append(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Mark a request as abandoned; the next step frees its slot (safe from any thread)."""
        seq.cancelled = True

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # ---- the step -----------------------------------------------------------------------------

    def step(self) -> None:
        self.retire_cancelled()
        admitted = self.admit()
        try:
            if admitted:
                self.prefill(admitted)
            decoding = [s for s in self.running if s.finish_reason is None and s not in admitted]
            if decoding:
                self.decode(decoding)
        except Exception:
            log.exception("engine step failed; failing its %d sequences", len(self.running))
            for seq in self.running:
                seq.finish_reason = seq.finish_reason or "error"
            self.counters.requests_failed += sum(1 for s in self.running if s.finish_reason == "error")
        self.emit_and_retire()

    def retire_cancelled(self) -> None:
        with self.lock:
            gone = [s for s in self.waiting if s.cancelled]
            for seq in gone:
                self.waiting.remove(seq)
        gone += [s for s in self.running if s.cancelled]
        for seq in gone:
            self.release(seq)
            self.counters.requests_cancelled += 1

    def admit(self) -> list[Sequence]:
        admitted: list[Sequence] = []
        with self.lock:
            while self.waiting and self.free_slots:
                longest = max([len(s.prompt_ids) for s in admitted] + [len(self.waiting[0].prompt_ids)])
                if admitted and longest * (len(admitted) + 1) > self.config.max_prefill_tokens:
                    break
                seq = self.waiting.popleft()
                seq.slot = self.free_slots.pop()
                admitted.append(seq)
        self.running.extend(admitted)
        return admitted

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> None:
        longest = max(len(s.prompt_ids) for s in seqs)
        tokens = torch.zeros(len(seqs), longest, dtype=torch.long)
        for row, seq in enumerate(seqs):
            tokens[row, : len(seq.prompt_ids)] = torch.tensor(seq.prompt_ids)
        positions = torch.arange(longest).expand(len(seqs), longest)
        last = torch.tensor([len(s.prompt_ids) - 1 for s in seqs])
        logits = self.forward(tokens, positions, seqs)
        logits = logits[torch.arange(len(seqs)), last.to(logits.device)]
        self.sample(seqs, logits)
        now = time.perf_counter()
        for seq in seqs:
            self.counters.ttft.append(now - seq.arrived)
            self.counters.prompt_tokens += len(seq.prompt_ids)

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> None:
        started = time.perf_counter()
        tokens = torch.tensor([[s.output_ids[-1]] for s in seqs])
        positions = torch.tensor([[s.length - 1] for s in seqs])
        logits = self.forward(tokens, positions, seqs)[:, -1]
        self.sample(seqs, logits)
        stats = self.counters
        stats.steps += 1
        stats.batch_size_last = len(seqs)
        stats.batch_size_max = max(stats.batch_size_max, len(seqs))
        stats.batch_size_sum += len(seqs)
        stats.decode_seconds += time.perf_counter() - started

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        slots = torch.tensor([s.slot for s in seqs], device=self.device)
        positions = positions.to(self.device)
        self.cache.bind(slots, positions)
        return self.model(tokens.to(self.device), positions=positions, cache=self.cache)

    def sample(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        greedy = logits.argmax(-1).tolist()  # one batched argmax serves every plain greedy request
        plain = [is_plain_greedy(seq.params) for seq in seqs]
        rows = logits.float().cpu() if not all(plain) else None  # the full logits cross to the CPU only when needed
        for row, seq in enumerate(seqs):
            choice = TokenChoice(greedy[row]) if plain[row] else choose_token(rows[row], seq.counts, seq.params, seq.generator)
            self.append_token(seq, choice)

    def append_token(self, seq: Sequence, choice: TokenChoice) -> None:
        seq.output_ids.append(choice.token)
        seq.counts[choice.token] += 1
        if seq.params.logprobs is not None:
            seq.new_choices.append(choice)
        self.counters.generated_tokens += 1
        stops = set(seq.params.stop_token_ids) | (set() if seq.params.ignore_eos else self.stop_token_ids)
        if choice.token in stops:
            seq.finish_reason = "stop"
            return
        seq.stream.add(choice.token)
        if seq.stream.stopped:
            seq.finish_reason = "stop"
        elif len(seq.output_ids) >= seq.params.max_tokens or seq.length >= self.max_len:
            seq.finish_reason = "length"

    def emit_and_retire(self) -> None:
        still_running = []
        for seq in self.running:
            finished = seq.finish_reason is not None
            if finished:
                seq.stream.finish()
            output = Output(
                text=seq.stream.delta(final=finished),
                token_ids=seq.output_ids[seq.emitted_tokens :],
                logprobs=seq.new_choices,
                finish_reason=seq.finish_reason,
                prompt_tokens=len(seq.prompt_ids),
                completion_tokens=len(seq.output_ids),
            )
            seq.new_choices, seq.emitted_tokens = [], len(seq.output_ids)
            if finished:
                self.release(seq, keep_in_running=True)
                if seq.finish_reason != "error":
                    self.counters.requests_finished += 1
            else:
                still_running.append(seq)
            if output.text or output.token_ids or finished:
                try:
                    seq.on_output(output)
                except Exception:  # a consumer that is gone (e.g. its event loop closed) must not stop the engine
                    log.exception("delivering output of request %d failed; cancelling it", seq.id)
                    seq.cancelled = True
        self.running = still_running

    def release(self, seq: Sequence, keep_in_running: bool = False) -> None:
        if seq.slot >= 0:
            self.free_slots.append(seq.slot)
            seq.slot = -1
        if not keep_in_running and seq in self.running:
            self.running.remove(seq)

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
            "requests_running": len(self.running),
            "requests_waiting": len(self.waiting),
            "requests_finished": c.requests_finished,
            "requests_cancelled": c.requests_cancelled,
            "requests_failed": c.requests_failed,
            "free_slots": len(self.free_slots),
            "max_batch_size": self.config.max_batch_size,
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


class EngineLoop:
    """Runs an Engine's steps in a background thread; asyncio code streams requests through it.

    torch releases the GIL inside its kernels, so the event loop (HTTP, SSE) keeps running while a
    step computes.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self.wakeup = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self.run, name="raylm-engine", daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stopping:
            if not self.engine.has_work():
                self.wakeup.wait(timeout=0.5)
                self.wakeup.clear()
                continue
            self.engine.step()

    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self) -> None:
        self.stopping = True
        self.wakeup.set()
        self.thread.join(timeout=10)

    async def stream(self, prompt_ids: list[int], params: SamplingParams, min_interval_s: float = 0.0) -> AsyncIterator[list[Output]]:
        """Yield the request's outputs as they come, several at once when the consumer falls behind.

        With `min_interval_s`, batches after the first are at least that far apart: fewer, larger
        writes when many streams share a replica (each write is a message through Serve's proxy).
        Leaving the iteration early (a client that disconnected) cancels the request, which frees
        its cache slot at the next step.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Output] = asyncio.Queue()
        seq = self.engine.submit(prompt_ids, params, lambda out: loop.call_soon_threadsafe(queue.put_nowait, out))
        self.wakeup.set()
        try:
            while True:
                batch = [await queue.get()]
                while not queue.empty():
                    batch.append(queue.get_nowait())
                yield batch
                if batch[-1].finish_reason is not None:
                    return
                if min_interval_s > 0:
                    await asyncio.sleep(min_interval_s)
        finally:
            if seq.finish_reason is None:
                self.engine.cancel(seq)
                self.wakeup.set()
