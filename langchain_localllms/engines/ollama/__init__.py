"""Ollama's HTTP API.

``engine``: generate, chat, pulls, model details; ``pull``: the pull stream's events
and progress; ``context``: the context the server runs a model with.
"""

from langchain_localllms.engines.ollama.engine import (
    CHAT_TOP_LEVEL,
    GENERATE_ONLY,
    OPTIONS,
    TOP_LEVEL,
    OllamaEngine,
    capabilities_of,
    format_field,
)
from langchain_localllms.engines.ollama.pull import PullProgress

__all__ = [
    "CHAT_TOP_LEVEL",
    "GENERATE_ONLY",
    "OPTIONS",
    "TOP_LEVEL",
    "OllamaEngine",
    "PullProgress",
    "capabilities_of",
    "format_field",
]
