"""llama.cpp in this process, through llama-cpp-python: load, tokenize, generate.

One :class:`LlamaCppEngine` per loaded GGUF, shared by an LLM instance, its copies
and the chat class over the same model. Every model's generation runs on the one
llama.cpp thread of the process (:class:`~langchain_localllms._native.NativeThread`):
one OpenMP pool, and no pattern of use can wait on itself.
"""

from __future__ import annotations

import codecs
import inspect
import warnings
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from langchain_localllms._base import Echo
from langchain_localllms._imports import require
from langchain_localllms._native import Emit, SharedModel
from langchain_localllms._usage import Tally
from langchain_localllms.errors import ContextOverflowError
from langchain_localllms.grammars import Grammar

__all__ = [
    "REBUILD_WITHOUT_AMX",
    "LlamaCppEngine",
    "auto_context",
    "cpu_has_amx",
    "gguf_metadata",
    "gguf_token_ids",
    "warn_if_amx_build",
]


class LlamaCppEngine:
    """A GGUF model loaded by llama-cpp-python.

    Args:
        path: The GGUF file (already checked).
        load_kwargs: Arguments of ``llama_cpp.Llama`` (checked against its signature).
    """

    def __init__(self, path: Path, load_kwargs: Mapping[str, Any]) -> None:
        llama_cpp = require("llama_cpp", feature="LlamaCpp")
        accepted = set(inspect.signature(llama_cpp.Llama.__init__).parameters) - {
            "self", "model_path", "kwargs"
        }  # fmt: skip
        unknown = sorted(set(load_kwargs) - accepted)
        if unknown:
            msg = f"model_kwargs has keys llama_cpp.Llama does not take: {', '.join(unknown)}"
            raise ValueError(msg)
        if load_kwargs.get("vocab_only"):
            msg = "vocab_only=True loads no weights, so nothing could be generated"
            raise ValueError(msg)
        warn_if_amx_build(llama_cpp)
        load_kwargs = dict(load_kwargs)
        if load_kwargs.get("seed") is None:
            load_kwargs["seed"] = llama_cpp.LLAMA_DEFAULT_SEED  # a random one
        try:
            llm = llama_cpp.Llama(model_path=str(path), **load_kwargs)
        except ValueError as e:
            msg = (
                f"llama.cpp could not load {path}: {e}. The file may be truncated, "
                "of an architecture this llama-cpp-python build does not know, or "
                "need more memory than is free; run with verbose=True for the reason."
            )
            raise ValueError(msg) from e
        self.path = path
        self.verbose = bool(load_kwargs.get("verbose"))
        # Freed when the last holder goes, and at the latest at exit, before Python
        # tears down the modules llama-cpp-python's destructor needs.
        self.shared = SharedModel(
            llm, llm.close, runtime="llamacpp", name=f"LlamaCpp model {path.name}"
        )
        arch = llm.metadata.get("general.architecture", "")
        self.sliding_window = f"{arch}.attention.sliding_window" in llm.metadata
        self._grammars: dict[str, Any] = {}

    @property
    def llm(self) -> Any:
        """The ``llama_cpp.Llama``."""
        return self.shared.model

    def close(self) -> None:
        """Free the model (at once, or when the running call ends)."""
        self.shared.close()

    def token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` in this model's vocabulary."""
        with self.shared.use() as llm:
            return list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def special_tokens(self) -> dict[str, Any]:
        """The start and end tokens' text, and whether a prompt starts with one."""
        with self.shared.use() as llm:
            vocab = llm._model

            def text(token: int) -> str:
                return str(vocab.token_get_text(token)) if token >= 0 else ""

            return {
                "bos_token": text(vocab.token_bos()),
                "eos_token": text(vocab.token_eos()),
                "adds_bos": bool(vocab.add_bos_token()),
            }

    def grammar(self, g: Grammar) -> Any:
        """The ``LlamaGrammar`` of ``g`` (compiled once)."""
        cached = self._grammars.get(g.identity)
        if cached is None:
            llama_grammar = require("llama_cpp.llama_grammar", feature="LlamaCpp")
            cached = llama_grammar.LlamaGrammar.from_string(g.gbnf, verbose=self.verbose)
            self._grammars[g.identity] = cached
        return cached

    def pieces(self, prompt: str, p: Mapping[str, Any], tally: Tally) -> Iterator[str]:
        """Generate for one prompt with sampling parameters ``p``, piece by piece."""
        with self.shared.use() as llm:
            yield from self._pieces(llm, prompt, p, tally)

    def _pieces(self, llm: Any, prompt: str, p: Mapping[str, Any], tally: Tally) -> Iterator[str]:
        llama_cpp = require("llama_cpp")
        tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        if not tokens:
            msg = "the prompt is empty and this model adds no start token; give a prompt"
            raise ValueError(msg)
        n_ctx = min(llm.n_ctx(), len(llm.input_ids))  # llama.cpp may pad n_ctx
        room = n_ctx - len(tokens)
        if room <= 0:
            msg = (
                f"the prompt is {len(tokens)} tokens but the context holds {n_ctx}: "
                "shorten the prompt or load the model with a larger n_ctx (n_ctx='auto': "
                "the context it was trained for)"
            )
            raise ContextOverflowError(msg, prompt_tokens=len(tokens), context=n_ctx)
        limit = room if not p["max_tokens"] or p["max_tokens"] <= 0 else min(p["max_tokens"], room)
        grammar = self.grammar(p["grammar"]) if p["grammar"] is not None else None
        tally.prompt_tokens = len(tokens)
        if p["echo"]:
            yield Echo(prompt)

        def work(emit: Emit) -> None:
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            if self.sliding_window:
                # llama-cpp-python's KV prefix reuse corrupts sliding-window caches
                # (Gemma 2/3): a repeated prompt then decodes differently. Start clean.
                llm.reset()
            llm.set_seed(p["seed"] if p["seed"] >= 0 else llama_cpp.LLAMA_DEFAULT_SEED)
            if not _prefill(llm, tokens, emit):
                return  # the caller gave up during the prompt
            steps = llm.generate(
                tokens,
                top_k=p["top_k"],
                top_p=p["top_p"],
                min_p=p["min_p"],
                typical_p=p["typical_p"],
                temp=p["temperature"],
                repeat_penalty=p["repeat_penalty"],
                frequency_penalty=p["frequency_penalty"],
                presence_penalty=p["presence_penalty"],
                mirostat_mode=p["mirostat_mode"],
                mirostat_tau=p["mirostat_tau"],
                mirostat_eta=p["mirostat_eta"],
                grammar=grammar,
            )
            try:
                tally.finish_reason = "length"
                for n, token in enumerate(steps, 1):
                    if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
                        tally.finish_reason = "stop"
                        break
                    # One item per token, text or not, so the reader counts exactly
                    # the tokens it took.
                    if not emit((1, decoder.decode(llm.detokenize([token])))) or n >= limit:
                        break
                tail = decoder.decode(b"", final=True)
                if tail:
                    emit((0, tail))
            finally:
                steps.close()

        for n, text in self.shared.stream(work):
            tally.completion_tokens += n
            if text:
                yield text


def _prefill(llm: Any, tokens: list[int], emit: Emit) -> bool:
    """Evaluate the prompt but its last token, ``n_batch`` at a time.

    False when the reader went away in between: a cancelled call stops within one
    step. Only prompts longer than one step are evaluated here; ``generate`` then finds them
    in the cache and evaluates the last token, as it would have done itself.
    """
    done = llm.n_tokens
    cached = llm.input_ids[:done].tolist()
    prefix = 0
    for a, b in zip(cached, tokens[:-1], strict=False):
        if a != b:
            break
        prefix += 1
    end = len(tokens) - 1
    if end - prefix <= llm.n_batch:
        return emit.wanted()
    llm.n_tokens = prefix  # eval drops the cache after this position
    for start in range(prefix, end, llm.n_batch):
        if not emit.wanted():
            llm.reset()  # a half-read prompt must not look like a cached prefix
            return False
        llm.eval(tokens[start : min(start + llm.n_batch, end)])
    return True


_VOCABS: dict[str, Any] = {}


def gguf_token_ids(path: Path, text: str) -> list[int]:
    """``text``'s token ids in the vocabulary of the GGUF file at ``path``.

    Loads only the vocabulary (no weights), once per file; for classes whose own
    runtime cannot tokenize (GPT4All, Ollama's server).
    """
    return list(_vocab(path).tokenize(text.encode("utf-8"), add_bos=False, special=True))


def _vocab(path: Path) -> Any:
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
    return dict(_vocab(path).metadata)


#: Of the memory available, the most an ``n_ctx="auto"`` KV cache may take.
AUTO_CONTEXT_MEMORY_SHARE = 0.5


def auto_context(path: Path, *, kv_bytes: int) -> tuple[int, str]:
    """``n_ctx="auto"``: the model's trained context, capped by the memory available.

    Returns the context size and how it was chosen (for ``model_info`` and logs).
    ``kv_bytes`` is the size of one KV cache element (2 for float16, 4 for float32).
    """
    md = gguf_metadata(path)
    arch = md.get("general.architecture", "")

    def number(key: str) -> int | None:
        value = md.get(f"{arch}.{key}")
        try:
            return int(str(value).split(",")[0].strip("[] ")) if value is not None else None
        except ValueError:
            return None

    trained = number("context_length")
    if not trained:
        msg = (
            f"n_ctx='auto' needs the trained context from the GGUF metadata, and {path.name} "
            f"has no {arch}.context_length; give n_ctx as a number"
        )
        raise ValueError(msg)
    layers = number("block_count") or 0
    heads = number("attention.head_count") or 1
    kv_heads = number("attention.head_count_kv") or heads
    head_dim = (number("embedding_length") or 0) // heads
    per_token = (
        layers
        * kv_heads
        * (
            (number("attention.key_length") or head_dim)
            + (number("attention.value_length") or head_dim)
        )
        * kv_bytes
    )
    available = _available_memory()
    if per_token and available:
        fits = int(available * AUTO_CONTEXT_MEMORY_SHARE // per_token) // 256 * 256
        if fits < trained:
            return max(fits, 256), (
                f"{max(fits, 256)} of the {trained} tokens it was trained for: a KV cache of "
                f"{per_token * trained / 2**20:.0f} MB would take more than half of the "
                f"{available / 2**20:.0f} MB available"
            )
    return trained, f"the {trained} tokens it was trained for"


def _available_memory() -> int | None:
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
