"""Streamed text pieces + stop strings -> the text to emit, cut before the first stop string.

A stop string can arrive split over several tokens ("\\n\\n" as "\\n" then "\\n", "END" as "EN"
then "D"), so text that could still be the start of a stop string is held back until the next
piece tells whether it is one. What is emitted never contains a stop string nor any part of the
one that ended the text; concatenating everything `push` and `flush` return gives the text up to
(not including) the earliest stop string, as a search over the whole text would.
"""

from __future__ import annotations

from collections.abc import Iterable


class StopBuffer:
    def __init__(self, stops: Iterable[str] = ()):
        self.stops = tuple(s for s in stops if s)  # an empty stop string would end every text at once
        self.held = ""  # the tail that is a prefix of some stop string
        self.stopped = False

    def push(self, text: str) -> str:
        """Next piece of text -> what can be emitted now ("" after a stop string was found)."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buf = self.held + text
        at = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if at >= 0:
            self.stopped, self.held = True, ""
            return buf[:at]
        keep = self._partial(buf)
        self.held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep]

    def _partial(self, buf: str) -> int:
        """The length of the longest suffix of buf that is a proper prefix of a stop string."""
        longest = min(max(len(s) for s in self.stops) - 1, len(buf))
        for k in range(longest, 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    def flush(self) -> str:
        """The text ended without a stop string: what was held back is text after all."""
        out, self.held = self.held, ""
        return "" if self.stopped else out
