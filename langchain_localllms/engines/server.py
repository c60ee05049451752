"""What the engines of local HTTP servers share: one request, its reply read as pieces.

A server engine names its route and reply framing, builds a request body from a
:class:`~langchain_localllms.core.requests.Call` (``body``), reads each reply message
(``take``: the text piece, with usage into the tally) and says which message is the
last (``is_final``). :meth:`ServerEngine.pieces` sends the request through the pooled
clients of :mod:`langchain_localllms.core.http`, sync and natively async; closing the
iterator closes the connection, and the server stops generating.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, ClassVar, TypeVar

from langchain_localllms.core.events import Tally
from langchain_localllms.core.http import Endpoint, Framing
from langchain_localllms.core.requests import Call

#: Requests of a batch sent at once when the server does not say how many it runs.
DEFAULT_CONCURRENCY = 4
T = TypeVar("T")
#: A lookup that fails in these ways leaves what it looks for unknown (ServerError is
#: a RuntimeError; ValueError: a reply that is not JSON).
LOOKUP_ERRORS = (RuntimeError, ConnectionError, TimeoutError, ValueError)


class ServerEngine:
    """One server: requests, replies, and how many requests it runs at once.

    Args:
        endpoint: Where the server is and how to reach it.
        streaming: Ask the server to stream the answer (False: one reply).
    """

    route: ClassVar[str] = ""
    framing: ClassVar[Framing] = "ndjson"
    #: Headers of streamed requests only.
    stream_headers: ClassVar[dict[str, str] | None] = None
    #: Where the server tells how many requests it decodes at once: (route, JSON key)
    #: of a GET reply; None if it does not.
    slots_probe: ClassVar[tuple[str, str] | None] = None

    def __init__(self, endpoint: Endpoint, *, streaming: bool = True) -> None:
        self.endpoint = endpoint
        self.streaming = streaming
        self._slots: int | None = None

    def close(self) -> None:
        """Release the pooled connections (the server keeps its model)."""
        self.endpoint.release()

    # ------------------------------------------------------------------- hooks
    def body(self, prompt: str, call: Call) -> dict[str, Any]:
        """The request body of one prompt."""
        raise NotImplementedError

    def take(self, message: dict[str, Any], tally: Tally) -> str:
        """The text piece of one reply message; usage and reasons go into ``tally``."""
        raise NotImplementedError

    def is_final(self, message: dict[str, Any]) -> bool:
        """Whether this reply message is the last one."""
        raise NotImplementedError

    def describe_status(self, status: int, text: str) -> str | None:
        """A better message for an HTTP error status (None: the generic one)."""
        return None

    def token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` in the served model's vocabulary, where the server can say."""
        msg = f"{self.endpoint.server} has no tokenizer route"
        raise NotImplementedError(msg)

    # ---------------------------------------------------------------- the loop
    def request_options(self, body: dict[str, Any]) -> dict[str, Any]:
        """How to send ``body`` and read its reply (framing, last message, errors)."""
        streamed = bool(body.get("stream"))
        return {
            "framing": self.framing if streamed else "json",
            "is_final": self.is_final,
            "describe": self.describe_status,
            "headers": self.stream_headers if streamed else None,
        }

    def pieces(self, prompt: str, call: Call, tally: Tally) -> Iterator[str]:
        """The answer's text pieces, as the server sends them."""
        body = self.body(prompt, call)
        yield from self.exchange(self.route, body, lambda m: _nonempty(self.take(m, tally)))

    async def apieces(self, prompt: str, call: Call, tally: Tally) -> AsyncIterator[str]:
        """The async form of :meth:`pieces`."""
        body = self.body(prompt, call)
        async for piece in self.aexchange(
            self.route, body, lambda m: _nonempty(self.take(m, tally))
        ):
            yield piece

    def exchange(
        self, route: str, body: dict[str, Any], read: Callable[[dict[str, Any]], list[T]]
    ) -> Iterator[T]:
        """Send ``body`` to ``route`` and yield what ``read`` makes of each reply message.

        Closing the iterator closes the connection: the server stops generating.
        """
        messages = self.endpoint.stream(route, body, **self.request_options(body))
        try:
            for message in messages:
                yield from read(message)
        finally:
            messages.close()

    async def aexchange(
        self, route: str, body: dict[str, Any], read: Callable[[dict[str, Any]], list[T]]
    ) -> AsyncIterator[T]:
        """The async form of :meth:`exchange`."""
        messages = self.endpoint.astream(route, body, **self.request_options(body))
        try:
            async for message in messages:
                for item in read(message):
                    yield item
        finally:
            await messages.aclose()

    # ------------------------------------------------------------- concurrency
    def slots(self) -> int:
        """How many requests the server decodes at once.

        Asked once; a default where the server cannot say.
        """
        if self._slots is None and self.slots_probe is not None:
            route, _ = self.slots_probe
            self._slots = 0  # asked: a server that cannot say is not asked again
            with contextlib.suppress(*LOOKUP_ERRORS):
                self._slots = self._read_slots(self.endpoint.request_json(route, method="GET"))
        return self._slots or DEFAULT_CONCURRENCY

    async def aslots(self) -> int:
        """The async form of :meth:`slots` (never a request on the event loop)."""
        if self._slots is None and self.slots_probe is not None:
            route, _ = self.slots_probe
            self._slots = 0
            with contextlib.suppress(*LOOKUP_ERRORS):
                reply = await self.endpoint.arequest_json(route, method="GET")
                self._slots = self._read_slots(reply)
        return self.slots()

    @property
    def reported_slots(self) -> int | None:
        """The slot count the server reported (None: not asked yet; 0: it did not say)."""
        return self._slots

    def _read_slots(self, reply: Any) -> int:
        """The slot count in the probe's reply; 0 (asked, not told) if it has none."""
        assert self.slots_probe is not None
        value = reply.get(self.slots_probe[1]) if isinstance(reply, dict) else None
        return value if isinstance(value, int) and value > 0 else 0


def _nonempty(piece: str) -> list[str]:
    return [piece] if piece else []
