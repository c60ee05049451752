"""HTTP for the runtimes that talk to a local server (Ollama, llamafile / llama.cpp).

One place for what both need:

* pooled connections: one ``httpx.Client`` per server configuration, and one
  ``httpx.AsyncClient`` per configuration *and event loop* (an async client is bound
  to the loop it first ran on);
* the three reply framings, parsed by the same code for sync and async reads:
  NDJSON (Ollama), Server-Sent Events (llama.cpp server) and a single JSON body;
* errors that say what happened and what to do: a server that is not running, an
  HTTP error with the server's own message, a read timeout naming the configured
  limit, an error reported mid-stream, and a stream cut before its final message
  (never returned as if it were a complete answer);
* credentials (``user:pass@`` in a URL, ``Authorization`` headers) kept out of
  reprs, logs and error messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import weakref
from collections.abc import (
    AsyncGenerator,
    Callable,
    Generator,
    Iterable,
    Iterator,
    Mapping,
)
from typing import Any, Literal
from urllib.parse import unquote, urlsplit, urlunsplit

import httpx

from langchain_localllms.core.errors import (
    BadRequestError,
    IncompleteResponseError,
    NotFoundError,
    ServerError,
)
from langchain_localllms.core.redact import redact_url

__all__ = [
    "Endpoint",
    "Framing",
    "read_messages",
    "server_message",
    "sse_events",
]

Framing = Literal["ndjson", "sse", "json"]
#: Seconds allowed to open a connection when no timeout is configured.
CONNECT_TIMEOUT = 30.0


# --------------------------------------------------------------------- parsing
def sse_events(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """Server-Sent Events from the lines of a ``text/event-stream``: ``(event, data)``.

    Follows the SSE rules: a field is ``name: value`` (one space after the colon is
    dropped, nothing else), several ``data`` lines of one event are joined by
    newlines, a blank line ends an event, lines starting with ``:`` are comments, and
    an event left unfinished at the end of the stream is discarded. The llamafile
    fork's ``error: {...}`` line is reported as an event named ``"error"``.
    """
    parser = _SSEParser()
    for line in lines:
        event = parser.feed(line)
        if event is not None:
            yield event


class _SSEParser:
    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> tuple[str, str] | None:
        if not line:
            event, data = self._event or "message", self._data
            self._event, self._data = "", []
            return (event, "\n".join(data)) if data else None
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "error":  # the llamafile fork: `error: {"code": 500, ...}`
            self._event = "error"
            self._data.append(value)
        return None  # id, retry and unknown fields carry nothing we use


def server_message(body: bytes | str) -> str:
    """The server's own error text from an error body (JSON ``{"error": ...}`` or text)."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    text = text.strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text[:2000] or "(empty reply)"
    if isinstance(data, dict) and "error" in data:
        return _error_text(data["error"])
    return text[:2000]


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or json.dumps(error))
    return error if isinstance(error, str) else json.dumps(error)


class _ReplyReader:
    """Turns reply lines into JSON messages; shared by the sync and async reads."""

    def __init__(self, framing: Framing, where: str, is_final: Callable[[dict[str, Any]], bool]):
        self.framing = framing
        self.where = where
        self.is_final = is_final
        self.final_seen = False
        self._sse = _SSEParser()
        self._body: list[str] = []

    def feed(self, line: str) -> list[dict[str, Any]]:
        if self.framing == "json":
            self._body.append(line)
            return []
        if self.framing == "ndjson":
            return [self._message(line)] if line.strip() else []
        event = self._sse.feed(line)
        if event is None:
            return []
        name, data = event
        if name == "error":
            raise self._error(data)
        if data.strip() == "[DONE]":  # OpenAI-style routes end so; /completion does not
            return []
        return [self._message(data)]

    def end(self) -> list[dict[str, Any]]:
        """The messages left at the end of the reply; raises if the final one is missing."""
        out = [self._message("\n".join(self._body))] if self.framing == "json" else []
        if not self.final_seen:
            msg = (
                f"the reply from {self.where} ended before its final message: the "
                "connection was cut or the server stopped, so the answer is incomplete "
                "and was not returned"
            )
            raise IncompleteResponseError(msg)
        return out

    def _message(self, text: str) -> dict[str, Any]:
        try:
            message = json.loads(text)
        except ValueError as e:
            msg = f"{self.where} sent a reply that is not JSON: {text[:200]!r}"
            raise ServerError(msg) from e
        if not isinstance(message, dict):
            msg = f"{self.where} sent a JSON {type(message).__name__}, not an object"
            raise ServerError(msg)
        if "error" in message:
            raise self._error(message["error"])
        if self.is_final(message):
            self.final_seen = True
        return message

    def _error(self, error: Any) -> ServerError:
        if isinstance(error, str):
            with contextlib.suppress(ValueError):
                error = json.loads(error)
        text = _error_text(error)
        return ServerError(
            f"{self.where} reported an error during the answer: {text}", server_message=text
        )


def read_messages(
    lines: Iterable[str],
    framing: Framing,
    *,
    where: str = "the server",
    is_final: Callable[[dict[str, Any]], bool],
) -> Iterator[dict[str, Any]]:
    """The JSON messages of a reply, from its lines; raises on errors and cut replies.

    Args:
        lines: The reply body split into lines (without line endings).
        framing: ``"ndjson"`` (a JSON object per line), ``"sse"`` (Server-Sent
            Events with a JSON ``data`` payload) or ``"json"`` (one JSON body).
        where: Who sent it, for error messages.
        is_final: Tells the server's last message of an answer from the others.

    Raises:
        ServerError: The reply holds an error message, or something not JSON.
        IncompleteResponseError: The reply ended without its final message.
    """
    reader = _ReplyReader(framing, where, is_final)
    for line in lines:
        yield from reader.feed(line)
    yield from reader.end()


# -------------------------------------------------------------------- clients
_SYNC_CLIENTS: dict[Any, httpx.Client] = {}
_ASYNC_CLIENTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Any, httpx.AsyncClient]]
_ASYNC_CLIENTS = weakref.WeakKeyDictionary()
_POOL_LOCK = threading.Lock()
#: Errors of a request on a pooled connection that the server had already closed
#: (servers close idle connections, and llama.cpp's server closes one after every
#: streamed reply): no reply began, so the request is sent again on a new one.
_STALE = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
_STALE_RETRIES = 2
_log = logging.getLogger(__name__)


def _log_retry(endpoint: Endpoint, error: Exception) -> None:
    _log.debug("%s closed a pooled connection (%s); sending again", endpoint.where, error)


#: Keys of client_kwargs the runtimes set themselves from their own fields.
_OWN_KEYS = frozenset({"base_url", "auth", "headers", "timeout"})


def _freeze(value: Any) -> Any:
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


class Endpoint:
    """A server: where it is, how to reach it, and what to tell a user who can't.

    Endpoints with the same configuration share one pooled client (per event loop
    for async), so connections are reused across calls and across instances.

    Args:
        base_url: The server's URL; ``user:password@`` in it becomes basic auth and is
            removed from the URL (and from every message).
        server: What runs there, for messages (``"Ollama"``).
        start_hint: How to start it, for the not-running error.
        timeout: Seconds to wait for the server (to connect, and between two pieces of
            a reply); None waits as long as generation takes.
        timeout_name: The user's name for ``timeout``, for the timeout error.
        headers: Headers sent with every request.
        auth: ``(user, password)`` or any ``httpx`` auth.
        client_kwargs: More arguments for ``httpx.Client`` / ``httpx.AsyncClient``
            (``verify``, ``proxy``, ``transport``...).

    Raises:
        ValueError: ``base_url`` is not an http(s) URL, credentials are given twice,
            or ``client_kwargs`` sets what the other arguments set.
    """

    def __init__(
        self,
        base_url: str,
        *,
        server: str,
        start_hint: str,
        timeout: float | None = None,
        timeout_name: str = "timeout",
        headers: Mapping[str, str] | None = None,
        auth: Any = None,
        client_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        url, credentials = _split_credentials(base_url)
        if credentials is not None and auth is not None:
            msg = (
                f"credentials are both in base_url ({redact_url(base_url)}) and in "
                "auth; give them once"
            )
            raise ValueError(msg)
        clash = sorted(_OWN_KEYS & set(client_kwargs or {}))
        if clash:
            msg = (
                f"client_kwargs may not set {', '.join(clash)}: use the "
                f"{', '.join(k if k != 'timeout' else timeout_name for k in clash)} field(s)"
            )
            raise ValueError(msg)
        self.url = url
        self.server = server
        self.start_hint = start_hint
        self.timeout = timeout
        self.timeout_name = timeout_name
        self.headers = dict(headers or {})
        self.auth = credentials if credentials is not None else auth
        self.client_kwargs = dict(client_kwargs or {})
        self.where = f"{server} at {url}"
        self._key = (
            url,
            _freeze(self.auth),
            tuple(sorted(self.headers.items())),
            timeout,
            tuple(sorted((k, _freeze(v)) for k, v in self.client_kwargs.items())),
        )

    def __repr__(self) -> str:
        return f"Endpoint({self.where!r})"

    # ------------------------------------------------------------- pooled clients
    def _client_args(self) -> dict[str, Any]:
        timeout = (
            httpx.Timeout(None, connect=CONNECT_TIMEOUT)
            if self.timeout is None
            else httpx.Timeout(self.timeout)
        )
        return {
            "base_url": self.url,
            "timeout": timeout,
            "headers": self.headers,
            "auth": self.auth,
            **self.client_kwargs,
        }

    def client(self) -> httpx.Client:
        """The pooled sync client for this configuration."""
        with _POOL_LOCK:
            client = _SYNC_CLIENTS.get(self._key)
            if client is None or client.is_closed:
                client = _SYNC_CLIENTS[self._key] = httpx.Client(**self._client_args())
            return client

    def aclient(self) -> httpx.AsyncClient:
        """The pooled async client for this configuration and the running event loop."""
        loop = asyncio.get_running_loop()
        with _POOL_LOCK:
            try:
                clients = _ASYNC_CLIENTS.setdefault(loop, {})
            except TypeError:  # a loop that takes no weak references: no pooling
                return httpx.AsyncClient(**self._client_args())
            client = clients.get(self._key)
            if client is None or client.is_closed:
                client = clients[self._key] = httpx.AsyncClient(**self._client_args())
            return client

    def release(self) -> None:
        """Take this configuration's clients out of the pool (``close()`` of an LLM).

        Requests running on them (another instance's, say) end normally; their
        connections close once nothing uses them, and the next request opens new ones.
        """
        with _POOL_LOCK:
            _SYNC_CLIENTS.pop(self._key, None)
            for clients in list(_ASYNC_CLIENTS.values()):
                clients.pop(self._key, None)

    # ------------------------------------------------------------------ requests
    def stream(
        self,
        path: str,
        body: Mapping[str, Any] | None,
        *,
        framing: Framing,
        is_final: Callable[[dict[str, Any]], bool],
        describe: Callable[[int, str], str | None] | None = None,
        method: str = "POST",
        headers: Mapping[str, str] | None = None,
    ) -> Generator[dict[str, Any], None, None]:
        """Send a request; yield the JSON messages of the reply as they arrive.

        Closing the iterator early closes the connection, which tells the server to
        stop generating.

        Args:
            path: The route, e.g. ``"/api/generate"``.
            body: The JSON body (None: no body).
            framing: How the reply is framed (see :func:`read_messages`).
            is_final: Tells the last message of a complete reply.
            describe: Gives a better message for an HTTP error status, from the
                status and the server's message (None: the generic one).
            method: The HTTP method.
            headers: Headers for this request only.

        Raises:
            ConnectionError: The server is not running or not reachable.
            TimeoutError: The server was silent for longer than the timeout.
            ServerError: An HTTP error status or an error in the reply.
            IncompleteResponseError: The reply was cut before its final message.
        """
        client = self.client()
        reader = _ReplyReader(framing, self.where, is_final)
        try:
            request = client.build_request(method, path, json=body, headers=headers)
            for attempt in range(_STALE_RETRIES + 1):
                try:
                    response = client.send(request, stream=True)
                    break
                except _STALE as e:
                    if attempt == _STALE_RETRIES:
                        raise
                    _log_retry(self, e)
            try:
                if response.status_code >= 400:
                    response.read()
                    raise self._status_error(response, describe)
                if framing == "json":
                    reader.feed(response.read().decode("utf-8", "replace"))
                else:
                    for line in response.iter_lines():
                        yield from reader.feed(line)
            finally:
                response.close()
        except httpx.HTTPError as e:
            if not (reader.final_seen and isinstance(e, _STALE)):
                raise self._transport_error(e) from e
            # the answer was complete; only the end of the reply's framing was lost
        yield from reader.end()

    async def astream(
        self,
        path: str,
        body: Mapping[str, Any] | None,
        *,
        framing: Framing,
        is_final: Callable[[dict[str, Any]], bool],
        describe: Callable[[int, str], str | None] | None = None,
        method: str = "POST",
        headers: Mapping[str, str] | None = None,
    ) -> AsyncGenerator[dict[str, Any], None]:
        """The async form of :meth:`stream` (same arguments, same errors)."""
        client = self.aclient()
        reader = _ReplyReader(framing, self.where, is_final)
        try:
            request = client.build_request(method, path, json=body, headers=headers)
            for attempt in range(_STALE_RETRIES + 1):
                try:
                    response = await client.send(request, stream=True)
                    break
                except _STALE as e:
                    if attempt == _STALE_RETRIES:
                        raise
                    _log_retry(self, e)
            try:
                if response.status_code >= 400:
                    await response.aread()
                    raise self._status_error(response, describe)
                if framing == "json":
                    reader.feed((await response.aread()).decode("utf-8", "replace"))
                else:
                    async for line in response.aiter_lines():
                        for message in reader.feed(line):
                            yield message
            finally:
                await response.aclose()
        except httpx.HTTPError as e:
            if not (reader.final_seen and isinstance(e, _STALE)):
                raise self._transport_error(e) from e
        for message in reader.end():
            yield message

    def request_json(
        self,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        method: str = "POST",
        describe: Callable[[int, str], str | None] | None = None,
    ) -> Any:
        """One request whose reply is one JSON body (e.g. ``/api/show``)."""
        messages = self.stream(
            path, body, framing="json", is_final=lambda _: True, describe=describe, method=method
        )
        (message,) = messages  # reads the whole reply
        return message

    async def arequest_json(
        self,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        method: str = "POST",
        describe: Callable[[int, str], str | None] | None = None,
    ) -> Any:
        """The async form of :meth:`request_json`."""
        messages = self.astream(
            path, body, framing="json", is_final=lambda _: True, describe=describe, method=method
        )
        (message,) = [m async for m in messages]
        return message

    # -------------------------------------------------------------------- errors
    def _status_error(
        self, response: httpx.Response, describe: Callable[[int, str], str | None] | None
    ) -> ServerError:
        status = response.status_code
        text = server_message(response.content)
        message = describe(status, text) if describe is not None else None
        if message is None:
            message = (
                f"{self.where} answered HTTP {status} "
                f"({response.reason_phrase or 'error'}) to {response.request.url.path}: {text}"
            )
        cls = (
            BadRequestError
            if status in (400, 422)
            else NotFoundError
            if status == 404
            else ServerError
        )
        return cls(message, status_code=status, server_message=text)

    def _transport_error(self, error: httpx.HTTPError) -> Exception:
        """Map an httpx error to the builtin error a user can act on."""
        reason = str(error) or type(error).__name__
        if isinstance(error, httpx.ConnectError):
            msg = f"cannot connect to {self.where} ({reason}). {self.start_hint}"
            return ConnectionError(msg)
        if isinstance(error, httpx.ConnectTimeout):
            limit = (
                f"{self.timeout:g} s ({self.timeout_name}={self.timeout:g})"
                if self.timeout is not None
                else f"{CONNECT_TIMEOUT:g} s"
            )
            msg = (
                f"no connection to {self.where} within {limit}. Is the address right "
                f"and the server reachable? {self.start_hint}"
            )
            return TimeoutError(msg)
        if isinstance(error, httpx.TimeoutException):
            msg = (
                f"{self.where} sent nothing for {self.timeout:g} s "
                f"({self.timeout_name}={self.timeout:g}); raise {self.timeout_name} "
                "(or set it to None) for slow models, long prompts or a model that "
                "is still loading"
                if self.timeout is not None
                else f"{self.where} timed out ({reason})"
            )
            return TimeoutError(msg)
        if isinstance(error, (httpx.RemoteProtocolError, httpx.ReadError)):
            msg = (
                f"the connection to {self.where} was cut before the answer ended "
                f"({reason}); the incomplete answer was not returned"
            )
            return IncompleteResponseError(msg)
        return ConnectionError(f"talking to {self.where} failed: {reason}")


def _split_credentials(base_url: str) -> tuple[str, tuple[str, str] | None]:
    """Validate ``base_url``; return it without credentials, and the credentials."""
    try:
        parts = urlsplit(base_url.strip())
        port = parts.port  # raises for a bad port
    except (ValueError, AttributeError) as e:
        msg = f"base_url {redact_url(str(base_url))!r} is not a URL ({e})"
        raise ValueError(msg) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        msg = (
            f"base_url must be an http(s) URL such as http://localhost:8080, "
            f"got {redact_url(base_url)!r}"
        )
        raise ValueError(msg)
    if parts.query or parts.fragment:
        msg = f"base_url must not have a query or fragment, got {redact_url(base_url)!r}"
        raise ValueError(msg)
    credentials = None
    if parts.username is not None or parts.password is not None:
        credentials = (unquote(parts.username or ""), unquote(parts.password or ""))
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    netloc = host if port is None else f"{host}:{port}"
    clean = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    return clean, credentials
