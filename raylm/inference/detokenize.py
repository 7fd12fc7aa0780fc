"""Token ids -> text, as a stream: incremental detokenization and stop strings.

Only the `tokenizers` library is used, so serving needs no `transformers`.
"""

from __future__ import annotations


class TextStream:
    """Turns a sequence's generated token ids into text deltas, and finds stop strings in it.

    Decoding a sliding window of recent tokens (not the whole output each step) keeps the cost per
    token constant; a delta is held back while it ends in an incomplete UTF-8 character, and the
    last `len(longest stop) - 1` characters are held back until they cannot start a stop string.
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: decoding from here gives stable text
        self.read_offset = 0  # tokens before this are already in `text`
        self.text = ""
        self.sent = 0  # characters of `text` already handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> None:
        """Append a token; sets `stopped` (and cuts `text` before it) when a stop string appears."""
        self.ids.append(token)
        self.advance(final=False)

    def finish(self) -> None:
        """The output ended: take in the tokens still held back (an incomplete character and all)."""
        if not self.stopped:
            self.advance(final=True)

    def advance(self, final: bool) -> None:
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        if not final and (len(after) <= len(before) or after.endswith("\ufffd")):
            return  # an incomplete character: wait for the next token
        searched_from = max(0, len(self.text) - self.hold)
        self.text += after[len(before) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        found = [i for i in (self.text.find(stop, searched_from) for stop in self.stop) if i != -1]
        if found:
            self.text = self.text[: min(found)]
            self.stopped = True

    def delta(self, final: bool) -> str:
        """Text not handed out yet that is safe to hand out (all of it when `final`)."""
        end = len(self.text) if final or self.stopped else max(self.sent, len(self.text) - self.hold)
        out = self.text[self.sent : end]
        self.sent = end
        return out
