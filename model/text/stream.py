"""Generated token ids -> text, as it grows, with stop strings.

Each call to `push` re-decodes the ids so far (cheap next to a decode step) and hands out only text
that is final: not the tail of an incomplete UTF-8 character (decoded as U+FFFD), and not a tail
that could still become a stop string. When a stop string appears, the text ends just before it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


class TextStream:
    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self.decode, self.stop = decode, tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.emitted = 0  # characters of the text already handed out
        self.text = ""
        self.stopped = False  # a stop string was found: the text is final

    def push(self, token_id: int) -> str:
        """Add one generated token; return the new final text (possibly empty)."""
        self.ids.append(token_id)
        text = self.decode(self.ids)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self.text = True, text[:cut]
            return self._take(len(self.text))
        self.text = text
        return self._take(len(text) - self._holdback(text))

    def finish(self) -> str:
        """The rest of the text once generation has ended (an incomplete character stays as U+FFFD)."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        end = max(end, self.emitted)
        delta, self.emitted = self.text[self.emitted : end], end
        return delta

    def _holdback(self, text: str) -> int:
        """Characters at the end of `text` that may still change or turn into a stop string."""
        hold = len(text) - len(text.rstrip(REPLACEMENT))
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        return hold
