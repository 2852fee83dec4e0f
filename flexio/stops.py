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
        self.held = ""  # the tail that may still start a stop string
        self.stopped = False

    def push(self, text: str) -> str:
        """Next piece of text -> what can be emitted now ("" after a stop string was found)."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buf = self.held + text
        at = self._first(buf)
        # the tail that may still become a stop string is held back for the next piece; before a whole stop
        # string, so is the start of a longer one that may still complete (stops "b" and "aba", text "ab"
        # then "a": the stop is at 0, not 1)
        p = self._open(buf, at if at >= 0 else len(buf))
        if at >= 0 and p < 0:
            self.stopped, self.held = True, ""
            return buf[:at]
        cut = p if p >= 0 else len(buf)
        self.held = buf[cut:]
        return buf[:cut]

    def _first(self, buf: str) -> int:
        """Where the earliest whole stop string in buf starts (-1: none)."""
        return min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)

    def _open(self, buf: str, before: int) -> int:
        """The earliest p < before where buf[p:] is a proper prefix of a stop string (-1: none)."""
        for p in range(max(0, len(buf) - max(len(s) for s in self.stops) + 1), before):
            tail = buf[p:]
            if any(len(s) > len(tail) and s.startswith(tail) for s in self.stops):
                return p
        return -1

    def flush(self) -> str:
        """The text ended: what was held back is text after all, up to a stop string it holds (one that
        waited on a longer, earlier one that did not complete; `stopped` is then set)."""
        out, self.held = self.held, ""
        if self.stopped:
            return ""
        at = self._first(out)
        if at >= 0:
            self.stopped = True
            return out[:at]
        return out
