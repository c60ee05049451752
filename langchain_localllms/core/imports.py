"""Lazy import of the optional runtimes, with one error text that names the fix."""

from __future__ import annotations

import importlib
from types import ModuleType

#: module name -> (pip distribution, extra of this package that installs it)
_RUNTIMES: dict[str, tuple[str, str]] = {
    "llama_cpp": ("llama-cpp-python", "llamacpp"),
    "ctranslate2": ("ctranslate2", "ctranslate2"),
    "transformers": ("transformers", "huggingface"),
    "torch": ("torch", "huggingface"),
    "optimum.intel": ("optimum-intel[openvino]", "openvino"),
    "gpt4all": ("gpt4all", "gpt4all"),
    "llguidance": ("llguidance", "all"),
    "huggingface_hub": ("huggingface_hub", "huggingface"),
}


def require(module: str, *, feature: str | None = None, extra: str | None = None) -> ModuleType:
    """Import an optional runtime, or raise an ``ImportError`` that says what to install.

    Args:
        module: Dotted module name, e.g. ``"llama_cpp"``.
        feature: What needs it, for the message (defaults to the module name).
        extra: The extra of this package to name, where it is not the module's usual one.

    Returns:
        The imported module.

    Raises:
        ImportError: The module is not installed; the message names the extra.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        # a submodule (llama_cpp.llama_grammar) is installed by its package's extra
        known = _RUNTIMES.get(module) or _RUNTIMES.get(module.split(".")[0])
        dist, usual = known or (module, "all")
        extra = extra or usual
        msg = (
            f"{feature or module} needs the `{dist}` package, which could not be "
            f"imported ({e}). Install it with: "
            f'pip install "langchain-localllms[{extra}]"'
        )
        raise ImportError(msg) from e
