"""Ollama's ``POST /api/pull`` stream: its events, progress bars, and errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from langchain_localllms.core.errors import NotFoundError, ServerError
from langchain_localllms.core.files import progress_bar


@dataclass(frozen=True)
class PullProgress:
    """One status line of Ollama's ``POST /api/pull`` stream, as the server sent it.

    Ollama sends ``"pulling manifest"``, then for each layer of the model
    ``"pulling <12 hex digits>"`` with its ``digest`` (``"sha256:..."``), ``total``
    bytes and the bytes ``completed`` so far (absent until some arrived), then
    ``"verifying sha256 digest"``, ``"writing manifest"`` and ``"success"``.
    """

    status: str
    """Ollama's status text."""
    digest: str | None = None
    """The layer being pulled (``"sha256:..."``); None for the other steps."""
    total: int | None = None
    """The layer's size in bytes."""
    completed: int | None = None
    """Bytes of the layer on the server so far (None: none yet)."""

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> PullProgress:
        """The event of one NDJSON line of the pull stream."""

        def count(key: str) -> int | None:
            value = message.get(key)
            return value if isinstance(value, int) and not isinstance(value, bool) else None

        digest = message.get("digest")
        return cls(
            status=str(message.get("status") or ""),
            digest=digest if isinstance(digest, str) and digest else None,
            total=count("total"),
            completed=count("completed"),
        )

    @property
    def done(self) -> bool:
        """Whether this is the last line of a pull that worked (``"success"``)."""
        return self.status == "success"


def pull_finished(message: dict[str, Any]) -> bool:
    """Whether a pull stream's message is its last (``"success"``)."""
    return message.get("status") == "success"


class PullBars:
    """One progress bar per layer (tqdm: shown on a terminal, quiet elsewhere).

    Ollama pulls the layers one after the other; a layer is complete when the next
    step begins (its last progress line may come before its last bytes), so its bar
    is then filled and closed.
    """

    def __init__(self, *, show: bool) -> None:
        self._show = show
        self._open: dict[str, Any] = {}

    def feed(self, event: PullProgress) -> None:
        """Show one event: its layer's bar advances (a new layer closes the last)."""
        if not self._show:
            return
        if event.digest is None:
            self.finish()
            return
        bar = self._open.get(event.digest)
        if bar is None:
            self.finish()
            short = event.digest.removeprefix("sha256:")[:12]
            bar = self._open[event.digest] = progress_bar(
                f"pulling {short}", total=event.total, unit="B"
            )
        if event.total and bar.total != event.total:
            bar.total = event.total
        if event.completed is not None and event.completed > bar.n:
            bar.update(event.completed - bar.n)

    def finish(self, *, filled: bool = True) -> None:
        """Close the open bars; ``filled``: the layers are complete."""
        for bar in self._open.values():
            if filled and bar.total and bar.n < bar.total:
                bar.update(bar.total - bar.n)
            bar.close()
        self._open.clear()


def pull_error(model: str, where: str, error: ServerError) -> ServerError:
    """The error a failed pull raises: NotFoundError for a name the registry lacks."""
    text = error.server_message or str(error)
    if "file does not exist" in text or "not found" in text.lower():
        return NotFoundError(
            f"{where} could not pull {model!r}: {text}. Check the name and tag at "
            "https://ollama.com/library (Ollama pulls from its registry, over the "
            "internet).",
            server_message=text,
        )
    return ServerError(f"pulling {model!r} into {where} failed: {text}", server_message=text)
