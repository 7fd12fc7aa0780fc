"""Personal data and secrets in a text, replaced by typed placeholders: `redact_text`.

Any stage may call it on a text: `raylm prepare` on every document (on the Ray Data workers), and
later a store of the prompts an endpoint collected. What it replaces, and what it leaves:

- `<SECRET>`: private-key blocks (PEM/OpenSSH, BEGIN to END); cloud keys and API tokens found by
  detect-secrets' maintained patterns (AWS, Azure storage, GitHub, GitLab, Slack, Stripe,
  OpenAI, PyPI, npm, SendGrid, Discord, Telegram, Twilio, Mailchimp, Square, passwords in URLs),
  Google API keys (`AIza...`), JSON Web Tokens, and a value of 8 characters or more assigned to
  a name like `password`, `secret` or `api_key` (detect-secrets' keyword rule, read as Python).
- `<EMAIL>`: e-mail addresses, except at the domains reserved for examples (example.com/.org/.net,
  *.example, *.test, *.invalid, localhost): documentation, not a person (RFC 2606).
- `<IP_ADDRESS>`: IPv4 and IPv6 addresses reachable on the internet (`is_global`), outside the
  ranges reserved for documentation (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32).
  Private (10/8, 192.168/16, ...), loopback, link-local and reserved addresses name no
  one's host: `127.0.0.1` and `192.168.1.1` in the standard library's docs are examples.
- `<CREDIT_CARD>`: card numbers as they are written (one digit run, or groups of four split by
  spaces or dashes) whose brand prefix and length agree (Visa, Mastercard, Amex, Discover, JCB)
  and that pass the Luhn check; other long numbers stay.
- `<PHONE>`: numbers written as phone numbers: `+` and a country code, or the North American
  `(555) 123-4567` / `555-123-4567` shapes, with separators; bare digit runs stay (they are ids,
  counts and constants far more often than phone numbers).

`redact_text` returns a `Redaction`: the text, the count per placeholder, the first value each
placeholder replaced (prepare shows it masked in its examples, never whole), and how much of the
text was secrets (prepare drops a document that is mostly secrets).
"""

from __future__ import annotations

import functools
import ipaddress
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

PLACEHOLDERS = ("<SECRET>", "<EMAIL>", "<IP_ADDRESS>", "<CREDIT_CARD>", "<PHONE>")

PRIVATE_KEY = re.compile(r"-----BEGIN[A-Z ]*PRIVATE KEY( BLOCK)?-----.*?-----END[A-Z ]*PRIVATE KEY( BLOCK)?-----", re.DOTALL)
# Patterns that open with a literal are searched for at C speed; the word boundaries they need
# before that literal are checked on each match instead (`starts_a_word`).
GOOGLE_API_KEY = re.compile(r"AIza[0-9A-Za-z_\-]{35}(?![0-9A-Za-z_\-])")
JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{8,}")  # header.payload.signature
# detect-secrets' regex plugins whose patterns name a token format (its keyword-only and
# high-entropy plugins flag too much ordinary code and prose to redact on sight).
TOKEN_PLUGINS = ("AWSKeyDetector", "AzureStorageKeyDetector", "GitHubTokenDetector", "GitLabTokenDetector", "SlackDetector",
                 "StripeDetector", "OpenAIDetector", "PypiTokenDetector", "NpmDetector",
                 "SendGridDetector", "DiscordBotTokenDetector", "TelegramBotTokenDetector", "TwilioKeyDetector",
                 "MailchimpDetector", "SquareOAuthDetector", "BasicAuthDetector")
MIN_KEYWORD_SECRET = 8  # shorter values after `password =` are placeholders and examples far more often

EMAIL_DOMAIN = re.compile(r"@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,})\b")  # the local part is found backwards
EMAIL_LOCAL = re.compile(r"[A-Za-z0-9._%+-]{1,64}$")
EXAMPLE_DOMAINS = re.compile(r"(^|\.)(example\.(com|org|net)|example|test|invalid|localhost)$", re.IGNORECASE)
IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?!\w|\.\d)")
IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
DOCUMENTATION_NETS = [ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")]
# Written as cards are: one run of digits, or groups of four (Amex: 4-6-5) split by spaces or dashes.
CARD = re.compile(r"(?<![\d-])(?:\d{13,19}|\d{4}([ -])\d{4}\1\d{4}\1\d{1,7}|\d{4}([ -])\d{6}\2\d{5})(?![\d-])")
CARD_BRANDS = [  # (prefix, lengths): Visa, Mastercard, Amex, Discover, JCB
    (re.compile(r"^4"), (13, 16, 19)), (re.compile(r"^(5[1-5]|2[2-7])"), (16,)), (re.compile(r"^3[47]"), (15,)),
    (re.compile(r"^(6011|65)"), (16, 19)), (re.compile(r"^35"), (16, 19)),
]
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]\d{2,4}){2,4}"
                   r"|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}|\d{3}[.-]\d{3}[.-]\d{4})(?![\w-])")


# Literals without which some slow detect-secrets patterns cannot match: a text without one skips
# the pattern (`in` is a C-speed scan). A pattern not listed here always runs.
PATTERN_GATES = {r"-us[0-9]": "-us", "xox(": "xox", "hooks\\.slack": "hooks.slack.com", "k_live_": "k_live_", "aws.": "aws"}


@functools.cache
def token_patterns() -> list[tuple[re.Pattern, str | None]]:
    """detect-secrets' patterns, each with the literal it needs (None: no cheap gate), lower-cased where the pattern ignores case."""
    from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class

    plugins = {cls.__name__: cls for cls in get_mapping_from_secret_type_to_class().values()}
    patterns = [pattern for name in TOKEN_PLUGINS for pattern in plugins[name]().denylist]
    return [(pattern, next((lit for key, lit in PATTERN_GATES.items() if key in pattern.pattern), None)) for pattern in patterns]


@functools.cache
def keyword_detector():
    from detect_secrets.plugins.keyword import KeywordDetector

    return KeywordDetector()


@functools.cache
def keyword_hint() -> re.Pattern:
    """A line detect-secrets' keyword rule can flag assigns to one of its secret-like names; only those lines go to it."""
    from detect_secrets.plugins.keyword import DENYLIST

    return re.compile(rf"({'|'.join(DENYLIST)})\w*[\"']?\s*(=|:|==|!=)")  # on lowered text: case-sensitive is faster


def entropy(value: str) -> float:
    """Shannon entropy in bits per character."""
    counts = Counter(value)
    return -sum(n / len(value) * math.log2(n / len(value)) for n in counts.values())


def keyword_lines(text: str) -> list[str]:
    """The lines of `text` that assign to one of the keyword rule's names, found in one
    case-sensitive pass over the lowered text (lowering keeps the line breaks where they are)."""
    lowered, lines, line, searched = text.lower(), text.split("\n"), 0, 0
    chosen: dict[int, str] = {}
    for match in keyword_hint().finditer(lowered):
        line += lowered.count("\n", searched, match.start())
        searched = match.start()
        chosen[line] = lines[line]
    return list(chosen.values())


def keyword_secrets(text: str) -> set[str]:
    """Values assigned to secret-like names, by detect-secrets' keyword rule, on the lines that could hold one."""
    found = set()
    for line in keyword_lines(text):
        if len(line) > 500:
            continue
        for secret in keyword_detector().analyze_line(filename="text.py", line=line, line_number=0):
            value = secret.secret_value or ""
            if len(value) >= MIN_KEYWORD_SECRET and entropy(value) >= 2.5:
                found.add(value)
    return found


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def is_card(match: str) -> bool:
    digits = re.sub(r"[ -]", "", match)
    brand = any(prefix.match(digits) and len(digits) in lengths for prefix, lengths in CARD_BRANDS)
    return brand and luhn_ok(digits)


def is_personal_ip(candidate: str) -> bool:
    """An address that names a real host: not loopback, unspecified, or reserved for documentation."""
    try:
        address = ipaddress.ip_address(candidate)
    except ValueError:
        return False
    if address.version == 6 and sum(1 for part in candidate.split(":") if part) < 3:
        return False  # `::1`-like and slice-like text (`a[::2]`) are not hosts worth hiding
    return address.is_global and not any(address in net for net in DOCUMENTATION_NETS)


HEX_COLON = re.compile(r":[0-9A-Fa-f]{0,4}:")
HEX_COLON_TAIL = re.compile(r"[0-9A-Fa-f:]*$")
HEX_COLON_HEAD = re.compile(r"[0-9A-Fa-f:]*")
NUMBER_RUN = re.compile(r"[+(]?\d[\d .()-]{5,}\d")
NUMBER_RULES = [  # in precedence order where two overlap
    (CARD, "<CREDIT_CARD>", lambda m: not is_card(m.group(0))),
    (IPV4, "<IP_ADDRESS>", lambda m: not is_personal_ip(m.group(0))),
    (PHONE, "<PHONE>", None),
]


@dataclass
class Redaction:
    text: str  # the text with placeholders
    counts: Counter = field(default_factory=Counter)  # placeholder -> how many replaced
    secret_chars: int = 0  # characters of the original that were secrets
    first: dict = field(default_factory=dict)  # placeholder -> the first value it replaced (for masked examples)

    def replaced(self, placeholder: str, value: str) -> None:
        """Count one replacement of `value` by `placeholder`."""
        self.counts[placeholder] += 1
        self.first.setdefault(placeholder, value)
        if placeholder == "<SECRET>":
            self.secret_chars += len(value)

    @property
    def secret_share(self) -> float:
        """The share of the original text that was secrets (prepare drops a document that is mostly secrets)."""
        original = len(self.text) - self.counts["<SECRET>"] * len("<SECRET>") + self.secret_chars
        return self.secret_chars / original if original else 0.0


def substitute(found: Redaction, pattern: re.Pattern, placeholder: str, keep: Callable[[re.Match], bool] | None = None) -> None:
    def replace(match: re.Match) -> str:
        if keep is not None and keep(match):
            return match.group(0)
        found.replaced(placeholder, match.group(0))
        return placeholder

    found.text = pattern.sub(replace, found.text)


def redact_emails(found: Redaction) -> None:
    """E-mail addresses, searched from their `@` (a literal: fast) and widened back over the local part."""
    text, pieces, last = found.text, [], 0
    for match in EMAIL_DOMAIN.finditer(text):
        local = EMAIL_LOCAL.search(text, max(last, match.start() - 64), match.start())
        if local is None or local.start() < last or EXAMPLE_DOMAINS.search(match.group(1)):
            continue
        pieces += [text[last : local.start()], "<EMAIL>"]
        found.replaced("<EMAIL>", text[local.start() : match.end()])
        last = match.end()
    found.text = "".join(pieces) + text[last:] if pieces else text


def starts_a_word(match: re.Match) -> bool:
    return match.start() == 0 or not (match.string[match.start() - 1].isalnum() or match.string[match.start() - 1] in "_-")


def redact_text(text: str) -> Redaction:
    """`text` with personal data and secrets replaced by placeholders, and how many of each."""
    found = Redaction(text)
    substitute(found, PRIVATE_KEY, "<SECRET>")
    lowered = text.lower()
    for pattern, gate in token_patterns():
        if gate is None or gate in (lowered if pattern.flags & re.IGNORECASE else found.text):
            substitute(found, pattern, "<SECRET>")
    for pattern in (GOOGLE_API_KEY, JWT):
        substitute(found, pattern, "<SECRET>", keep=lambda m: not starts_a_word(m))
    for value in sorted(keyword_secrets(found.text), key=len, reverse=True):
        substitute(found, re.compile(re.escape(value)), "<SECRET>")
    redact_emails(found)
    redact_number_runs(found)
    redact_ipv6(found)
    return found


def redact_ipv6(found: Redaction) -> None:
    """IPv6 addresses, searched from a `:hex:` (opening with a literal: fast), widened to the whole
    run of hex digits and colons, which IPV6 and `is_personal_ip` then judge."""
    text, pieces, last, searched = found.text, [], 0, 0
    for seed in HEX_COLON.finditer(text):
        if seed.start() < searched:
            continue
        start = HEX_COLON_TAIL.search(text, max(last, seed.start() - 45), seed.start()).start()
        end = HEX_COLON_HEAD.match(text, seed.end()).end()
        searched = end
        match = IPV6.search(text, start, min(len(text), end + 1))
        if match is None or match.start() < last or not is_personal_ip(match.group(0)):
            continue
        pieces += [text[last : match.start()], "<IP_ADDRESS>"]
        found.replaced("<IP_ADDRESS>", match.group(0))
        last = match.end()
    found.text = "".join(pieces) + text[last:] if pieces else text


def redact_number_runs(found: Redaction) -> None:
    """Cards, IPv4 addresses and phone numbers: each is a run of digits and separators, found in one
    pass; the three patterns then run on those runs only (three passes over every text cost 3x)."""
    text, pieces, last = found.text, [], 0
    for run in NUMBER_RUN.finditer(text):
        end = min(len(text), run.end() + 2)  # the patterns' look-aheads see past the run's end
        position = run.start()
        while position < run.end():
            hit = first_number_hit(text, position, end)
            if hit is None:
                break
            start, stop, placeholder = hit
            pieces += [text[last:start], placeholder]
            found.replaced(placeholder, text[start:stop])
            last = position = stop
    found.text = "".join(pieces) + text[last:] if pieces else text


def first_number_hit(text: str, position: int, end: int) -> tuple[int, int, str] | None:
    """The leftmost card, IPv4 address or phone number in text[position:end] that is one, by the rules above."""
    hits = []
    for pattern, placeholder, keep in NUMBER_RULES:
        for match in pattern.finditer(text, position, end):
            if keep is None or not keep(match):
                hits.append((match.start(), match.end(), placeholder))
                break
    return min(hits) if hits else None
