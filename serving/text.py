"""Text in and out of a model dir's tokenizer: encoding, chat templates, streaming decode, stop strings.

Only the `tokenizers` library and jinja2 are used, so serving needs no `transformers`. The chat
template is rendered the way transformers renders it: a sandboxed Jinja environment with
trim_blocks/lstrip_blocks, `raise_exception`, and the tokenizer's special tokens as variables; the
rendered text is then encoded without adding special tokens (the template writes them).
"""

from __future__ import annotations

import json
from pathlib import Path

from raylm.errors import UserError


def load_tokenizer(model_dir: str | Path):
    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"model dir {str(model_dir)!r} has no tokenizer.json (expected a Hugging Face tokenizer file)")
    return Tokenizer.from_file(str(path))


def read_tokenizer_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "tokenizer_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def special_token_text(config: dict, key: str) -> str:
    token = config.get(key)
    if isinstance(token, dict):  # older HF configs store AddedToken dicts
        token = token.get("content")
    return token or ""


class ChatTemplate:
    """A tokenizer_config.json `chat_template` compiled once; `render(messages)` -> prompt text."""

    def __init__(self, tokenizer_config: dict):
        source = tokenizer_config.get("chat_template")
        if isinstance(source, list):  # some configs hold named templates; "default" is the chat one
            source = {t.get("name"): t.get("template") for t in source}.get("default")
        self.source = source
        self.variables = {
            "bos_token": special_token_text(tokenizer_config, "bos_token"),
            "eos_token": special_token_text(tokenizer_config, "eos_token"),
        }
        self.template = compile_template(source) if source else None

    def render(self, messages: list[dict]) -> str:
        if self.template is None:
            raise UserError("this model's tokenizer_config.json has no chat_template; use /v1/completions instead")
        return self.template.render(messages=messages, add_generation_prompt=True, **self.variables)


def compile_template(source: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise UserError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except TemplateError as err:
        raise UserError(f"tokenizer_config.json chat_template does not compile: {err}") from None


class TextStream:
    """Turns a sequence's generated token ids into text deltas, and finds stop strings in it.

    Decoding a sliding window of recent tokens (not the whole output each step) keeps the cost per
    token constant; a delta is held back while it ends in an incomplete UTF-8 character, and the
    last `len(longest stop) - 1` characters are held back until they cannot start a stop string.
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: decoding from here gives stable text
        self.read_offset = 0  # tokens before this are already in `text`
        self.text = ""
        self.sent = 0  # characters of `text` already handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> None:
        """Append a token; sets `stopped` (and cuts `text` before it) when a stop string appears."""
        self.ids.append(token)
        self.advance(final=False)

    def finish(self) -> None:
        """The output ended: take in the tokens still held back (an incomplete character and all)."""
        if not self.stopped:
            self.advance(final=True)

    def advance(self, final: bool) -> None:
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        if not final and (len(after) <= len(before) or after.endswith("\ufffd")):
            return  # an incomplete character: wait for the next token
        searched_from = max(0, len(self.text) - self.hold)
        self.text += after[len(before) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        found = [i for i in (self.text.find(stop, searched_from) for stop in self.stop) if i != -1]
        if found:
            self.text = self.text[: min(found)]
            self.stopped = True

    def delta(self, final: bool) -> str:
        """Text not handed out yet that is safe to hand out (all of it when `final`)."""
        end = len(self.text) if final or self.stopped else max(self.sent, len(self.text) - self.hold)
        out = self.text[self.sent : end]
        self.sent = end
        return out
