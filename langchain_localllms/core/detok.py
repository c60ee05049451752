"""Token ids to text, one id at a time.

For runtimes that hand us ids (CTranslate2, transformers): the streamed pieces join
to what one decode of all the ids gives.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

#: Prompt ids decoded before the first new one, so the first piece keeps its
#: leading space (tokenizers strip it from the start of a decode).
CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turn token ids into text one id at a time, exactly as one decode would.

    Each step decodes a short window (the last ids already shown plus the new ones)
    and emits what the new ids add. Pieces that end in U+FFFD (a UTF-8 sequence
    split over several byte tokens) are held until the next id completes them, and
    the window starts with a few prompt tokens so that the first piece keeps its
    leading space (tokenizers strip it from the start of a decode).

    The joined pieces equal one decode of all the ids, with one exception: where the
    model emits byte tokens that are not valid UTF-8, a SentencePiece byte-fallback
    decoder turns the whole run of byte tokens into U+FFFD, while the pieces keep the
    characters already shown before the bad byte.

    Args:
        decode: ``ids -> text`` (special tokens skipped).
        context: The ids before the first one pushed (the end of the prompt).
    """

    def __init__(self, decode: Callable[[list[int]], str], context: Sequence[int] = ()) -> None:
        self._decode = decode
        self._ids = list(context)[-CONTEXT_TOKENS:]
        self._start = 0  # first id of the window
        self._shown = len(self._ids)  # ids whose text was already emitted

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completes (maybe empty)."""
        self._ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """End of generation: return any text still held back."""
        return self._emit(final=True)

    def text(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` all at once (what pushing each and flushing gives)."""
        return "".join(self.pieces(ids))

    def pieces(self, ids: Sequence[int]) -> list[str]:
        """The text each of ``ids`` adds, in order; what is held at the end goes last."""
        out = [self.push(i) for i in ids]
        tail = self.flush()
        if tail:
            if out:
                out[-1] += tail
            else:
                out.append(tail)
        return out

    def _emit(self, final: bool) -> str:
        if self._shown == len(self._ids):
            return ""
        before = self._decode(self._ids[self._start : self._shown])
        after = self._decode(self._ids[self._start :])
        if not final and (len(after) <= len(before) or after.endswith("\ufffd")):
            return ""
        same = len(before) if after.startswith(before) else _common_prefix(before, after)
        del self._ids[: self._shown]
        self._start, self._shown = 0, len(self._ids)
        return after[same:]


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
