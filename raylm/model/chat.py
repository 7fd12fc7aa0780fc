"""The chat format (ChatML) and the one tokenizer loader, shared by every stage.

ChatML, per message: `<|im_start|>{role}\\n{content}<|im_end|>\\n`; a prompt for the model's answer
ends with `<|im_start|>assistant\\n`. The same format is written three ways, kept equal by tests:
- `CHAT_TEMPLATE`, the Jinja template stored in tokenizer_config.json, which `transformers`,
  vLLM and our serving render;
- `render_chat`, the same text in Python, which training encodes;
- `trained_spans`, the characters of that text a chat model is trained on: every assistant
  message's content and its closing `<|im_end|>` (the model learns to stop). The template marks
  the same part with `{% generation %}` so `transformers`' assistant-token mask agrees.

A tokenizer is a `tokenizers.Tokenizer` read from `tokenizer.json` (a file, or a dir holding
one); serving needs no `transformers`. A chat template is rendered the way transformers renders
it: a sandboxed Jinja environment with trim_blocks/lstrip_blocks, `raise_exception`, and the
tokenizer's special tokens as variables.
"""

from __future__ import annotations

import json
from pathlib import Path

from raylm.core.errors import UserError

ENDOFTEXT = "<|endoftext|>"  # document separator; also bos and eos
PAD = "<|pad|>"
IM_START = "<|im_start|>"  # opens a message, followed by its role and a newline
IM_END = "<|im_end|>"  # closes a message; what a chat model emits when it is done
SPECIAL_TOKENS = (ENDOFTEXT, PAD, IM_START, IM_END)
SPECIAL_TOKEN_NAMES = {"endoftext": ENDOFTEXT, "pad": PAD, "im_start": IM_START, "im_end": IM_END}
ROLES = ("system", "user", "assistant")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

Message = dict[str, str]


# ---- the format ----------------------------------------------------------------------------------


def render_chat(messages: list[Message], add_generation_prompt: bool = False) -> str:
    """The ChatML text of `messages`, as CHAT_TEMPLATE renders it."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def trained_spans(messages: list[Message]) -> list[tuple[int, int]]:
    """Character spans of `render_chat(messages)` that are trained: assistant content + its <|im_end|>."""
    spans = []
    position = 0
    for message in messages:
        start = position + len(f"{IM_START}{message['role']}\n")
        end = start + len(message["content"]) + len(IM_END)
        if message["role"] == "assistant":
            spans.append((start, end))
        position = end + 1  # the newline after <|im_end|>
    return spans


def messages_problem(messages) -> str | None:
    """Why `messages` is not a usable conversation (a skip reason), or None when it is."""
    if not isinstance(messages, list) or not messages:
        return "no_messages"
    for message in messages:
        if not isinstance(message, dict):
            return "bad_message"
        if message.get("role") not in ROLES:
            return "bad_role"
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            return "empty_content"
        if any(token in content for token in SPECIAL_TOKENS):
            return "special_token_in_content"  # it would forge message boundaries
    if not any(message["role"] == "assistant" for message in messages):
        return "no_assistant_turn"
    return None


def encode_chat(tokenizer, messages: list[Message]) -> tuple[list[int], list[bool]]:
    """(ids, loss_mask) of a conversation: the template's ids, True on the trained tokens.

    A token that straddles a header and the content (a content that starts with blank lines can
    merge with the header's newline) counts as header.
    """
    reason = messages_problem(messages)
    if reason is not None:
        raise UserError(f"chat record is not valid ({reason}): {json.dumps(messages)[:200]}")
    encoding = tokenizer.encode(render_chat(messages), add_special_tokens=False)
    spans = trained_spans(messages)
    mask = [any(lo <= start and end <= hi for lo, hi in spans) for start, end in encoding.offsets]
    return list(encoding.ids), mask


# ---- tokenizers ----------------------------------------------------------------------------------


def load_tokenizer(path: str | Path):
    """A `tokenizers.Tokenizer` from a tokenizer.json file, or from a dir holding one (a model or tokenizer dir)."""
    from tokenizers import Tokenizer

    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{str(path)!r} has no tokenizer.json (expected a Hugging Face tokenizer file or a dir that holds one)")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises a plain Exception for a malformed file
        raise UserError(f"{str(file)!r} is not a valid tokenizers JSON file: {err}") from None


def read_tokenizer_config(tokenizer_dir: str | Path) -> dict:
    """tokenizer_config.json of a dir, or {} when it has none."""
    path = Path(tokenizer_dir) / "tokenizer_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def special_token_text(config: dict, key: str) -> str | None:
    """The text of a special token named in tokenizer_config.json (`bos_token`, ...), or None."""
    token = config.get(key)
    if isinstance(token, dict):  # older HF configs store AddedToken dicts
        token = token.get("content")
    return token or None


def special_token_ids(tokenizer_dir: str | Path) -> dict:
    """bos / eos / pad ids of a tokenizer dir, plus `stop`: every id that ends a generation.

    The chat end marker also stops generation, so a chat model ends its turn.
    """
    tokenizer = load_tokenizer(tokenizer_dir)
    config = read_tokenizer_config(tokenizer_dir)

    def token_id(key: str) -> int | None:
        text = special_token_text(config, key)
        return tokenizer.token_to_id(text) if text is not None else None

    ids: dict = {"bos": token_id("bos_token"), "eos": token_id("eos_token"), "pad": token_id("pad_token")}
    ids["stop"] = sorted({i for i in (ids["eos"], tokenizer.token_to_id(IM_END)) if i is not None})
    return ids


def check_chatml(tokenizer_dir: str | Path, tokenizer) -> None:
    """Refuse a tokenizer that cannot speak ChatML, or whose chat template renders another format.

    Serving renders the model dir's own `chat_template`; if that differed from `render_chat`, a
    model fine-tuned here would be prompted at serve time in a format it never saw.
    """
    for token in (IM_START, IM_END):
        if tokenizer.token_to_id(token) is None:
            raise UserError(
                f"{tokenizer_dir}: no {token!r} token; raylm fine-tunes with the ChatML template, so the "
                f"tokenizer needs {IM_START} and {IM_END} special tokens"
            )
    template = ChatTemplate(read_tokenizer_config(tokenizer_dir))
    if template.source is None:
        raise UserError(f"{tokenizer_dir}: tokenizer_config.json has no chat_template; fine-tuning needs the ChatML template the model will be served with")
    probe = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    served = template.render(probe)
    trained = render_chat(probe, add_generation_prompt=True)
    if served != trained:
        raise UserError(
            f"{tokenizer_dir}: its chat_template renders {served[:80]!r}, not the ChatML form raylm trains on "
            f"({trained[:80]!r}); fine-tune only bases with a ChatML chat template"
        )


# ---- chat templates ------------------------------------------------------------------------------


class ChatTemplate:
    """A tokenizer_config.json `chat_template` compiled once; `render(messages)` -> prompt text."""

    def __init__(self, tokenizer_config: dict):
        source = tokenizer_config.get("chat_template")
        if isinstance(source, list):  # some configs hold named templates; "default" is the chat one
            source = {t.get("name"): t.get("template") for t in source}.get("default")
        self.source = source
        self.variables = {
            "bos_token": special_token_text(tokenizer_config, "bos_token") or "",
            "eos_token": special_token_text(tokenizer_config, "eos_token") or "",
        }
        self.template = compile_template(source) if source else None

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self.template is None:
            raise UserError("this model's tokenizer_config.json has no chat_template; use /v1/completions instead")
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.variables)


def compile_template(source: str):
    from jinja2 import TemplateError, nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationMarks(Extension):
        """`{% generation %}…{% endgeneration %}` (transformers' assistant-mask marks) renders its body as is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    def raise_exception(message: str):
        raise UserError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationMarks])
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except TemplateError as err:
        raise UserError(f"tokenizer_config.json chat_template does not compile: {err}") from None
