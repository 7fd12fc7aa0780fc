"""Chat records for fine-tuning: read them from JSONL, and encode them with a loss mask.

The file rule (`read_chat_jsonl`): one JSON object per line, either
    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
or  {"prompt": "...", "response": "..."[, "system": "..."]}   (-> [system,] user, assistant).
Blank lines are ignored. A bad record is skipped and counted under the first reason that applies,
with its line number:
    not_json                  the line is not valid JSON
    not_an_object             the line is JSON but not an object
    no_messages               neither a `messages` list nor `prompt` + `response` strings
    bad_message               a message that is not an object
    bad_role                  a role missing or not system/user/assistant
    empty_content             content missing, not a string, or only whitespace
    special_token_in_content  content holding a ChatML marker (<|im_start|>, ...), which would
                              forge message boundaries
    no_assistant_turn         nothing to train on
A file where no record survives is refused (UserError).

The encoding (`encode_chat`) renders ChatML exactly as the tokenizer's chat template does,
`<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, and marks as trained (loss_mask true)
the tokens of every assistant message's content and its closing `<|im_end|>` (the model learns
to stop); the role headers, system and user turns and the newline after `<|im_end|>` are not
trained. A token that straddles a header and the content (a content that starts with blank
lines can merge with the header's newline) counts as header.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from tokenizers import Tokenizer

from data.tokenizer import IM_END, IM_START, SPECIAL_TOKENS
from raylm.errors import UserError

ROLES = ("system", "user", "assistant")
Message = dict[str, str]


def render_chat(messages: list[Message], add_generation_prompt: bool = False) -> str:
    """The ChatML text of `messages`, as the chat template renders it."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def trained_spans(messages: list[Message]) -> list[tuple[int, int]]:
    """Character spans of the rendered chat that are trained: assistant content + its <|im_end|>."""
    spans = []
    position = 0
    for message in messages:
        header = f"{IM_START}{message['role']}\n"
        start = position + len(header)
        end = start + len(message["content"]) + len(IM_END)
        if message["role"] == "assistant":
            spans.append((start, end))
        position = end + 1  # the newline after <|im_end|>
    return spans


def encode_chat(tokenizer: Tokenizer, messages: list[Message]) -> tuple[list[int], list[bool]]:
    """(ids, loss_mask) of a conversation; ids equal the chat template's, mask as in the module doc."""
    check_messages(messages)
    encoding = tokenizer.encode(render_chat(messages), add_special_tokens=False)
    spans = trained_spans(messages)
    mask = []
    for start, end in encoding.offsets:
        mask.append(any(span_start <= start and end <= span_end for span_start, span_end in spans))
    return list(encoding.ids), mask


def check_messages(messages: list[Message]) -> None:
    reason = messages_problem(messages)
    if reason is not None:
        raise UserError(f"chat record is not valid ({reason}): {json.dumps(messages)[:200]}")


def messages_problem(messages) -> str | None:
    """The skip reason for a messages list, or None when it is a usable conversation."""
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
            return "special_token_in_content"
    if not any(message["role"] == "assistant" for message in messages):
        return "no_assistant_turn"
    return None


def record_messages(record) -> tuple[list[Message] | None, str | None]:
    """A JSON record -> (messages, None) or (None, skip reason)."""
    if not isinstance(record, dict):
        return None, "not_an_object"
    if "messages" in record:
        messages = record["messages"]
    elif isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
        messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
        if isinstance(record.get("system"), str):
            messages.insert(0, {"role": "system", "content": record["system"]})
    else:
        return None, "no_messages"
    reason = messages_problem(messages)
    if reason is not None:
        return None, reason
    return [{"role": m["role"], "content": m["content"]} for m in messages], None


def read_chat_jsonl(path: str | Path) -> tuple[list[list[Message]], dict[str, list[int]]]:
    """(conversations, {skip reason: [line numbers]}) of a chat JSONL file, by the module's rule."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"chat file {str(path)!r} does not exist (make one with `raylm prepare-chat --source stdlib --out FILE.jsonl`)")
    records: list[list[Message]] = []
    skipped: dict[str, list[int]] = defaultdict(list)
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                skipped["not_json"].append(line_no)
                continue
            messages, reason = record_messages(record)
            if reason is not None:
                skipped[reason].append(line_no)
            else:
                records.append(messages)
    if not records:
        counts = {reason: len(lines) for reason, lines in skipped.items()} or "the file is empty"
        raise UserError(
            f"chat file {str(path)!r} has no usable record (skipped: {counts}); expected JSON lines like "
            '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'
        )
    return records, dict(skipped)
