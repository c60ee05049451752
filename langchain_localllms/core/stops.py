"""Stop sequences: for whole texts and for streams of text pieces.

Plain substring matching (never regular expressions), so stops such as ``"?"`` or
``"[/INST]"`` mean exactly what they say. While streaming, only the tail that could
still become a stop is held back; everything else is released at once.
"""

from __future__ import annotations

from collections.abc import Sequence


def check_stops(stops: Sequence[str] | None) -> list[str]:
    """Validate a list of stop sequences.

    Raises:
        TypeError: ``stops`` is a bare string or holds a non-string.
        ValueError: a stop sequence is empty (it would stop before the first token).
    """
    if stops is None:
        return []
    if isinstance(stops, str):
        msg = f"stop must be a list of strings, got the string {stops!r}: use [{stops!r}]"
        raise TypeError(msg)
    out = []
    for s in stops:
        if not isinstance(s, str):
            msg = f"stop sequences must be strings, got {type(s).__name__}: {s!r}"
            raise TypeError(msg)
        if not s:
            msg = "an empty stop sequence would end every answer before it starts"
            raise ValueError(msg)
        out.append(s)
    return out


def find_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """Return ``(index, stop)`` of the earliest stop sequence in ``text``, if any."""
    best: tuple[int, str] | None = None
    for s in stops:
        i = text.find(s)
        if i != -1 and (best is None or i < best[0]):
            best = (i, s)
    return best


def truncate(text: str, stops: Sequence[str]) -> tuple[str, str | None]:
    """Cut ``text`` before its first stop sequence; return the text and the stop hit."""
    hit = find_stop(text, stops)
    if hit is None:
        return text, None
    return text[: hit[0]], hit[1]


class StopStream:
    """Apply stop sequences to text that arrives in pieces.

    ``push`` returns the text that is safe to show now; text that might be the start
    of a stop sequence is held until the next piece decides it. After a stop is found,
    ``stopped`` is true and ``matched`` names it; the stop itself is never emitted.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = list(stops)
        self.stopped = False
        self.matched: str | None = None
        self._held = ""

    def push(self, piece: str) -> str:
        """Add a piece of generated text; return what can be released."""
        if self.stopped:
            return ""
        buf = self._held + piece
        if not self.stops:
            self._held = ""
            return buf
        hit = find_stop(buf, self.stops)
        keep = self._partial_tail(buf)
        if hit is not None and len(buf) - keep >= hit[0]:
            self.stopped, self.matched, self._held = True, hit[1], ""
            return buf[: hit[0]]
        # Held: a suffix that may begin a stop, also one that would begin before a
        # stop already complete (["X.X", "."] on "X." then "X" must cut at "X.X").
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """End of generation: release what was held back, up to a stop inside it."""
        held, self._held = self._held, ""
        hit = find_stop(held, self.stops)
        if hit is not None:
            self.stopped, self.matched = True, hit[1]
            return held[: hit[0]]
        return held

    def _partial_tail(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop."""
        longest = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), longest, -1):
                if buf.endswith(s[:n]):
                    longest = n
                    break
        return longest
