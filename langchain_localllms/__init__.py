"""LangChain LLMs that run on your own machine.

Drop-in names for ``langchain_community.llms``: ``LlamaCpp``, ``CTranslate2``,
``HuggingFacePipeline``, ``Ollama``, ``Llamafile``, ``GPT4All``. Nothing heavy is
imported until a class is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from langchain_localllms.chat_models.ctranslate2 import ChatCTranslate2
    from langchain_localllms.chat_models.gpt4all import ChatGPT4All
    from langchain_localllms.chat_models.huggingface import ChatHuggingFace
    from langchain_localllms.chat_models.llamacpp import ChatLlamaCpp
    from langchain_localllms.chat_models.llamafile import ChatLlamafile
    from langchain_localllms.chat_models.ollama import ChatOllama
    from langchain_localllms.core.errors import (
        BadRequestError,
        ClosedError,
        ContextOverflowError,
        GrammarSyntaxError,
        IncompleteResponseError,
        NotFoundError,
        ServerError,
    )
    from langchain_localllms.grammars import Grammar
    from langchain_localllms.llms.ctranslate2 import CTranslate2
    from langchain_localllms.llms.gpt4all import GPT4All
    from langchain_localllms.llms.huggingface_pipeline import HuggingFacePipeline
    from langchain_localllms.llms.llamacpp import LlamaCpp
    from langchain_localllms.llms.llamafile import Llamafile
    from langchain_localllms.llms.ollama import Ollama

__all__ = [
    "BadRequestError",
    "CTranslate2",
    "ChatCTranslate2",
    "ChatGPT4All",
    "ChatHuggingFace",
    "ChatLlamaCpp",
    "ChatLlamafile",
    "ChatOllama",
    "ClosedError",
    "ContextOverflowError",
    "GPT4All",
    "Grammar",
    "GrammarSyntaxError",
    "HuggingFacePipeline",
    "IncompleteResponseError",
    "LlamaCpp",
    "Llamafile",
    "NotFoundError",
    "Ollama",
    "ServerError",
]

_EXPORTS = {
    "ChatCTranslate2": "langchain_localllms.chat_models.ctranslate2",
    "ChatGPT4All": "langchain_localllms.chat_models.gpt4all",
    "ChatHuggingFace": "langchain_localllms.chat_models.huggingface",
    "ChatLlamaCpp": "langchain_localllms.chat_models.llamacpp",
    "ChatLlamafile": "langchain_localllms.chat_models.llamafile",
    "ChatOllama": "langchain_localllms.chat_models.ollama",
    "BadRequestError": "langchain_localllms.core.errors",
    "ClosedError": "langchain_localllms.core.errors",
    "ContextOverflowError": "langchain_localllms.core.errors",
    "IncompleteResponseError": "langchain_localllms.core.errors",
    "NotFoundError": "langchain_localllms.core.errors",
    "ServerError": "langchain_localllms.core.errors",
    "GrammarSyntaxError": "langchain_localllms.core.errors",
    "CTranslate2": "langchain_localllms.llms.ctranslate2",
    "GPT4All": "langchain_localllms.llms.gpt4all",
    "Grammar": "langchain_localllms.grammars",
    "HuggingFacePipeline": "langchain_localllms.llms.huggingface_pipeline",
    "LlamaCpp": "langchain_localllms.llms.llamacpp",
    "Llamafile": "langchain_localllms.llms.llamafile",
    "Ollama": "langchain_localllms.llms.ollama",
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
