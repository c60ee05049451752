"""LangChain's outputs from an engine's pieces: stops applied, usage in the last chunk."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from langchain_core.outputs import Generation, GenerationChunk

from langchain_localllms.core.events import Echo, Row, Tally
from langchain_localllms.core.stops import StopStream


class Assembler:
    """Stop handling and the final chunk with usage, shared by the sync and async loops."""

    def __init__(self, stops: Sequence[str], tally: Tally) -> None:
        self._stops = StopStream(stops)
        self._tally = tally

    @property
    def stopped(self) -> bool:
        return self._stops.stopped

    def feed(self, piece: str) -> GenerationChunk | None:
        if isinstance(piece, Echo):
            return GenerationChunk(text=str(piece)) if piece else None
        self._tally.mark_piece()
        text = self._stops.push(piece)
        return GenerationChunk(text=text) if text else None

    def finish(self) -> GenerationChunk:
        text = "" if self._stops.stopped else self._stops.flush()
        return GenerationChunk(text=text, generation_info=self._tally.info(self._stops.matched))


def finish_row(row: Row, stops: Sequence[str]) -> tuple[Generation, list[GenerationChunk]]:
    """Cut a native batch's row at its first stop and build usage, as a stream would.

    Also returns the chunks that stream would have given.
    """
    assembler = Assembler(stops, row.tally)
    chunks = [assembler.feed(Echo(row.prefix))] if row.prefix else []
    for n, piece in enumerate(row.pieces, 1):
        chunks.append(assembler.feed(piece))
        if assembler.stopped:
            row.tally.completion_tokens = n
            break
    done = [c for c in chunks if c is not None] + [assembler.finish()]
    body = "".join(c.text for c in done)
    return Generation(text=body, generation_info=done[-1].generation_info), done


def join_chunks(chunks: Iterator[GenerationChunk]) -> Generation:
    total: GenerationChunk | None = None
    for chunk in chunks:
        total = chunk if total is None else total + chunk
    assert total is not None  # the stream always ends with a final chunk
    return Generation(text=total.text, generation_info=total.generation_info)


def llm_output(generations: list[list[Generation]], **extra: Any) -> dict[str, Any]:
    """Sum token usage over every generation of a call, for ``LLMResult.llm_output``."""
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    for gens in generations:
        for g in gens:
            info = g.generation_info or {}
            for k in usage:
                usage[k] += int(info.get(k) or 0)
    return {"token_usage": usage, **extra}
