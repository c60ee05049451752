"""What an engine takes, and the parameters it refuses.

One call's resolved parameters (:class:`Call`), and a conversation for servers that
render chat templates themselves (:class:`ChatRequest`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Refused:
    """A parameter a runtime does not take: why, and what to do instead.

    ``None`` ("not set") and the values in ``accept`` (what the runtime does anyway)
    pass, since code written for other LangChain classes often passes them. Any other
    value is an ``error`` that names the parameter and says why, or, with
    ``no_effect``, a warning (once per class and parameter) that it changes nothing
    here: for parameters that ``langchain_community`` took and the runtime ignores.
    """

    why: str
    accept: tuple[Any, ...] = ()
    error: type[Exception] = TypeError
    no_effect: bool = False

    def check(self, name: str, value: Any, where: str) -> None:
        """Raise (or warn) unless ``value`` is None or accepted."""
        if value is None or any(value is a or value == a for a in self.accept):
            return
        if self.no_effect:
            if (where, name) not in _WARNED:
                _WARNED.add((where, name))
                warnings.warn(
                    f"{where} ignores {name}={value!r}: {self.why}", UserWarning, stacklevel=6
                )
            return
        shown = f"{name}={value!r}" if self.accept else f"{name}="
        msg = f"{where} does not take {shown}: {self.why}"
        raise self.error(msg)


_WARNED: set[tuple[str, str]] = set()


def refuse(table: Mapping[str, Refused], values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Check ``values`` against ``table``; return the values that are not in it."""
    for name in table.keys() & values.keys():
        table[name].check(name, values[name], where)
    return {k: v for k, v in values.items() if k not in table}


@dataclass
class Call:
    """The resolved parameters of one generation: instance defaults + call options."""

    params: dict[str, Any]
    stops: list[str] = field(default_factory=list)
    request: Any = None
    """The runtime's own form of the call, where its face resolves one (Hugging Face:
    the generation settings merged from the pipeline, the fields and the options)."""


@dataclass
class ChatRequest:
    """A conversation for a server that renders the chat template itself.

    ``messages`` are the server's message dicts (``role``, ``content``, ...), ``tools``
    its tool definitions (OpenAI's function format).
    """

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    model: str | None = None
    """Another model of the same server, for this call (None: the engine's)."""

    @property
    def text(self) -> str:
        """The messages' contents, joined: what a context check counts."""
        return "\n\n".join(str(m.get("content") or "") for m in self.messages)
