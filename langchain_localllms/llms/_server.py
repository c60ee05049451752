"""The base of the LLM classes that call a local server (Ollama, llamafile / llama.cpp).

The wire (request bodies, reply reading, the request loop) lives in the server's
engine (:mod:`langchain_localllms.engines.server` and one module per server); this
class holds the fields users set and turns the engine into a LangChain LLM.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any, ClassVar

from pydantic import Field, PrivateAttr

from langchain_localllms.core.events import Tally
from langchain_localllms.core.http import Endpoint
from langchain_localllms.core.requests import Call
from langchain_localllms.engines.server import ServerEngine
from langchain_localllms.llms._base import LocalLLM


class ServerLLM(LocalLLM):
    """What the LLM classes over a local server share (not used directly).

    A subclass builds its server's engine (``_make_engine``) from its fields; this
    class sends prompts through it, sync and natively async, and sizes batches by the
    server's slots.
    """

    base_url: str
    """Where the server listens."""
    headers: dict[str, str] | None = None
    """Headers sent with every request (e.g. ``Authorization``); reprs hide secrets."""
    client_kwargs: dict[str, Any] = Field(default_factory=dict)
    """More arguments for the ``httpx`` clients (``verify``, ``proxy``, ``transport``)."""
    streaming: bool = True
    """Ask the server to stream the answer (True), or to send it in one reply (False:
    the answer then reaches callbacks and ``stream()`` as one piece)."""
    max_concurrency: int | None = Field(default=None, ge=1)
    """How many prompts of a ``batch``/``abatch`` are sent at once. None: as many as
    the server has parallel slots, where it tells (llama.cpp's ``GET /props``), else
    4. The slot count is asked once per instance, at its first batch."""

    _server_name: ClassVar[str] = "the server"
    _start_hint: ClassVar[str] = ""
    _timeout_field: ClassVar[str] = "timeout"

    _engine: ServerEngine = PrivateAttr()

    @classmethod
    def standard_fields(cls) -> dict[str, str | None]:
        """LangChain's standard names, ``timeout`` too (the server's timeout field)."""
        return {**super().standard_fields(), "timeout": cls._timeout_field}

    def _setup(self) -> None:
        # A bad base_url or client_kwargs fails here, not at first call.
        self._engine = self._make_engine(self._endpoint())

    def _make_engine(self, endpoint: Endpoint) -> ServerEngine:
        raise NotImplementedError

    @property
    def engine(self) -> ServerEngine:
        """The server's engine: requests, replies, and what the server tells."""
        return self._engine

    def _endpoint(self, *, timeout: float | bool | None = True) -> Endpoint:
        """The server as these fields reach it (``timeout=None``: no read timeout)."""
        return Endpoint(
            self.base_url,
            server=self._server_name,
            start_hint=self._start_hint,
            timeout=getattr(self, self._timeout_field) if timeout is True else timeout,
            timeout_name=self._timeout_field,
            headers=self.headers,
            auth=getattr(self, "auth", None),
            client_kwargs=self.client_kwargs,
        )

    def _identity(self) -> dict[str, Any]:
        return {"base_url": self.base_url, **super()._identity()}  # redacted by the base

    def _release(self) -> None:
        # The server keeps its model: Ollama.unload() frees that.
        self._engine.close()

    def _concurrency(self) -> int:
        return self.max_concurrency or self._engine.slots()

    async def _aconcurrency(self) -> int:
        return self.max_concurrency or await self._engine.aslots()

    def _pieces(self, prompt: str, call: Call, tally: Tally) -> Iterator[str]:
        return self._engine.pieces(prompt, call, tally)

    def _apieces(self, prompt: str, call: Call, tally: Tally) -> AsyncIterator[str]:
        return self._engine.apieces(prompt, call, tally)
