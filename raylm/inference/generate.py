"""`raylm generate`: a quick local sample from a model dir, through the serving engine (no Ray).

    raylm generate --model MODEL_DIR --prompt TEXT [--max-tokens N] [--temperature T]
                   [--top-k K] [--top-p P] [--seed S] [--chat]

Temperature 0 is greedy. `--chat` wraps the prompt as one user message in the model's chat
template. `generate_texts` is the same for Python callers (reports, the demo): several prompts,
decoded together in one continuous batch.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from raylm.core import storage
from raylm.core.cli_args import add_config_flags, config_values, parse_command_line
from raylm.core.config import from_dict
from raylm.core.entry import run_main
from raylm.core.errors import UserError


def generate_texts(model_dir, prompts: list[str], max_tokens: int = 64, temperature: float = 0.0, chat: bool = False, seed: int | None = None) -> list[str]:
    """One completion per prompt (greedy by default), stopping at the model's end tokens."""
    from raylm.inference.engine import Engine, EngineConfig, InvalidRequest
    from raylm.inference.sampling import SamplingParams

    if not prompts:
        return []
    engine = Engine(model_dir, EngineConfig(max_batch_size=min(len(prompts), 32)))
    ids = [engine.encode_chat([{"role": "user", "content": p}]) if chat else engine.encode_prompt(p) for p in prompts]
    # Each prompt gets what is left of the context, up to max_tokens.
    params = [SamplingParams(max_tokens=max(1, min(max_tokens, engine.max_len - len(i))), temperature=temperature, seed=seed) for i in ids]
    try:
        return [text for text, _, _ in engine.generate(ids, params)]
    except InvalidRequest as err:
        raise UserError(str(err)) from None


@dataclass
class GenerateArgs:
    model: str  # model dir (Hugging Face Llama format): a path, or an s3://, gs:// URI
    prompt: str  # text to continue (or the user message with --chat)
    max_tokens: int = 64  # tokens to generate at most
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # sample among the k most likely tokens (0 = all)
    top_p: float = 1.0  # nucleus sampling threshold in (0, 1]
    seed: int | None = None  # seed for sampling
    chat: bool = False  # apply the model's chat template to the prompt

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise UserError(f"--max-tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise UserError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"--top-k must be >= 0, got {self.top_k}")


def parse_args(argv: list[str] | None) -> GenerateArgs:
    parser = argparse.ArgumentParser(prog="raylm generate", description=__doc__.split("\n\n")[0])
    add_config_flags(parser, GenerateArgs)
    return from_dict(GenerateArgs, config_values(parse_command_line(parser, argv)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from raylm.inference.engine import Engine, EngineConfig, InvalidRequest
    from raylm.inference.sampling import SamplingParams

    engine = Engine(storage.local_dir(args.model), EngineConfig(max_batch_size=1))  # a URI: copied to a local cache once
    prompt_ids = engine.encode_chat([{"role": "user", "content": args.prompt}]) if args.chat else engine.encode_prompt(args.prompt)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    try:
        [(text, _, _)] = engine.generate([prompt_ids], params)
    except InvalidRequest as err:
        raise UserError(str(err)) from None
    print(text if args.chat else args.prompt + text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
