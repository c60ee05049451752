"""The context Ollama runs a model with, read from ``/api/show`` and ``/api/ps``."""

from __future__ import annotations

import contextlib
from typing import Any

#: With num_ctx unset, the context the server runs the model with is asked (once per
#: instance) only after a prompt of at least this many tokens: Ollama gives no model
#: a smaller context unless told to (num_ctx, OLLAMA_CONTEXT_LENGTH, the Modelfile).
SERVED_CONTEXT_FLOOR = 256


def trained_context(info: dict[str, Any]) -> int | None:
    """``<arch>.context_length`` of ``/api/show``'s ``model_info``: the trained context."""
    model_info = info.get("model_info") or {}
    arch = model_info.get("general.architecture")
    value = model_info.get(f"{arch}.context_length") if arch else None
    if not isinstance(value, int):  # an architecture not named: any *.context_length
        value = next((v for k, v in model_info.items() if k.endswith(".context_length")), None)
    return value if isinstance(value, int) and value > 0 else None


def modelfile_context(info: dict[str, Any]) -> int | None:
    """``num_ctx`` in ``/api/show``'s ``parameters`` (the Modelfile's PARAMETER lines)."""
    for line in str(info.get("parameters") or "").splitlines():
        key, _, value = line.strip().partition(" ")
        if key == "num_ctx":
            with contextlib.suppress(ValueError):
                return int(value.strip())
    return None


def served_context(ps: Any, model: str) -> int | None:
    """``context_length`` of ``model`` in a ``GET /api/ps`` reply (Ollama 0.11+)."""
    models = ps.get("models") if isinstance(ps, dict) else None
    for entry in models if isinstance(models, list) else []:
        if not isinstance(entry, dict):
            continue
        names = {full_name(str(entry.get(k) or "")) for k in ("name", "model")}
        value = entry.get("context_length")
        if full_name(model) in names and isinstance(value, int) and value > 0:
            return value
    return None


def full_name(model: str) -> str:
    """``name`` as Ollama resolves it: ``name:latest`` when no tag is given."""
    return model if ":" in model.rsplit("/", 1)[-1] else f"{model}:latest"


def overflowed(prompt_eval_count: int, context: int) -> bool:
    """Whether Ollama truncated a prompt, from its ``prompt_eval_count``.

    Ollama's runner cuts a prompt longer than the context to exactly the context
    (its Go runner) or one token less (its llama-server runner), keeping the first
    ``num_keep`` tokens and the end; it counts the whole prompt it kept, cached or
    not. A count that reaches ``context - 1`` therefore means the prompt was cut (or
    filled the context to the last token, leaving no room to answer).
    """
    return prompt_eval_count > 0 and prompt_eval_count >= context - 1
