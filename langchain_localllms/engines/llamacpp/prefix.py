"""Prefix reuse: where a prefill is cut, so that a cached prefix is exactly a cold one."""

from __future__ import annotations

import logging
from collections.abc import Sequence

_log = logging.getLogger(__name__)


PREFILL_CHUNK = 256
#: A prompt of at least two chunks cuts its last, partial chunk once more, at a
#: multiple of this share of the chunk (64 tokens of 256): a later prompt that ends in
#: the same stretch (another question after the same few-shot prefix) reuses up to
#: that cut. The one more llama_decode cost a cold prefill of 450 and 1,010 tokens
#: 2.0% and 1.2% here (a cut at every 64: 6.8% and 4.1%; llama-cpp-python alone,
#: median of 6, interleaved).
SUB_CUT = 4


def prefill_cuts(n: int, chunk: int) -> list[int]:
    """Where a cold prefill of ``n`` prompt tokens ends its ``llama_decode`` calls.

    Every multiple of ``chunk``, and ``n``. A prompt of two chunks or more also cuts
    its last, partial chunk at the last multiple of ``chunk // SUB_CUT`` in it.
    """
    if chunk < 1:
        msg = f"chunk must be at least 1, got {chunk}"
        raise ValueError(msg)
    cuts = list(range(chunk, n + 1, chunk))
    base = n - n % chunk
    if n >= 2 * chunk:
        sub = max(1, chunk // SUB_CUT)
        if base < n - n % sub < n:
            cuts.append(n - n % sub)
    if base < n:
        cuts.append(n)
    return cuts


def prefill_chunks(start: int, n: int, chunk: int) -> list[tuple[int, int]]:
    """The ``llama_decode`` calls that evaluate tokens ``start..n`` of ``n``: ``[a, b)`` pairs.

    Cut where a cold prefill cuts (:func:`prefill_cuts`), so where a token lands
    depends on the prompt's length and the token's position, not on how much of the
    prompt was cached.
    """
    out = []
    a = start
    for b in prefill_cuts(n, chunk):
        if b > a:
            out.append((a, b))
            a = b
    return out


def canonical_length(n: int, chunk: int) -> int:
    """How many leading tokens of a prompt of ``n``, just prefilled, a later one may reuse.

    Up to its last cut that a longer prompt's cold prefill can make too: a multiple
    of ``chunk``, or the cut inside the last chunk (:func:`prefill_cuts`). The piece
    after it is computed in a batch of its own size, which another prompt's cold
    prefill would not use.
    """
    sub = max(1, chunk // SUB_CUT)
    return max(
        c
        for c in [0, *prefill_cuts(n, chunk)]
        if c % chunk == 0 or (n >= 2 * chunk and c % sub == 0)
    )


def reusable_length(cached: Sequence[int], tokens: Sequence[int], chunk: int) -> int:
    """How many leading ``tokens`` may keep the KV computed for ``cached``, exactly.

    ``cached`` ends at a cut of its own prefill (:func:`canonical_length`), which cut
    it at every multiple of ``chunk`` before that. The keep is a cut of ``tokens``' cold
    prefill, before the first token that differs, with only cuts of ``cached`` before
    it, and leaves at least one token to evaluate (its logits give the first answer
    token).
    """
    common = 0
    for a, b in zip(cached, tokens, strict=False):
        if a != b:
            break
        common += 1
    limit = min(common, len(tokens) - 1)
    made = {*range(chunk, len(cached) + 1, chunk), len(cached)}
    keep = 0
    for cut in prefill_cuts(len(tokens), chunk):
        if cut > limit or cut not in made:
            break
        keep = cut
    return keep


# --------------------------------------------------------------- batch decoding
#: Sequences per llama_decode that give every row exactly a single call's logits, on
#: weights that are not repacked: measured bitwise on Gemma-3-270M Q4_K_M up to 7 rows
#: (8 and more differ for some sequences); repacked q4_K weights differ from 4 on.
