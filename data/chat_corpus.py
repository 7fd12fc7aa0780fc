"""The embedded chat set, built offline (`raylm prepare-chat --source stdlib`, data/chat_dataset.py).

Question/answer conversations taken from the running interpreter's standard library:
- "What does `json.dumps` do?" -> the first paragraph of its docstring (public functions,
  classes and the methods of public classes, read with `ast` so nothing is imported or run);
- "What is the `json` module for?" -> the first paragraph of the module docstring;
- "Explain <pydoc topic title>." -> the topic's opening paragraph (`pydoc_data.topics`).
About a quarter of the conversations carry one of a few system prompts, and some modules' first
two questions form one two-turn conversation (every assistant turn is trained). Test packages,
idlelib, lib2to3, turtledemo, ensurepip and private modules are left out. The order is a fixed
shuffle (by a hash of the first question), so `--max-records N` is a mixed sample; the output is
the same for the same interpreter, and written atomically.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
from pathlib import Path

from raylm.core.files import write_atomic
from raylm.data.sources import stdlib_files
from raylm.model.chat import messages_problem

EXCLUDED_PACKAGES = {"test", "tests", "idle_test", "idlelib", "lib2to3", "turtledemo", "ensurepip", "site-packages", "pydoc_data"}
SYSTEM_PROMPTS = (
    "You are a helpful assistant who explains the Python standard library.",
    "You are a concise Python documentation assistant. Answer in one paragraph.",
    "Answer questions about Python accurately and briefly.",
)
FUNCTION_QUESTIONS = ("What does `{name}` do?", "Explain `{name}`.", "What is `{name}` used for?")
CLASS_QUESTIONS = ("What is `{name}`?", "What is the `{name}` class for?", "Describe `{name}`.")
MODULE_QUESTIONS = ("What is the `{name}` module for?", "What does the `{name}` module provide?")
MIN_ANSWER_CHARS = 40
MAX_ANSWER_CHARS = 700


def stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def pick(options: tuple[str, ...], key: str) -> str:
    return options[stable_hash(key) % len(options)]


def first_paragraph(docstring: str | None) -> str | None:
    """The docstring's first paragraph on one line, or None when it makes a poor answer."""
    if not docstring:
        return None
    paragraph = inspect.cleandoc(docstring).split("\n\n", 1)[0]
    text = " ".join(paragraph.split())
    if not MIN_ANSWER_CHARS <= len(text) <= MAX_ANSWER_CHARS or text.startswith(">>>"):
        return None
    return text


def module_name(relative: Path) -> str | None:
    parts = list(relative.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    if not parts or any(part.startswith("_") or part in EXCLUDED_PACKAGES for part in parts):
        return None
    return ".".join(parts)


def qa(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def module_pairs(name: str, tree: ast.Module) -> list[list[dict]]:
    """Question/answer pairs of one module: the module, its public functions, classes and methods."""
    pairs = []
    answer = first_paragraph(ast.get_docstring(tree))
    if answer:
        pairs.append(qa(pick(MODULE_QUESTIONS, name).format(name=name), answer))
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or node.name.startswith("_"):
            continue
        qualified = f"{name}.{node.name}"
        answer = first_paragraph(ast.get_docstring(node))
        if answer:
            questions = CLASS_QUESTIONS if isinstance(node, ast.ClassDef) else FUNCTION_QUESTIONS
            pairs.append(qa(pick(questions, qualified).format(name=qualified), answer))
        if isinstance(node, ast.ClassDef):
            for method in node.body:
                if isinstance(method, (ast.FunctionDef, ast.AsyncFunctionDef)) and not method.name.startswith("_"):
                    answer = first_paragraph(ast.get_docstring(method))
                    if answer:
                        method_name = f"{qualified}.{method.name}"
                        pairs.append(qa(pick(FUNCTION_QUESTIONS, method_name).format(name=method_name), answer))
    return pairs


def api_conversations() -> list[list[dict]]:
    root, files = stdlib_files()
    conversations = []
    for path in sorted(files):
        name = module_name(path.relative_to(root))
        if name is None:
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        pairs = module_pairs(name, tree)
        # Some modules' first two questions become one two-turn conversation.
        if len(pairs) >= 2 and stable_hash(name) % 3 == 0:
            pairs = [pairs[0] + pairs[1]] + pairs[2:]
        conversations.extend(pairs)
    return conversations


def topic_conversations() -> list[list[dict]]:
    import pydoc_data.topics

    conversations = []
    for key, text in sorted(pydoc_data.topics.topics.items()):
        lines = text.strip().splitlines()
        if len(lines) < 3 or not set(lines[1].strip()) <= set("*=-~"):
            continue  # no title line with an underline
        title = lines[0].strip()
        answer = first_paragraph("\n".join(lines[2:]).strip())
        if answer:
            conversations.append(qa(f"Explain {title} in Python.", answer))
    return conversations


def with_system_prompt(conversation: list[dict]) -> list[dict]:
    key = conversation[0]["content"]
    choice = stable_hash("system:" + key) % (4 * len(SYSTEM_PROMPTS))
    if choice >= len(SYSTEM_PROMPTS):
        return conversation
    return [{"role": "system", "content": SYSTEM_PROMPTS[choice]}] + conversation


def build_chat_records(max_records: int | None = None) -> list[dict]:
    """The embedded chat set: {"messages": [...]} records in a fixed shuffled order."""
    seen: set[str] = set()
    conversations = []
    for conversation in api_conversations() + topic_conversations():
        question = conversation[0]["content"]
        if question in seen or messages_problem(conversation) is not None:
            continue
        seen.add(question)
        conversations.append(with_system_prompt(conversation))
    conversations.sort(key=lambda c: stable_hash(json.dumps(c, sort_keys=True)))
    if max_records is not None:
        conversations = conversations[:max_records]
    return [{"messages": conversation} for conversation in conversations]


def write_jsonl_atomically(records: list[dict], out: Path) -> None:
    write_atomic(out, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
