"""raylm.core.redact on texts: each kind of personal data and secret is replaced, and what only
looks like one (documentation's examples, version numbers, order ids, code) is left alone."""

from __future__ import annotations

import pytest

from raylm.core.redact import redact_text


@pytest.mark.parametrize("text, placeholder", [
    ("mail jane.doe@acme-corp.com today", "<EMAIL>"),
    ("call +1 415 555 2671 now", "<PHONE>"),
    ("call (415) 555-2671 now", "<PHONE>"),
    ("host 93.184.216.34.", "<IP_ADDRESS>"),
    ("host 8.8.8.8 inside", "<IP_ADDRESS>"),
    ("v6 2a00:1450:4001:81b::200e here", "<IP_ADDRESS>"),
    ("card 4539-1488-0343-6467 declined", "<CREDIT_CARD>"),
    ("amex 378282246310005 ok", "<CREDIT_CARD>"),
    ("key AKIAIOSFODNN7EXAMPLE set", "<SECRET>"),
    ("gh ghp_abcdefghijklmnopqrstuvwxyz0123456789 set", "<SECRET>"),
    ("slack xoxb-123456789012-abcdefghij set", "<SECRET>"),
    ("google AIzaSyA1234567890abcdefghijklmnopqrstuv set", "<SECRET>"),
    ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U ok", "<SECRET>"),
    ('password = "Xk9#mQ2$vL8pZ"', "<SECRET>"),
    ("db at postgres://admin:s3cretPassw0rd@db.internal:5432/app", "<SECRET>"),
])
def test_each_kind_is_replaced_by_its_placeholder(text, placeholder):
    found = redact_text(text)
    assert placeholder in found.text and found.counts[placeholder] == 1, found.text
    assert sum(found.counts.values()) == 1, found.counts


@pytest.mark.parametrize("text", [
    "Write to user@example.com or admin@mail.example.org.",  # RFC 2606 example domains
    "Listen on 127.0.0.1, 0.0.0.0, ::1, 192.0.2.10 or 2001:db8::1.",  # loopback, unspecified, documentation
    "Broadcast is 255.255.255.255; the LAN is 10.1.2.3 and 192.168.1.1.",  # no one's host
    "Days 23 24 25 26 27 28 29; test id 5203681218835.",  # no card's grouping; a Mastercard prefix at 13 digits
    "Order 1234567890123456 shipped; card 4539 1488 0343 6468 fails Luhn.",
    "Python 3.11.7 at 12:30:45; a[::2] and x[1::3]; pi is 3.14159265358979.",
    "password = getpass.getpass()\nif token is None:\n    token = load_token()",
    'secret = "short"',  # too short to be a real secret: an example
])
def test_what_only_looks_like_personal_data_stays(text):
    found = redact_text(text)
    assert found.text == text and not found.counts, found.text


def test_a_private_key_block_is_one_secret_and_its_share_is_known():
    block = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAE\nbm9uZQAAAAAAAAAB\n-----END OPENSSH PRIVATE KEY-----"
    alone = redact_text(block)
    assert alone.text == "<SECRET>" and alone.secret_share == 1.0
    prose = "A long paragraph of ordinary prose about deploying services carefully. " * 10
    mixed = redact_text(prose + block)
    assert mixed.text == prose + "<SECRET>" and 0.1 < mixed.secret_share < 0.3
