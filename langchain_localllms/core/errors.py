"""The errors this package raises beyond Python's own, importable from the package.

Every error also is one of Python's own types, so code that catches those keeps
working: a refused request is a ``ValueError``, a missing model a ``LookupError``, a
reply that broke off a ``ConnectionError``; a bad GBNF grammar is a ``ValueError``.
"""

from __future__ import annotations

__all__ = [
    "BadRequestError",
    "ClosedError",
    "ContextOverflowError",
    "GrammarSyntaxError",
    "IncompleteResponseError",
    "NotFoundError",
    "SchemaNotSupported",
    "SchemaValidationError",
    "ServerError",
]


class ServerError(RuntimeError):
    """The server answered with an error: an HTTP error status or an error in the stream.

    ``server_message`` is the server's own text, ``status_code`` the HTTP status.
    """

    def __init__(
        self, message: str, *, status_code: int | None = None, server_message: str = ""
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.server_message = server_message


class BadRequestError(ServerError, ValueError):
    """HTTP 400/422: the server refused the request (a bad grammar, a bad value)."""


class NotFoundError(ServerError, LookupError):
    """HTTP 404: no such model, or no such route on this server."""


class IncompleteResponseError(ConnectionError):
    """The reply ended before the server's final message: the answer is incomplete."""


class GrammarSyntaxError(ValueError):
    """A GBNF grammar that does not parse; the message names line and column."""


class ClosedError(RuntimeError):
    """The instance was closed (``close()``, or the end of its ``with`` block).

    Its model is freed; make a new instance to use it again.
    """


class ContextOverflowError(ValueError):
    """The prompt (with the tokens asked for) does not fit in the model's context.

    ``prompt_tokens`` is the prompt's length in tokens and ``context`` the context
    size, where they are known.
    """

    def __init__(
        self, message: str, *, prompt_tokens: int | None = None, context: int | None = None
    ) -> None:
        super().__init__(message)
        self.prompt_tokens = prompt_tokens
        self.context = context


class SchemaNotSupported(ValueError):
    """A JSON schema uses a keyword the runtime cannot enforce while decoding.

    Raised when the schema is bound (``with_structured_output``, ``bind_tools``,
    ``grammar=``), before any decoding. ``keyword`` is the keyword, ``pointer`` the
    JSON pointer of the schema that has it (``""``: the root), ``runtime`` the
    constraint engine that refused it. ``strict=False`` relaxes the keyword instead
    (with a warning); every answer is still validated against the whole schema.
    """

    def __init__(
        self, message: str, *, keyword: str = "", pointer: str = "", runtime: str = ""
    ) -> None:
        super().__init__(message)
        self.keyword = keyword
        self.pointer = pointer
        self.runtime = runtime


class SchemaValidationError(ValueError):
    """An answer that does not validate against the schema it was asked for.

    ``raw`` is the model's text, ``errors`` what the validator found (each with the
    JSON pointer of the failing value). Never returned as if it were valid.
    """

    def __init__(self, message: str, *, raw: str = "", errors: list[str] | None = None) -> None:
        super().__init__(message)
        self.raw = raw
        self.errors = list(errors or [])
