"""The one shape of usage, timings and finish reasons that every runtime fills.

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

from langchain_core.outputs import Generation


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


def llm_output(generations: list[list[Generation]], **extra: Any) -> dict[str, Any]:
    """Sum token usage over every generation of a call, for ``LLMResult.llm_output``."""
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    for gens in generations:
        for g in gens:
            info = g.generation_info or {}
            for k in usage:
                usage[k] += int(info.get(k) or 0)
    return {"token_usage": usage, **extra}
