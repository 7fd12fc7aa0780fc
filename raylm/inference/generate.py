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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="raylm generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model dir (Hugging Face Llama format)")
    parser.add_argument("--prompt", required=True, help="text to continue (or the user message with --chat)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold in (0, 1]")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")
    parser.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    if args.max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.temperature < 0:
        raise UserError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise UserError(f"--top-k must be >= 0, got {args.top_k}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_args(args)
    from raylm.inference.engine import Engine, EngineConfig, InvalidRequest
    from raylm.inference.sampling import SamplingParams

    engine = Engine(args.model, EngineConfig(max_batch_size=1))
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
