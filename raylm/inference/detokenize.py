"""Token ids -> text, as a stream: incremental detokenization and stop strings.

Only the `tokenizers` library is used, so serving needs no `transformers`.
"""

from __future__ import annotations

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
