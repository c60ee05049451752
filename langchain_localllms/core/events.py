"""What an engine emits while it generates, with no LangChain types.

An engine's stream is a sequence of pieces: ``str`` (the text of one generated token,
possibly empty), :class:`Echo` (the prompt given back), :class:`Thinking` (reasoning a
server split from the answer), :class:`ToolCallPiece` (a call a server parsed). A
native batch gives one :class:`Row` per prompt. Both fill a :class:`Tally`: token
counts, timings and the finish reason, the one shape of usage that every runtime fills.

``generation_info`` of each generation::

    {"finish_reason": "stop" | "length" | ...,
     "stop_sequence": "<the stop string hit>" | None,
     "prompt_tokens": int, "completion_tokens": int, "total_tokens": int,
     "timings": {"prompt_ms", "completion_ms", "prompt_tokens_per_second",
                 "completion_tokens_per_second"}}

``llm_output["token_usage"]`` sums the token counts over all generations of a call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Tally:
    """What a runtime reports while it generates; read once generation ends.

    Runtimes fill the token counts and ``finish_reason`` they know; where the runtime
    measures its own timings (a server's ``timings``) it sets ``prompt_ms`` and
    ``completion_ms``, otherwise the wall clock of the stream is used.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    prompt_ms: float | None = None
    completion_ms: float | None = None
    stop_sequence: str | None = None
    """Set by a runtime whose server applied a stop sequence itself and named it."""
    extra: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    first_piece: float | None = None

    def mark_piece(self) -> None:
        """Note the arrival of a generated piece (the first one ends the prompt phase)."""
        if self.first_piece is None:
            self.first_piece = time.perf_counter()

    def info(self, stop_sequence: str | None) -> dict[str, Any]:
        """Build ``generation_info``; a stop found by us overrides the runtime's reason."""
        if stop_sequence is None:
            stop_sequence = self.stop_sequence
        now = time.perf_counter()
        prompt_ms = self.prompt_ms
        completion_ms = self.completion_ms
        if prompt_ms is None:
            prompt_ms = ((self.first_piece or now) - self.started) * 1e3
        if completion_ms is None:
            completion_ms = (now - (self.first_piece or now)) * 1e3
        reason = "stop" if stop_sequence is not None else (self.finish_reason or "stop")
        # The first token is produced during the prompt phase when timed by the wall
        # clock, so decode speed counts the tokens after it.
        decoded = self.completion_tokens - (1 if self.completion_ms is None else 0)
        return {
            "finish_reason": reason,
            "stop_sequence": stop_sequence,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "timings": {
                "prompt_ms": round(prompt_ms, 3),
                "completion_ms": round(completion_ms, 3),
                "prompt_tokens_per_second": _rate(self.prompt_tokens, prompt_ms),
                "completion_tokens_per_second": _rate(decoded, completion_ms),
            },
            **self.extra,
        }


def _rate(n: int, ms: float) -> float | None:
    return round(n / ms * 1e3, 2) if ms > 0 and n > 0 else None


class Echo(str):
    """The prompt, given back in front of the answer (``echo``).

    No stop applies to it, and it is not a generated token.
    """

    __slots__ = ()


class Thinking(str):
    """A piece of the model's reasoning that the server split from the answer.

    Ollama sends it as ``message.thinking`` (for models whose template has a thinking
    switch); it is never part of the answer's text.
    """

    __slots__ = ()


@dataclass(frozen=True)
class ToolCallPiece:
    """A tool call that a server parsed out of the answer itself.

    Ollama's ``message.tool_calls``, as it sent it: not yet checked against the tool's
    schema.
    """

    name: str
    arguments: Any
    """A dict, or JSON text (as some servers send it)."""
    id: str | None = None


@dataclass
class Row:
    """One prompt's answer from a native batch, before stops are applied.

    ``pieces`` holds the text of each generated token in order (empty where a token
    completes no character yet), so the stop that ends the answer also ends its token
    count; ``prefix`` is text shown before the answer (an echoed prompt).
    """

    pieces: list[str]
    tally: Tally
    prefix: str = ""
