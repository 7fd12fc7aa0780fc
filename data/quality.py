"""Quality filters: heuristics that drop documents a model should not learn from, by source kind.

A document is code or prose by its file's extension (`source_kind`). Each rule looks at one
property and, when the document fails it, names itself; the first failing rule is the reason the
document is dropped (counted as `quality_<rule>` in the manifest). Thresholds are QualityConfig's.

Prose: the Gopher rules (Rae et al. 2021, appendix A) and C4's line rule (Raffel et al. 2020):
- `words`: between min_words and max_words words (a fragment, or a dump);
- `mean_word_length`: mean word length within [3, 10] characters (tables of numbers, hashes,
  glued text);
- `symbols`: '#' and '...' per word below max_symbol_ratio (tag lists, outlines);
- `bullets`, `ellipsis_lines`: most lines bullets, or many lines trailing off with '...';
- `alphabetic_words`: most words hold a letter (not a dump of numbers or symbols);
- `stop_words`: at least a couple of English function words (the, be, to, of, and, ...);
- `repeated_lines`, `repeated_ngrams`: the share of characters in repeated lines, and in the most
  frequent word 2-, 3- and 4-gram (boilerplate, spam, loops of generated text);
- `punctuated_lines`: too few lines end in terminal punctuation (menus, navigation, lists of
  links; C4 keeps only such lines, we only drop a document where they are rare).

Code: prose rules would drop most good code (few stop words, symbols everywhere), so code has
its own: `lines` (at least min_code_lines non-blank lines), `long_lines` (a mean line length or
a longest line past the limits: minified or generated files, embedded data), `alphanumeric` (the
share of letters and digits: encoded blobs), and `repeated_lines` (the same line over and over).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import PurePosixPath

CODE_SUFFIXES = frozenset({
    ".py", ".pyi", ".pyx", ".c", ".h", ".cc", ".cpp", ".hpp", ".cs", ".java", ".js", ".mjs", ".ts", ".tsx",
    ".go", ".rs", ".rb", ".php", ".swift", ".kt", ".scala", ".sh", ".bash", ".zsh", ".ps1", ".sql", ".r",
    ".lua", ".pl", ".m", ".f90", ".jl", ".hs", ".ml", ".css", ".scss", ".html", ".xml", ".toml", ".yaml", ".yml",
})  # fmt: skip
STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with", "is", "in", "a", "for", "it", "as", "are", "or"})
WORD = re.compile(r"\S+")
NOT_ALPHANUMERIC = re.compile(r"[\W_]+")  # \w is str.isalnum plus '_'
ASCII_NOT_ALPHANUMERIC = bytes(b for b in range(128) if not chr(b).isalnum())
BULLETS = ("-", "*", "•", "‣", "◦", "·")
TERMINAL = (".", "!", "?", '"', "'", ":", ")", "”")


@dataclass
class QualityConfig:
    min_words: int = 50  # prose: fewer words is a fragment (Gopher: 50)
    max_words: int = 100_000  # prose: more words is a dump, not a document (Gopher: 100,000)
    min_mean_word_length: float = 3.0  # prose: mean characters per word, lower bound (Gopher: 3)
    max_mean_word_length: float = 10.0  # prose: mean characters per word, upper bound (Gopher: 10)
    max_symbol_ratio: float = 0.1  # prose: '#' and '...' per word (Gopher: 0.1)
    max_bullet_lines: float = 0.9  # prose: share of lines that start with a bullet (Gopher: 0.9)
    max_ellipsis_lines: float = 0.3  # prose: share of lines that end in '...' (Gopher: 0.3)
    min_alphabetic_words: float = 0.7  # prose: share of words with a letter (Gopher: 0.8, which dropped 4 of the 79 pydoc topics: tables of operators and formats)
    min_stop_words: int = 2  # prose: distinct English function words a document must hold (Gopher: 2)
    max_repeated_line_chars: float = 0.2  # share of characters in lines seen before in the document (Gopher: 0.2)
    max_top_ngram_chars: float = 0.2  # prose: share of characters in the most frequent word 2-gram (Gopher: 0.2; 0.18, 0.16 for 3, 4)
    min_punctuated_lines: float = 0.1  # prose: share of lines ending in terminal punctuation (after C4)
    min_code_lines: int = 3  # code: non-blank lines a file must have
    max_code_mean_line_length: int = 120  # code: mean characters per line (minified or generated files go over)
    max_code_line_length: int = 2000  # code: the longest line (embedded data, minified code)
    min_code_alphanumeric: float = 0.25  # code: share of letters and digits among non-space characters
    max_code_repeated_line_chars: float = 0.5  # code: share of characters in repeated non-trivial lines

    def validate(self) -> None:
        from raylm.core.errors import UserError

        for name in ("max_symbol_ratio", "max_bullet_lines", "max_ellipsis_lines", "min_alphabetic_words", "max_repeated_line_chars",
                     "max_top_ngram_chars", "min_punctuated_lines", "min_code_alphanumeric", "max_code_repeated_line_chars"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"quality.{name} is a share and must be in [0, 1], got {getattr(self, name)}")
        if self.min_words > self.max_words or self.min_mean_word_length > self.max_mean_word_length:
            raise UserError("quality.min_* must not exceed the matching quality.max_*")


def source_kind(source: str | None) -> str:
    """'code' or 'prose', by the source file's extension (a record of a .jsonl file is prose)."""
    return "code" if source and PurePosixPath(source.split("::")[0]).suffix.lower() in CODE_SUFFIXES else "prose"


def repeated_line_chars(lines: list[str], min_length: int = 0) -> float:
    """Share of the characters of `lines` that sit in lines already seen earlier in the document."""
    seen: set[str] = set()
    repeated = total = 0
    for line in lines:
        total += len(line)
        if len(line) >= min_length and line in seen:
            repeated += len(line)
        seen.add(line)
    return repeated / total if total else 0.0


def top_ngram_chars(words: list[str], n: int) -> float:
    """Share of the words' characters covered by the most frequent word n-gram's occurrences."""
    if len(words) < n:
        return 0.0
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    gram, count = grams.most_common(1)[0]
    if count < 2:
        return 0.0
    return count * sum(map(len, gram)) / max(sum(map(len, words)), 1)


def prose_problem(text: str, cfg: QualityConfig) -> str | None:
    words = WORD.findall(text)
    if not cfg.min_words <= len(words) <= cfg.max_words:
        return "words"
    mean = sum(map(len, words)) / len(words)
    if not cfg.min_mean_word_length <= mean <= cfg.max_mean_word_length:
        return "mean_word_length"
    if (text.count("#") + text.count("...") + text.count("…")) / len(words) > cfg.max_symbol_ratio:
        return "symbols"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if sum(line.startswith(BULLETS) for line in lines) > cfg.max_bullet_lines * len(lines):
        return "bullets"
    if sum(line.endswith(("...", "…")) for line in lines) > cfg.max_ellipsis_lines * len(lines):
        return "ellipsis_lines"
    if sum(any(c.isalpha() for c in word) for word in words) < cfg.min_alphabetic_words * len(words):
        return "alphabetic_words"
    if len(STOP_WORDS.intersection(word.lower() for word in words)) < cfg.min_stop_words:
        return "stop_words"
    # Rules of a table or a heading underline ("+----+", "*****") repeat by design: only lines with a
    # letter or digit count.
    if repeated_line_chars([line for line in lines if any(c.isalnum() for c in line)]) > cfg.max_repeated_line_chars:
        return "repeated_lines"
    lowered = [word.lower() for word in words if any(c.isalnum() for c in word)]  # not table rules and bars
    for n, limit in ((2, cfg.max_top_ngram_chars), (3, cfg.max_top_ngram_chars * 0.9), (4, cfg.max_top_ngram_chars * 0.8)):
        if top_ngram_chars(lowered, n) > limit:
            return "repeated_ngrams"
    if sum(line.endswith(TERMINAL) for line in lines) < cfg.min_punctuated_lines * len(lines):
        return "punctuated_lines"
    return None


def alphanumeric_count(text: str) -> int:
    """How many characters of `text` are letters or digits (str.isalnum), counted in C; ASCII text
    (most code) through a byte table, 5x faster again than the regular expression."""
    if text.isascii():
        return len(text.encode("ascii").translate(None, ASCII_NOT_ALPHANUMERIC))
    return len(NOT_ALPHANUMERIC.sub("", text))


def code_problem(text: str, cfg: QualityConfig) -> str | None:
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    if len(lines) < cfg.min_code_lines:
        return "lines"
    lengths = [len(line) for line in lines]
    if sum(lengths) / len(lines) > cfg.max_code_mean_line_length or max(lengths) > cfg.max_code_line_length:
        return "long_lines"
    # Counted in C: a loop over each character took nine tenths of the quality rules' time.
    visible = sum(map(len, text.split()))  # str.split breaks where str.isspace holds
    if alphanumeric_count(text) < cfg.min_code_alphanumeric * visible:
        return "alphanumeric"
    # Short lines repeat in any good code ("}", "return None", "else:"); count lines of 20+ characters.
    if repeated_line_chars([line.strip() for line in lines], min_length=20) > cfg.max_code_repeated_line_chars:
        return "repeated_lines"
    return None


def quality_problem(text: str, source: str | None, cfg: QualityConfig) -> str | None:
    """The first rule `text` fails, as `quality_<kind>_<rule>`, or None when it passes them all."""
    kind = source_kind(source)
    problem = code_problem(text, cfg) if kind == "code" else prose_problem(text, cfg)
    return f"quality_{kind}_{problem}" if problem else None
