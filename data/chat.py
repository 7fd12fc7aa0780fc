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


The chat format itself (ChatML, the trained tokens) is `raylm.model.chat`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from raylm.core.errors import UserError
from raylm.model.chat import Message, messages_problem


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
