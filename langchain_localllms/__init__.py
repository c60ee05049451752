"""LangChain LLMs that run on your own machine.

Drop-in names for ``langchain_community.llms``: ``LlamaCpp``, ``CTranslate2``,
``HuggingFacePipeline``, ``Ollama``, ``Llamafile``, ``GPT4All``. Nothing heavy is
imported until a class is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from langchain_localllms.grammars import Grammar
    from langchain_localllms.llms.llamacpp import LlamaCpp

__all__ = ["Grammar", "LlamaCpp"]

_EXPORTS = {
    "LlamaCpp": "langchain_localllms.llms.llamacpp",
    "Grammar": "langchain_localllms.grammars",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        msg = f"module 'langchain_localllms' has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
