"""A runtime made of a script, for unit tests of the shared logic."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any, ClassVar

from langchain_localllms.core.events import Row, Tally
from langchain_localllms.core.requests import Call
from langchain_localllms.llms._base import LocalLLM


class ScriptedLLM(LocalLLM):
    """Answers every prompt with ``pieces`` (or ``answers[prompt]``), one piece at a time."""

    pieces: list[str] = ["Hello", ",", " wor", "ld", "!"]
    answers: dict[str, list[str]] = {}
    max_tokens: int = 100
    temperature: float = 0.0
    delay: float = 0.0
    fail_after: int | None = None
    refuse: str | None = None
    """Prompts containing this fail at once with ValueError (like an over-long prompt)."""

    call_fields: ClassVar[tuple[str, ...]] = ("max_tokens", "temperature")
    call_only: ClassVar[tuple[str, ...]] = ("grammar",)

    streams_closed: ClassVar[list[bool]] = []
    produced: ClassVar[list[str]] = []
    lock: ClassVar[threading.Lock] = threading.Lock()

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def _pieces(self, prompt: str, call: Call, tally: Tally) -> Iterator[str]:
        self._check(prompt)
        tally.prompt_tokens = len(prompt.split())
        tally.finish_reason = "stop"
        pieces = self.answers.get(prompt, self.pieces)
        try:
            for i, piece in enumerate(pieces):
                if i >= call.params["max_tokens"]:
                    tally.finish_reason = "length"
                    return
                if self.fail_after is not None and i >= self.fail_after:
                    raise RuntimeError("runtime failed mid-stream")
                if self.delay:
                    time.sleep(self.delay)
                with self.lock:
                    self.produced.append(piece)
                tally.completion_tokens += 1
                yield piece
        finally:
            self.streams_closed.append(True)

    def _check(self, prompt: str) -> None:
        if self.refuse is not None and self.refuse in prompt:
            msg = f"the prompt {prompt!r} does not fit"
            raise ValueError(msg)


class BatchingLLM(ScriptedLLM):
    """A scripted runtime that batches natively (as CTranslate2 and HF do)."""

    batches: ClassVar[list[int]] = []

    def _generate_batch(self, prompts: list[str], call: Call) -> list[Row]:
        for prompt in prompts:
            self._check(prompt)  # one bad prompt fails the whole native call
        self.batches.append(len(prompts))
        rows = []
        for prompt in prompts:
            pieces = self.answers.get(prompt, self.pieces)[: call.params["max_tokens"]]
            tally = Tally(prompt_tokens=len(prompt.split()), completion_tokens=len(pieces))
            rows.append(Row(list(pieces), tally))
        return rows


def scripted(**kw: Any) -> ScriptedLLM:
    ScriptedLLM.streams_closed.clear()
    ScriptedLLM.produced.clear()
    return ScriptedLLM(**kw)
