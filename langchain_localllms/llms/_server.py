"""The base of the LLM classes that call a local server (Ollama, llamafile / llama.cpp).

Transport (pooled clients, reply framings, errors, redaction) lives in
:mod:`langchain_localllms._http`; this class turns it into a runtime for
:class:`~langchain_localllms._base.LocalLLM`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any, ClassVar

from pydantic import Field, PrivateAttr

from langchain_localllms._base import Call, LocalLLM
from langchain_localllms._http import Endpoint, Framing
from langchain_localllms._usage import Tally

#: Requests of a batch sent at once when the server does not say how many it runs.
DEFAULT_CONCURRENCY = 4
#: A slot-count probe that fails in these ways leaves the default (the batch's own
#: requests then report what is wrong with the server). ValueError: a reply that is
#: not JSON.
_PROBE_ERRORS = (RuntimeError, ConnectionError, TimeoutError, ValueError)


class ServerLLM(LocalLLM):
    """What the runtimes that call a local server share (not used directly).

    A subclass names its route and reply framing, builds the request body from a
    :class:`~langchain_localllms._base.Call` (``_body``), reads each reply message
    (``_take``: the text piece, with usage into the tally) and says which message is
    the last (``_is_final``). This class sends the request through the pooled
    clients, sync and natively async, and maps every failure to a clear error.
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
    _route: ClassVar[str] = ""
    _stream_framing: ClassVar[Framing] = "ndjson"
    #: Headers of streamed requests only.
    _stream_headers: ClassVar[dict[str, str] | None] = None
    #: Where the server tells how many requests it decodes at once: (route, JSON
    #: key) of a GET reply; None if it does not.
    _slots_probe: ClassVar[tuple[str, str] | None] = None

    _slots: int | None = PrivateAttr(default=None)

    def _setup(self) -> None:
        self._endpoint()  # a bad base_url or client_kwargs fails here, not at first call

    def _endpoint(self) -> Endpoint:
        return Endpoint(
            self.base_url,
            server=self._server_name,
            start_hint=self._start_hint,
            timeout=getattr(self, self._timeout_field),
            timeout_name=self._timeout_field,
            headers=self.headers,
            auth=getattr(self, "auth", None),
            client_kwargs=self.client_kwargs,
        )

    def _identity(self) -> dict[str, Any]:
        return {"base_url": self.base_url, **super()._identity()}  # redacted by the base

    def _release(self) -> None:
        # The server keeps its model: Ollama.unload() frees that.
        self._endpoint().release()

    # ------------------------------------------------------------ subclass hooks
    def _body(self, prompt: str, call: Call) -> dict[str, Any]:
        raise NotImplementedError

    def _take(self, message: dict[str, Any], tally: Tally) -> str:
        raise NotImplementedError

    def _is_final(self, message: dict[str, Any]) -> bool:
        raise NotImplementedError

    def _describe_status(self, status: int, text: str) -> str | None:
        """A better message for an HTTP error status (None: the generic one)."""
        return None

    # ------------------------------------------------------------- concurrency
    def _concurrency(self) -> int:
        if self.max_concurrency is not None:
            return self.max_concurrency
        if self._slots is None and self._slots_probe is not None:
            route, _ = self._slots_probe
            self._slots = 0  # asked: a server that cannot say is not asked again
            with contextlib.suppress(*_PROBE_ERRORS):
                self._slots = self._read_slots(self._endpoint().request_json(route, method="GET"))
        return self._slots or DEFAULT_CONCURRENCY

    async def _aconcurrency(self) -> int:
        if self.max_concurrency is None and self._slots is None and self._slots_probe:
            route, _ = self._slots_probe
            self._slots = 0
            with contextlib.suppress(*_PROBE_ERRORS):
                reply = await self._endpoint().arequest_json(route, method="GET")
                self._slots = self._read_slots(reply)
        return self._concurrency()  # asked already: never a request on the event loop

    def _read_slots(self, reply: Any) -> int:
        """The slot count in the probe's reply; 0 (asked, not told) if it has none."""
        assert self._slots_probe is not None
        value = reply.get(self._slots_probe[1]) if isinstance(reply, dict) else None
        return value if isinstance(value, int) and value > 0 else 0

    # ------------------------------------------------------------------ the loop
    def _request(self, prompt: str, call: Call) -> tuple[dict[str, Any], dict[str, Any]]:
        body = self._body(prompt, call)
        streamed = bool(body.get("stream"))
        options = {
            "framing": self._stream_framing if streamed else "json",
            "is_final": self._is_final,
            "describe": self._describe_status,
            "headers": self._stream_headers if streamed else None,
        }
        return body, options

    def _pieces(self, prompt: str, call: Call, tally: Tally) -> Iterator[str]:
        body, options = self._request(prompt, call)
        messages = self._endpoint().stream(self._route, body, **options)
        try:
            for message in messages:
                piece = self._take(message, tally)
                if piece:
                    yield piece
        finally:
            messages.close()  # stopped early: the connection closes, the server stops

    async def _apieces(self, prompt: str, call: Call, tally: Tally) -> AsyncIterator[str]:
        body, options = self._request(prompt, call)
        messages = self._endpoint().astream(self._route, body, **options)
        try:
            async for message in messages:
                piece = self._take(message, tally)
                if piece:
                    yield piece
        finally:
            await messages.aclose()
