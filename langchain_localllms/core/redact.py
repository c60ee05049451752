"""No secret in a repr, a trace, a cache key or an error: one redaction for all.

Identity (LangChain's cache key and the ``invocation_params`` every callback sees) and
``repr`` of every class pass through :func:`redact`: values under credential-like
keys (``token``, ``api_key``, ``password``, ``auth``, ...) and the ``user:password@``
of URLs become ``***``, at any depth (``model_kwargs={"token": ...}``,
``client_kwargs={"proxy": "http://user:pw@host"}``). A credential never changes
what a model answers, so the cache key loses nothing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

REDACTED = "***"

#: Header names that carry credentials.
_SECRET_HEADER = re.compile(r"auth|token|key|secret|cookie|password|session", re.I)
#: Argument names that carry credentials (``max_tokens`` and ``tokenizer`` do not).
_SECRET_KEY = re.compile(
    r"^(.*_)?(token|auth|authorization|api_?key|password|passwd|secret|cookies?|credentials?)$",
    re.I,
)


def redact_url(url: str) -> str:
    """``url`` with any ``user:password@`` replaced by ``***@``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    host, slash, path = rest.partition("/")
    if "@" in host:
        host = f"{REDACTED}@{host.rpartition('@')[2]}"
    return f"{scheme}{sep}{host}{slash}{path}"


def redact_headers(headers: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``headers`` with the values of credential-like headers replaced by ``***``."""
    if headers is None:
        return None
    return {k: REDACTED if _SECRET_HEADER.search(k) else v for k, v in headers.items()}


def is_secret(key: Any) -> bool:
    """Whether an argument of this name carries a credential."""
    return isinstance(key, str) and bool(_SECRET_KEY.match(key))


def redact(value: Any, key: Any = None) -> Any:
    """``value`` (found under ``key``) with every credential in it replaced."""
    if value is None or isinstance(value, bool):
        return value
    if is_secret(key):
        return REDACTED
    if key == "headers" and isinstance(value, Mapping):
        return redact_headers(value)
    if isinstance(value, Mapping):
        return {k: redact(v, k) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    if isinstance(value, str) and "://" in value:
        return redact_url(value)
    return value
