"""Output processing: from a step's logits to what each request's consumer is handed.

Per sequence: choose the next token (`raylm.inference.sampling`), decide whether the sequence is
done (a stop token, a stop string, max_tokens or the context), feed its text stream, and build
the `Output` of the step. No model calls and no queues: the engine hands it logits and sequences.
"""

from __future__ import annotations

import torch

from raylm.inference.sampling import (
    SamplingParams,
    TokenChoice,
    choose_token,
    is_greedy,
    score_prompt,
)
from raylm.inference.sequence import LENGTH, STOP, Output, Sequence


def is_plain_greedy(params: SamplingParams) -> bool:
    return (
        is_greedy(params)
        and params.logprobs is None
        and params.presence_penalty == 0.0
        and params.frequency_penalty == 0.0
        and not params.logit_bias
    )


class OutputProcessor:
    def __init__(self, stop_token_ids: set[int], max_len: int):
        self.stop_token_ids = stop_token_ids  # the model's end tokens (generation_config, tokenizer)
        self.max_len = max_len  # the engine's context: prompt + output stop there

    def sample(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Append one token to each sequence from its row of logits [B, vocab]."""
        greedy = logits.argmax(-1).tolist()  # one batched argmax serves every plain greedy request
        plain = [is_plain_greedy(seq.params) for seq in seqs]
        rows = logits.float().cpu() if not all(plain) else None  # the full logits cross to the CPU only when needed
        for row, seq in enumerate(seqs):
            if seq.params.max_tokens == 0:  # the prompt alone was asked for (echo, scoring)
                seq.finish_reason = LENGTH
                continue
            choice = TokenChoice(greedy[row]) if plain[row] else choose_token(rows[row], seq.counts, seq.params, seq.generator)
            self.append_token(seq, choice)

    def score_prompt(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Keep the prompt's scores for the sequence's first output, from its prefill's logits [T, vocab]."""
        seq.prompt_choices = score_prompt(logits, seq.prompt_ids, seq.params.prompt_logprobs)

    def append_token(self, seq: Sequence, choice: TokenChoice) -> None:
        seq.output_ids.append(choice.token)
        seq.counts[choice.token] += 1
        if seq.params.logprobs is not None:
            seq.new_choices.append(choice)
        if choice.token in seq.params.stop_token_ids or (not seq.params.ignore_eos and choice.token in self.stop_token_ids):
            seq.finish_reason = STOP  # the stop token is in the output's ids, never in its text
            return
        seq.stream.add(choice.token)
        if seq.stream.stopped:
            seq.finish_reason = STOP
        elif len(seq.output_ids) >= seq.params.max_tokens or seq.length >= self.max_len:
            seq.finish_reason = LENGTH

    def emit(self, seq: Sequence) -> Output | None:
        """What `seq` has not handed out yet; None when there is nothing new and it still runs."""
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
            prompt_logprobs=seq.prompt_choices,
        )
        seq.new_choices, seq.emitted_tokens, seq.prompt_choices = [], len(seq.output_ids), None
        return output if output.text or output.token_ids or output.prompt_logprobs is not None or finished else None
