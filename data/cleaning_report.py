"""What each cleaning step did, for the manifest's `cleaning` section and the printed report: how
many documents it dropped or changed, and a few examples.

An example names the document (`source`: path and line, record or row) and shows a short snippet
of it: the start of a dropped document, the shared n-gram of a contaminated one, and for a
redaction the text around the first replacement before and after, the replaced value masked to
its first two characters (`ja******`), never whole. Snippets are cut from the redacted text when
redaction is on, so no example shows what redaction hides.

Examples are the first EXAMPLES of each step in corpus order, whatever the scheduling: each encode
batch offers at most its first EXAMPLES per step, each partition keeps its first EXAMPLES, and the
driver the first EXAMPLES of those.
"""

from __future__ import annotations

import re

from raylm.core.redact import PLACEHOLDERS, Redaction

EXAMPLES = 3
SNIPPET_CHARS = 100
CONTEXT_CHARS = 40  # characters either side of a replacement in a redaction example
SPACES = re.compile(r"\s+")
READING_SKIPS = ("empty", "invalid_utf8")


def snippet(text: str, limit: int = SNIPPET_CHARS) -> str:
    """`text` on one line (whitespace runs as one space), cut to `limit` characters."""
    line = SPACES.sub(" ", text[: limit * 4]).strip()
    return line if len(line) <= limit else line[: limit - 1] + "…"


def mask(value: str) -> str:
    """A replaced value as an example may show it: its first two characters, then a fixed-length mask."""
    return value[:2] + "*" * 6


def redaction_examples(found: Redaction) -> dict[str, dict]:
    """{placeholder: {before, after}} around the first replacement of each placeholder in `found`."""
    examples = {}
    for placeholder, value in found.first.items():
        at = found.text.find(placeholder)
        if at < 0:
            continue
        start, end = max(0, at - CONTEXT_CHARS), at + len(placeholder) + CONTEXT_CHARS
        head, tail = found.text[start:at], found.text[at + len(placeholder) : end]
        examples[placeholder] = {"before": snippet(head + mask(value) + tail, 2 * CONTEXT_CHARS + 16),
                                 "after": snippet(head + placeholder + tail, 2 * CONTEXT_CHARS + 16)}
    return examples


def first_examples(examples: list[dict]) -> list[dict]:
    """The first EXAMPLES of `examples` in corpus order (each has `order`)."""
    return sorted(examples, key=lambda example: example["order"])[:EXAMPLES]


def merge_examples(records: list[dict]) -> dict[str, list[dict]]:
    """The partitions' examples per step key, the first EXAMPLES of each in corpus order, without `order`."""
    keys = sorted({key for record in records for key in record.get("examples", {})})
    merged = {}
    for key in keys:
        chosen = first_examples([example for record in records for example in record.get("examples", {}).get(key, [])])
        merged[key] = [{k: v for k, v in example.items() if k != "order"} for example in chosen]
    return merged


def step(count: int, examples: list[dict], counted: str = "dropped") -> dict:
    return {counted: count, "examples": examples}


def cleaning_section(switches: dict[str, bool], skipped: dict[str, int], redacted: dict[str, int] | None,
                     redacted_documents: dict[str, int] | None, examples: dict[str, list[dict]], decontamination: dict | None) -> dict:
    """The manifest's `cleaning`: per step that ran, the documents it dropped (or, for redaction, the
    replacements and the documents changed per placeholder) with examples."""
    section: dict = {}
    reading = {reason: step(skipped[reason], examples.get(reason, [])) for reason in READING_SKIPS if reason in skipped}
    if reading:
        section["reading"] = reading
    if switches["dedup"]:
        section["exact_dedup"] = step(skipped.get("duplicate", 0), examples.get("duplicate", []))
    if switches["near_dedup"]:
        section["near_dedup"] = step(skipped.get("near_duplicate", 0), examples.get("near_duplicate", []))
    if switches["quality_filter"]:
        rules = sorted(reason for reason in skipped if reason.startswith("quality_"))
        section["quality"] = {rule: step(skipped[rule], examples.get(rule, [])) for rule in rules}
    if redacted is not None and redacted_documents is not None:
        section["redaction"] = {
            placeholder: {"replaced": redacted[placeholder], "documents_changed": redacted_documents[placeholder],
                          "examples": examples.get(placeholder, [])}
            for placeholder in PLACEHOLDERS
        } | {"mostly_secrets": step(skipped.get("mostly_secrets", 0), examples.get("mostly_secrets", []))}
    if decontamination is not None:
        section["decontamination"] = decontamination | step(skipped.get("contaminated", 0), examples.get("contaminated", []))
    return section


def describe(example: dict) -> str:
    if "before" in example:
        return f"{example['source']}: {example['before']!r} -> {example['after']!r}"
    text = f"{example['source']}" + (f": {example['snippet']!r}" if "snippet" in example else "")
    return text + (f" (copy of {example['copy_of']})" if "copy_of" in example else "")


def report_lines(cleaning: dict) -> list[str]:
    """The printed report: one line per step (and per rule or placeholder), with its first example."""
    lines = []

    def add(name: str, entry: dict) -> None:
        counted = f"{entry['replaced']} replaced in {entry['documents_changed']} documents" if "replaced" in entry else f"{entry['dropped']} dropped"
        first = f"; e.g. {describe(entry['examples'][0])}" if entry["examples"] else ""
        lines.append(f"  {name}: {counted}{first}")

    for name, entry in cleaning.items():
        if "examples" in entry:
            add(name, entry)
        else:
            for sub, sub_entry in entry.items():
                add(f"{name} {sub}", sub_entry)
    return lines
