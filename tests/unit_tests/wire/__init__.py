"""Recorded server replies (see README.md) and a fake transport that plays them back."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

WIRE = Path(__file__).resolve().parent


def read(name: str) -> bytes:
    return (WIRE / name).read_bytes()


Reply = Callable[[httpx.Request], httpx.Response]


def http_reply(name: str) -> Reply:
    """A recorded ``.http`` file (status line, headers, body) as a reply."""
    head, _, body = read(name).partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = [tuple(line.split(": ", 1)) for line in lines[1:] if ": " in line]
    return lambda request: httpx.Response(status, headers=headers, content=body)


def sse(name: str, *, chunk: int | None = None, cut: bool = False) -> Reply:
    return body_reply(read(name), "text/event-stream", chunk=chunk, cut=cut)


def ndjson(name: str, *, chunk: int | None = None, cut: bool = False) -> Reply:
    return body_reply(read(name), "application/x-ndjson", chunk=chunk, cut=cut)


def json_reply(obj: Any, status: int = 200) -> Reply:
    return lambda request: httpx.Response(status, json=obj)


def text_reply(text: str, status: int, content_type: str = "text/plain") -> Reply:
    return lambda request: httpx.Response(status, headers={"content-type": content_type}, text=text)


def body_reply(
    data: bytes, content_type: str, *, chunk: int | None = None, cut: bool = False
) -> Reply:
    """A 200 reply with ``data`` as body, sent in pieces of ``chunk`` bytes if given."""

    def reply(request: httpx.Request) -> httpx.Response:
        headers = {"content-type": content_type}
        if not chunk and not cut:
            return httpx.Response(200, headers=headers, content=data)
        return httpx.Response(200, headers=headers, stream=Chunks(data, chunk or 64, cut=cut))

    return reply


class Chunks(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A body that arrives in small pieces (lines and UTF-8 characters split), and can
    be cut off (``cut=True``: the peer closes before the body ends)."""

    def __init__(self, data: bytes, size: int = 7, *, cut: bool = False) -> None:
        self.data = data
        self.size = size
        self.cut = cut
        self.closed = False

    def _pieces(self) -> Iterator[bytes]:
        for i in range(0, len(self.data), self.size):
            yield self.data[i : i + self.size]

    def __iter__(self) -> Iterator[bytes]:
        yield from self._pieces()
        if self.cut:
            raise httpx.RemoteProtocolError(
                "peer closed connection without sending complete message body "
                "(incomplete chunked read)"
            )

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in self._pieces():
            yield piece
        if self.cut:
            raise httpx.RemoteProtocolError(
                "peer closed connection without sending complete message body "
                "(incomplete chunked read)"
            )

    def close(self) -> None:
        self.closed = True

    async def aclose(self) -> None:
        self.closed = True


class FakeServer:
    """A transport that answers every request with the next of ``replies`` (the last
    one repeats) and keeps the requests; a reply may be a function of the request, or
    an exception to raise."""

    def __init__(self, *replies: Reply | Exception):
        self.replies = list(replies)
        self.requests: list[httpx.Request] = []
        self.transport = httpx.MockTransport(self._handle)

    def _handle(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        if isinstance(reply, Exception):
            raise reply
        return reply(request)

    @property
    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.requests]

    @property
    def body(self) -> dict[str, Any]:
        return self.bodies[-1]

    def kwargs(self) -> dict[str, Any]:
        """``client_kwargs`` that route a runtime's requests here."""
        return {"transport": self.transport}
