"""The engine protocol: what every runtime's engine offers the faces over it.

An engine loads its model (or reaches its server) when it is built and frees it in
``close()``. It generates from a :class:`~langchain_localllms.core.requests.Call`:
text pieces (one per generated token, possibly empty; :class:`~.events.Echo`,
:class:`~.events.Thinking`), filling a :class:`~.events.Tally` with usage and the
finish reason. Stops that the runtime does not apply itself are the face's: it cuts
at them and closes the stream, which stops decoding.

Runtimes that can add a native batch (``rows``: one :class:`~.events.Row` per prompt)
or native async (``apieces``). Engines may take more keyword-only arguments with
defaults (llama.cpp's ``parallel``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Protocol, runtime_checkable

from langchain_localllms.core.events import Row, Tally
from langchain_localllms.core.requests import Call


@runtime_checkable
class Engine(Protocol):
    """A loaded model (or a server): tokenize, generate, close."""

    def pieces(self, prompt: str, call: Call, tally: Tally) -> Iterator[str]:
        """The answer to ``prompt``, piece by piece; closing the iterator stops decoding."""
        ...

    def token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` in the model's own vocabulary."""
        ...

    def close(self) -> None:
        """Free the model (native memory, connections); idempotent."""
        ...


@runtime_checkable
class BatchEngine(Engine, Protocol):
    """An engine with a native batch."""

    def rows(self, prompts: list[str], call: Call) -> list[Row] | None:
        """One row per prompt, before stops are applied (None: no batch fits)."""
        ...


@runtime_checkable
class AsyncEngine(Engine, Protocol):
    """An engine whose generation is natively async (a server's)."""

    def apieces(self, prompt: str, call: Call, tally: Tally) -> AsyncIterator[str]:
        """The async form of :meth:`Engine.pieces`."""
        ...
