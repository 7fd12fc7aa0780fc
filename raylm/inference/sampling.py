"""Choosing the next token of one sequence from the model's logits.

Order, as in OpenAI's and vLLM's samplers: logit bias and presence/frequency penalties on the raw logits, then
temperature (0, or below GREEDY_BELOW, = greedy argmax), then top-k, then top-p (nucleus), then a draw from the request's
own seeded generator, so a seeded request gives the same tokens whatever it is batched with.
Logprobs are reported from the model's raw distribution (log-softmax of the logits before any
processing), like OpenAI's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 16  # tokens to generate at most
    temperature: float = 1.0  # 0 (or below GREEDY_BELOW) = greedy; higher flattens the distribution
    top_k: int = 0  # keep the k most likely tokens (0 = all)
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    seed: int | None = None  # seeds this request's generator (None = random)
    stop: list[str] = field(default_factory=list)  # strings that end the output (not included in it)
    stop_token_ids: list[int] = field(default_factory=list)  # extra token ids that end the output
    ignore_eos: bool = False  # keep going past the model's end-of-sequence tokens (benchmarks)
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence of a token already generated
    logprobs: int | None = None  # report the chosen token's logprob and this many alternatives
    prompt_logprobs: int | None = None  # also score every prompt token after the first, with this many alternatives


# Below this, dividing fp32 logits by the temperature overflows to inf (and the draw to NaN), and
# sampling is greedy in all but name anyway: vLLM draws the same line.
GREEDY_BELOW = 1e-5


def is_greedy(params: SamplingParams) -> bool:
    return params.temperature < GREEDY_BELOW


@dataclass
class TokenChoice:
    token: int
    logprob: float | None = None  # of the chosen token, when logprobs were asked for
    top: list[tuple[int, float]] | None = None  # the most likely alternatives (id, logprob)


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of a request's `index`-th choice (`n` > 1): choice 0 keeps the request's seed, so
    `n: 1` samples as before, and the others get seeds far apart in torch's 64-bit seed space."""
    if seed is None or index == 0:
        return seed
    return (seed + index * 0x9E3779B97F4A7C15) % 2**64  # the golden-ratio increment (splitmix64's)


def new_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def apply_logit_bias(logits: torch.Tensor, bias: dict[int, float]) -> torch.Tensor:
    if not bias:
        return logits
    logits = logits.clone()
    logits[torch.tensor(list(bias), dtype=torch.long)] += torch.tensor(list(bias.values()), dtype=logits.dtype)
    return logits


def apply_penalties(logits: torch.Tensor, counts: dict[int, int], params: SamplingParams) -> torch.Tensor:
    if not counts or (params.presence_penalty == 0.0 and params.frequency_penalty == 0.0):
        return logits
    ids = torch.tensor(list(counts), dtype=torch.long)
    times = torch.tensor(list(counts.values()), dtype=logits.dtype)
    logits = logits.clone()
    logits[ids] -= params.presence_penalty + params.frequency_penalty * times
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits with every token outside the top-k / nucleus set to -inf."""
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p; the most likely always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop_sorted[0] = False  # also when top_p is so small that it rounds to 0 in the logits' dtype
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def choose_token(logits: torch.Tensor, counts: dict[int, int], params: SamplingParams, generator: torch.Generator) -> TokenChoice:
    """The next token from one row of fp32 logits [vocab] on the CPU."""
    processed = apply_penalties(apply_logit_bias(logits, params.logit_bias), counts, params)
    if is_greedy(params):
        token = int(torch.argmax(processed))
    else:
        processed = filter_top_k_top_p(processed / params.temperature, params.top_k, params.top_p)
        token = int(torch.multinomial(processed.softmax(-1), 1, generator=generator))
    if params.logprobs is None:
        return TokenChoice(token)
    logprobs = logits.log_softmax(-1)
    top = torch.topk(logprobs, min(params.logprobs, logprobs.numel())) if params.logprobs > 0 else None
    alternatives = [(int(i), float(v)) for v, i in zip(top.values, top.indices)] if top is not None else []
    return TokenChoice(token, float(logprobs[token]), alternatives)


def score_prompt(logits: torch.Tensor, prompt_ids: list[int], top_n: int) -> list[TokenChoice]:
    """Each prompt token after the first, scored from the logits [len(prompt_ids), vocab] at the
    positions before it: its logprob and the `top_n` most likely tokens there (id, logprob), both
    taken from one log-softmax, so a token that was the most likely has exactly the top logprob."""
    logprobs = logits[: len(prompt_ids) - 1].float().log_softmax(-1)  # [L-1, vocab]
    targets = torch.tensor(prompt_ids[1:], device=logprobs.device)
    chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
    if top_n > 0:
        top = torch.topk(logprobs, min(top_n, logprobs.shape[-1]))
        tops = [list(zip(ids, values)) for ids, values in zip(top.indices.tolist(), top.values.tolist())]
    else:
        tops = [[] for _ in chosen]
    return [TokenChoice(token, logprob, alternatives) for token, logprob, alternatives in zip(prompt_ids[1:], chosen, tops)]
