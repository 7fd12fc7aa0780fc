"""One request's state as it moves through the engine (`Sequence`), what its consumer is handed
after each step (`Output`), and the reasons a sequence ends.

Plain data: the scheduler and block manager, the model runner and output processing each read and
write their own fields of a `Sequence`; none of them holds per-request state of its own.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from raylm.inference.sampling import SamplingParams, TokenChoice

if TYPE_CHECKING:
    import torch

    from raylm.inference.detokenize import TextStream

# Why a sequence ended; None while it runs. "stop" and "length" are OpenAI's finish reasons.
STOP = "stop"  # a stop token or stop string
LENGTH = "length"  # max_tokens or the model's context reached
CANCELLED = "cancelled"  # its consumer went away; it gets no further output
ERROR = "error"  # the step computing it failed


@dataclass
class Output:
    """What a request gets after a step: new text and tokens, and why it ended once it has."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenChoice]
    finish_reason: str | None  # None while running; else one of the reasons above
    prompt_tokens: int
    completion_tokens: int
    prompt_logprobs: list[TokenChoice] | None = None  # the prompt's scores (`prompt_logprobs`), with the first output


@dataclass(eq=False)  # a request is itself: identity, not field-by-field equality
class Sequence:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    on_output: Callable[[Output], None]  # called from the stepping thread
    stream: TextStream  # its generated text, incrementally detokenized
    generator: torch.Generator  # its own, so a seeded request samples the same whatever its batch
    arrived: float = field(default_factory=time.perf_counter)
    block_table: list[int] = field(default_factory=list)  # its KV cache blocks, in token order, while it runs
    block_hashes: list[bytes] = field(default_factory=list)  # the prefix hashes of its registered full blocks
    num_computed: int = 0  # leading tokens whose keys and values are in its blocks
    prompt_logits: list = field(default_factory=list)  # a scored prompt's logits, chunk by chunk, until it is all computed
    output_ids: list[int] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)  # generated token -> times, for penalties
    new_choices: list[TokenChoice] = field(default_factory=list)  # logprobs not handed out yet
    prompt_choices: list[TokenChoice] | None = None  # the prompt's scores, until handed out
    emitted_tokens: int = 0  # output tokens already handed out
    finish_reason: str | None = None
    cancelled: bool = False  # set from any thread; the scheduler retires it at the next step

    def __post_init__(self) -> None:
        self.prompt_key = tuple(self.prompt_ids)  # a request's n choices share it, and with it their prompt's blocks

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def planned_length(self) -> int:
        """The most tokens it can reach: where its blocks are placed, room is left for them."""
        return len(self.prompt_ids) + self.params.max_tokens

    def tokens(self, start: int, end: int) -> list[int]:
        """Its tokens start..end-1, prompt then output."""
        prompt = len(self.prompt_ids)
        if end <= prompt:
            return self.prompt_ids[start:end]
        if start >= prompt:
            return self.output_ids[start - prompt : end - prompt]
        return self.prompt_ids[start:] + self.output_ids[: end - prompt]
