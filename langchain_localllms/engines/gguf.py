"""GGUF files without loading their weights.

Metadata, vocabulary, special tokens, the context that fits this machine's memory, and
the check of llama.cpp's build for AMX.

Shared by every engine that runs GGUFs (llama.cpp, GPT4All, Ollama's model files).
"""

from __future__ import annotations

import logging
import struct
import warnings
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from langchain_localllms.core.imports import require

_log = logging.getLogger(__name__)


_VOCABS: dict[str, Any] = {}


def gguf_token_ids(path: Path, text: str) -> list[int]:
    """``text``'s token ids in the vocabulary of the GGUF file at ``path``.

    Loads only the vocabulary (no weights), once per file; for classes whose own
    runtime cannot tokenize (GPT4All, Ollama's server).
    """
    return list(vocab_of(path).tokenize(text.encode("utf-8"), add_bos=False, special=True))


def vocab_of(path: Path) -> Any:
    """The GGUF at ``path`` loaded with its vocabulary and metadata only, once per file."""
    key = str(path)
    vocab = _VOCABS.get(key)
    if vocab is None:
        llama_cpp = require("llama_cpp", feature="reading a GGUF model's vocabulary")
        vocab = _VOCABS[key] = llama_cpp.Llama(model_path=key, vocab_only=True, verbose=False)
        # Closed at exit while Python can still run llama-cpp-python's destructor.
        weakref.finalize(vocab, vocab.close)
    return vocab


def gguf_metadata(path: Path) -> dict[str, str]:
    """The GGUF metadata of the file at ``path``, read with its vocabulary only (once)."""
    return dict(vocab_of(path).metadata)


def gguf_special_tokens(path: Path) -> dict[str, Any]:
    """The start and end tokens of the GGUF file at ``path`` (see ``special_tokens``)."""
    return special_tokens_of(vocab_of(path)._model)


def special_tokens_of(vocab: Any) -> dict[str, Any]:
    """The BOS / EOS tokens' texts of a llama.cpp vocabulary, and whether BOS is added."""

    def text(token: int) -> str:
        return str(vocab.token_get_text(token)) if token >= 0 else ""

    return {
        "bos_token": text(vocab.token_bos()),
        "eos_token": text(vocab.token_eos()),
        "adds_bos": bool(vocab.add_bos_token()),
    }


#: Of the memory available, the most an ``n_ctx="auto"`` KV cache may take.
AUTO_CONTEXT_MEMORY_SHARE = 0.5


def auto_context(path: Path, *, kv_bytes: int) -> tuple[int, str]:
    """``n_ctx="auto"``: the model's trained context, capped by the memory available.

    Returns the context size and how it was chosen (for ``model_info`` and logs).
    ``kv_bytes`` is the size of one KV cache element (2 for float16, 4 for float32).
    """
    md = gguf_metadata(path)
    arch = md.get("general.architecture", "")
    trained = metadata_number(md, "context_length")
    if not trained:
        msg = (
            f"n_ctx='auto' needs the trained context from the GGUF metadata, and {path.name} "
            f"has no {arch}.context_length; give n_ctx as a number"
        )
        raise ValueError(msg)
    per_token = kv_bytes_per_token(md, kv_bytes)
    available = available_memory()
    if per_token and available:
        fits = int(available * AUTO_CONTEXT_MEMORY_SHARE // per_token) // 256 * 256
        if fits < trained:
            return max(fits, 256), (
                f"{max(fits, 256)} of the {trained} tokens it was trained for: a KV cache of "
                f"{per_token * trained / 2**20:.0f} MB would take more than half of the "
                f"{available / 2**20:.0f} MB available"
            )
    return trained, f"the {trained} tokens it was trained for"


def metadata_number(md: Mapping[str, str], key: str) -> int | None:
    """``<architecture>.<key>`` of GGUF metadata as a number (an array's first one)."""
    value = md.get(f"{md.get('general.architecture', '')}.{key}")
    try:
        return int(str(value).split(",")[0].strip("[] ")) if value is not None else None
    except ValueError:
        return None


def kv_bytes_per_token(md: Mapping[str, str], kv_bytes: float) -> int:
    """Bytes of KV cache one token takes, every layer at full size (an upper bound).

    ``md`` is the GGUF metadata; ``kv_bytes`` the size of one cache element (2 for
    float16, 4 for float32). 0 when the metadata does not say.
    """
    layers = metadata_number(md, "block_count") or 0
    heads = metadata_number(md, "attention.head_count") or 1
    kv_heads = metadata_number(md, "attention.head_count_kv") or heads
    head_dim = (metadata_number(md, "embedding_length") or 0) // heads
    keys = metadata_number(md, "attention.key_length") or head_dim
    values = metadata_number(md, "attention.value_length") or head_dim
    return int(layers * kv_heads * (keys + values) * kv_bytes)


def kv_element_bytes(llm: Any) -> float:
    """Bytes of one element of the instance's KV cache (by its ggml type)."""
    return {0: 4.0, 1: 2.0, 30: 2.0}.get(int(llm.context_params.type_k), 1.0)


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def warn_if_amx_build(llama_cpp: Any) -> None:
    """Warn once when llama.cpp was built with AMX kernels and this CPU has AMX.

    Those kernels crash on the first decode of K-quant weights (llama.cpp #20824).
    """
    global _AMX_CHECKED
    if _AMX_CHECKED:
        return
    _AMX_CHECKED = True
    info = llama_cpp.llama_print_system_info()
    info = info.decode(errors="replace") if isinstance(info, bytes) else str(info)
    if "AMX_INT8 = 1" in info and cpu_has_amx():
        warnings.warn(
            "this llama-cpp-python was built with llama.cpp's AMX kernels and this CPU has "
            "AMX: they crash (segmentation fault) on the first decode of K-quant models "
            "(llama.cpp #20824). Rebuild without them: "
            f"{REBUILD_WITHOUT_AMX}",
            RuntimeWarning,
            stacklevel=4,
        )


_AMX_CHECKED = False
#: The reinstall command for CPUs with AMX (docs/llamacpp.md gives it too).
REBUILD_WITHOUT_AMX = (
    'CFLAGS="-mno-amx-int8 -mno-amx-tile -mno-amx-bf16" '
    'CXXFLAGS="-mno-amx-int8 -mno-amx-tile -mno-amx-bf16" '
    "pip install --force-reinstall --no-deps --no-cache-dir --no-binary llama-cpp-python "
    "llama-cpp-python"
)


def cpu_has_amx() -> bool:
    """Whether this machine's CPU reports AMX (Linux ``/proc/cpuinfo``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_int8" in line.split()
    except OSError:
        pass
    return False


#: Sizes of GGUF's fixed-size metadata value types (by type id).
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_architecture(path: str) -> str | None:
    """``general.architecture`` from a GGUF file's header; None if it cannot be read.

    Reads the metadata up to that key (llama.cpp writes it first), never the weights.
    """
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF" or struct.unpack("<I", f.read(4))[0] < 2:
                return None
            _, n_kv = struct.unpack("<QQ", f.read(16))

            def string() -> bytes:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > 1 << 20:
                    raise ValueError(n)
                return f.read(n)

            for _ in range(min(n_kv, 64)):
                key = string()
                (kind,) = struct.unpack("<I", f.read(4))
                if kind == _GGUF_STRING:
                    value = string()
                    if key == b"general.architecture":
                        return value.decode("utf-8")
                elif kind in _GGUF_SIZES:
                    f.seek(_GGUF_SIZES[kind], 1)
                elif kind == _GGUF_ARRAY:
                    item, count = struct.unpack("<IQ", f.read(12))
                    if item not in _GGUF_SIZES:
                        return None  # an array of strings (the vocabulary): stop here
                    f.seek(_GGUF_SIZES[item] * count, 1)
                else:
                    return None
    except (OSError, ValueError, struct.error, UnicodeDecodeError):
        return None
    return None
