"""Token ids -> text: as a stream (incremental detokenization and stop strings), and token by
token for logprobs (each token's text and bytes, and where it starts in the decoded text).

Only the `tokenizers` library is used, so serving needs no `transformers`.
"""

from __future__ import annotations

import functools
import re

from tokenizers import decoders
from tokenizers.decoders import DecodeStream


class TextStream:
    """Turns a sequence's generated token ids into text deltas, and finds stop strings in it.

    `tokenizers`' DecodeStream does the decoding: it decodes a sliding window of recent tokens
    (constant cost per token), holds a token back while the text ends in an incomplete UTF-8
    character, and skips special tokens. It cannot do the rest, which is why this class exists:
    stop strings (found in the text, which is cut before them, and the last `len(longest stop) - 1`
    characters held back until they cannot start one), and handing out the characters still held
    back when the output ends (DecodeStream has no flush).
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.decoder = DecodeStream(skip_special_tokens=True)
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.unsent = ""  # decoded text not handed out yet
        self.context: list[int] = []  # the tokens of the last decoded chunk (DecodeStream's window)
        self.pending: list[int] = []  # tokens the decoder holds back (no text from them yet)
        self.stopped = False

    def add(self, token: int) -> None:
        """Append a token; sets `stopped` (and cuts the text before it) when a stop string appears."""
        self.pending.append(token)
        chunk = self.decoder.step(self.tokenizer, token)
        if chunk is not None:
            self.context, self.pending = self.pending, []
            self.take(chunk)

    def finish(self) -> None:
        """The output ended: take in the tokens still held back (an incomplete character and all).

        Decoded after the last chunk's tokens, as DecodeStream would have, so the text is the
        same as decoding the whole output at once.
        """
        if self.stopped or not self.pending:
            return
        before = self.tokenizer.decode(self.context, skip_special_tokens=True)
        after = self.tokenizer.decode(self.context + self.pending, skip_special_tokens=True)
        self.pending = []
        self.take(after[len(before) :])

    def take(self, chunk: str) -> None:
        # A stop string that ends in `chunk` starts at most `hold` characters before it; those are
        # still unsent, because `delta` holds them back.
        searched_from = max(0, len(self.unsent) - self.hold)
        self.unsent += chunk
        found = [i for i in (self.unsent.find(stop, searched_from) for stop in self.stop) if i != -1]
        if found:
            self.unsent = self.unsent[: min(found)]
            self.stopped = True

    def delta(self, final: bool) -> str:
        """Text not handed out yet that is safe to hand out (all of it when `final`)."""
        end = len(self.unsent) if final or self.stopped else max(0, len(self.unsent) - self.hold)
        out, self.unsent = self.unsent[:end], self.unsent[end:]
        return out


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character that stands for each byte in a
    token's name (bytes that print as themselves keep their character; the rest map to 256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return {chr(b if b in printable else next(shifted)): b for b in range(256)}


BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece-style byte tokens
SPACE_MARK = "\u2581"  # SentencePiece's word boundary, a space


class TokenTexts:
    """How one token reads on its own, for logprobs: its bytes, and its text, which is
    `bytes:\\xe2\\x82` (OpenAI's spelling) when its bytes are only part of a character: decoding such a
    token alone would give U+FFFD, which is not what the model generated."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()}
        self.alphabet = byte_level_alphabet() if isinstance(tokenizer.decoder, decoders.ByteLevel) else None
        self.bytes_of = functools.lru_cache(maxsize=1 << 16)(self.find_bytes)

    def find_bytes(self, token: int) -> bytes:
        if token in self.special:
            return self.special[token].encode()
        piece = self.tokenizer.id_to_token(token) or ""
        if self.alphabet is not None and piece and all(c in self.alphabet for c in piece):
            return bytes(self.alphabet[c] for c in piece)
        if match := BYTE_FALLBACK.fullmatch(piece):
            return bytes([int(match[1], 16)])
        if SPACE_MARK in piece:  # decoding it alone would strip the space it stands for
            return piece.replace(SPACE_MARK, " ").encode()
        return self.tokenizer.decode([token], skip_special_tokens=False).encode()

    def text(self, token: int) -> str:
        raw = self.bytes_of(token)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


class TextOffsets:
    """Where each token of a sequence starts in its decoded text (characters): the `text_offset` of
    OpenAI's completion logprobs. A token that ends inside a character starts where that character does."""

    def __init__(self, tokenizer, skip_special_tokens: bool, start: int = 0):
        self.tokenizer = tokenizer
        self.decoder = DecodeStream(skip_special_tokens=skip_special_tokens)
        self.length = start

    def add(self, token: int) -> int:
        offset = self.length
        chunk = self.decoder.step(self.tokenizer, token)
        self.length += len(chunk or "")
        return offset
