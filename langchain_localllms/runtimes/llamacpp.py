"""llama.cpp in this process, through llama-cpp-python: load, tokenize, generate.

One :class:`LlamaCppEngine` per loaded GGUF, shared by an LLM instance, its copies
and the chat class over the same model. Every model's generation runs on the one
llama.cpp thread of the process (:class:`~langchain_localllms._native.NativeThread`):
one OpenMP pool, and no pattern of use can wait on itself.

Single calls run in the ``llama_cpp.Llama``'s own context and keep its KV cache: a
prompt that shares a prefix with the previous one skips that prefix's prefill, where
the result is exactly a cold prefill's (:func:`reusable_length`). Batches run in a
second context with one KV stream per sequence (:class:`_Slots`): up to ``parallel``
prompts decode in each ``llama_decode``, and a finished one frees its sequence for
the next prompt.
"""

from __future__ import annotations

import codecs
import collections
import ctypes
import functools
import inspect
import logging
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from langchain_localllms._base import Echo, Row
from langchain_localllms._imports import require
from langchain_localllms._native import Emit, SharedModel, current_cancel
from langchain_localllms._stop import StopStream
from langchain_localllms._usage import Tally
from langchain_localllms.errors import ContextOverflowError
from langchain_localllms.grammars import Grammar

_log = logging.getLogger(__name__)

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
        repack: Let llama.cpp repack weights for its CPU matrix kernels (``CPU_REPACK``:
            q4_0, q4_K, iq4_nl, ...), and decode all of a batch's sequences in each
            ``llama_decode``. False: keep the weights as in the file and decode at most
            :data:`EXACT_ROWS` sequences per ``llama_decode``, so that every sequence
            is computed exactly as a single call (repacked kernels round rows taken
            four at a time otherwise than one token's row, and wider batches change
            llama.cpp's arithmetic for some rows).
    """

    def __init__(self, path: Path, load_kwargs: Mapping[str, Any], *, repack: bool = True) -> None:
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
            llm = (llama_cpp.Llama if repack else _unrepacked())(
                model_path=str(path), **load_kwargs
            )
        except ValueError as e:
            msg = (
                f"llama.cpp could not load {path}: {e}. The file may be truncated, "
                "of an architecture this llama-cpp-python build does not know, or "
                "need more memory than is free; run with verbose=True for the reason."
            )
            raise ValueError(msg) from e
        self.path = path
        self.verbose = bool(load_kwargs.get("verbose"))
        # The batch context (see _Slots) is freed before the model it was made from.
        self._slots_box: list[_Slots] = []
        # Freed when the last holder goes, and at the latest at exit, before Python
        # tears down the modules llama-cpp-python's destructor needs.
        self.shared = SharedModel(
            llm,
            functools.partial(_close_model, self._slots_box, llm.close),
            runtime="llamacpp",
            name=f"LlamaCpp model {path.name}",
        )
        arch = llm.metadata.get("general.architecture", "")
        self.sliding_window = f"{arch}.attention.sliding_window" in llm.metadata
        self._grammars: dict[str, Any] = {}
        #: Prompt tokens evaluated per llama_decode, in chunks at fixed positions (one
        #: physical batch each): see prefill_chunks and PREFILL_CHUNK.
        self.chunk = max(1, min(llm.n_batch, int(llm.context_params.n_ubatch), PREFILL_CHUNK))
        #: Whether a shared prefix may come from the KV cache at all: not on recurrent
        #: models (their state cannot be cut back), nor on a sliding-window cache that
        #: drops what falls out of the window (swa_full=False).
        model = llm._model.model
        self.reusable = not (
            llama_cpp.llama_model_is_recurrent(model)
            or llama_cpp.llama_model_is_hybrid(model)
            or (self.sliding_window and not llm.context_params.swa_full)
        )
        #: The prompt tokens at the start of the instance's own context whose KV a
        #: later prompt may reuse (only what a cold prefill would compute alike).
        self._cached: list[int] = []
        #: Prompt tokens evaluated so far, single calls and batches (not those reused).
        self.prefilled = 0
        #: The most sequences one batch ``llama_decode`` advances (0: all of them).
        self.rows_per_decode = 0 if repack else EXACT_ROWS

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
            return _special_tokens(llm._model)

    def grammar(self, g: Grammar) -> Any:
        """The ``LlamaGrammar`` of ``g`` (compiled once)."""
        cached = self._grammars.get(g.identity)
        if cached is None:
            llama_grammar = require("llama_cpp.llama_grammar", feature="LlamaCpp")
            cached = llama_grammar.LlamaGrammar.from_string(g.gbnf, verbose=self.verbose)
            self._grammars[g.identity] = cached
        return cached

    def pieces(
        self, prompt: str, p: Mapping[str, Any], tally: Tally, *, reuse: bool = True
    ) -> Iterator[str]:
        """Generate for one prompt with sampling parameters ``p``, piece by piece.

        ``reuse``: take the KV of a prefix this prompt shares with the last prompt of
        the instance's context from the cache, where that is exact.
        """
        with self.shared.use() as llm:
            yield from self._pieces(llm, prompt, p, tally, reuse)

    def _tokens(self, llm: Any, prompt: str, p: Mapping[str, Any]) -> tuple[list[int], int]:
        """The prompt's tokens and how many may follow them (ContextOverflowError)."""
        tokens = list(llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True))
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
        return tokens, limit

    def _pieces(
        self, llm: Any, prompt: str, p: Mapping[str, Any], tally: Tally, reuse: bool
    ) -> Iterator[str]:
        llama_cpp = require("llama_cpp")
        tokens, limit = self._tokens(llm, prompt, p)
        grammar = self.grammar(p["grammar"]) if p["grammar"] is not None else None
        tally.prompt_tokens = len(tokens)
        if p["echo"]:
            yield Echo(prompt)

        def work(emit: Emit) -> None:
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            sampler = _sampler(llm, p, grammar)
            try:
                cached = self._prefill(llm, tokens, emit, reuse)
                if cached is None:
                    return  # the caller gave up during the prompt
                tally.extra["cached_tokens"] = cached
                tally.finish_reason = "length"
                n = 0
                while True:
                    token = sampler.sample(llm._ctx, -1)
                    if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
                        tally.finish_reason = "stop"
                        break
                    n += 1
                    # One item per token, text or not, so the reader counts exactly
                    # the tokens it took.
                    if not emit((1, decoder.decode(llm.detokenize([token])))) or n >= limit:
                        break
                    llm.eval([token])
                tail = decoder.decode(b"", final=True)
                if tail:
                    emit((0, tail))
            except BaseException:
                self._forget(llm)  # a half-done step must not look like a cached prefix
                raise
            finally:
                sampler.close()

        for n, text in self.shared.stream(work):
            tally.completion_tokens += n
            if text:
                yield text

    def _forget(self, llm: Any) -> None:
        """Drop what the instance's context holds: the next prompt starts cold."""
        self._cached = []
        llm.reset()

    def _prefill(self, llm: Any, tokens: list[int], emit: Emit, reuse: bool) -> int | None:
        """Evaluate the prompt in the instance's context, reusing what is exact.

        The KV of a prefix shared with the last prompt stays where a cold prefill
        would compute it alike (:func:`reusable_length`); the rest is evaluated in
        :func:`prefill_chunks`, one ``llama_decode`` each. Returns how many tokens came
        from the cache, or None when the reader went away in between (a cancelled
        call stops within one step).
        """
        cached = self._cached
        keep = 0
        if (
            reuse
            and self.reusable
            and cached
            and llm.n_tokens >= len(cached)
            and llm.input_ids[: len(cached)].tolist() == cached
        ):
            keep = reusable_length(cached, tokens, self.chunk)
        self._cached = []
        if keep and not llm._ctx.kv_cache_seq_rm(0, keep, -1):
            keep = 0  # this cache cannot be cut back: start clean
        if not keep:
            llm.reset()
        llm.n_tokens = keep  # eval drops the cache after this position
        for start, end in prefill_chunks(keep, len(tokens), self.chunk):
            if not emit.wanted():
                self._forget(llm)
                return None
            llm.eval(tokens[start:end])
        self._cached = tokens[: canonical_length(len(tokens), self.chunk)]
        self.prefilled += len(tokens) - keep
        return keep

    # ------------------------------------------------------------------ batches
    def rows(
        self,
        prompts: list[str],
        p: Mapping[str, Any],
        stops: list[str],
        *,
        parallel: int,
        reuse: bool = True,
    ) -> list[Row] | None:
        """Generate for many prompts as sequences of one llama.cpp context.

        Up to ``parallel`` prompts decode together, one token each per
        ``llama_decode``; a prompt that ends frees its sequence for the next
        (continuous batching). Each sequence has its own sampler chain (grammar,
        penalties, seed), the prompt and token limits of a single call, and ends at
        its first stop sequence. None when not even one sequence fits in the memory
        available (the caller then generates one prompt at a time).

        Raises:
            ContextOverflowError: A prompt does not fit the context (before any
                decoding).
        """
        with self.shared.use() as llm:
            jobs = []
            for prompt in prompts:
                tokens, limit = self._tokens(llm, prompt, p)
                jobs.append(_Sequence(tokens, limit, stops, prefix=prompt if p["echo"] else ""))
            grammar = self.grammar(p["grammar"]) if p["grammar"] is not None else None
            width = min(parallel, len(jobs), llm.n_batch, _MAX_SEQUENCES)
            need = max(len(j.tokens) + j.limit for j in jobs)
            cancel = current_cancel()

            def work() -> bool:
                slots = self._slots(llm, width, need)
                if slots is None:
                    return False
                _run(llm, slots, jobs, p, grammar, self, reuse, cancel)
                return True

            if not self.shared.run(work):
                return None
        return [Row(j.pieces, j.tally, prefix=j.prefix) for j in jobs]

    def _slots(self, llm: Any, width: int, need: int) -> _Slots | None:
        """The batch context, with at least ``width`` sequences of ``need`` tokens.

        Made on first use and kept (its KV serves later batches' shared prefixes);
        made anew, larger, when a batch needs more. None when it would take more
        than half the memory available at one sequence already.
        """
        box = self._slots_box
        have = box[0] if box else None
        if have is not None and have.n_seq >= width and have.n_ctx_seq >= need:
            return have
        if have is not None:
            width, need = max(width, have.n_seq), max(need, have.n_ctx_seq)
            box.clear()
            have.close()
        n_ctx_seq = -(-need // 256) * 256
        per_seq = kv_bytes_per_token(llm.metadata, _kv_element_bytes(llm)) * n_ctx_seq
        available = _available_memory()
        if per_seq and available:
            fits = int(available * AUTO_CONTEXT_MEMORY_SHARE // per_seq)
            if fits < width:
                _log.info(
                    "LlamaCpp %s: a batch of %d sequences of %d tokens would take more than "
                    "half the memory available; %d fit",
                    self.path.name,
                    width,
                    n_ctx_seq,
                    fits,
                )
                width = fits
        if width < 1:
            return None
        slots = _Slots(llm, width, n_ctx_seq, verbose=self.verbose)
        box.append(slots)
        return slots


_UNREPACKED: list[type] = []


def _unrepacked() -> type:
    """``llama_cpp.Llama`` loading weights without llama.cpp's repacked CPU layouts.

    ``Llama`` has no argument for ``llama_model_params.use_extra_bufts``; it sets the
    model parameters on ``self.model_params`` before loading, so this subclass clears
    the flag there.
    """
    if not _UNREPACKED:
        llama_cpp = require("llama_cpp")

        class UnrepackedLlama(llama_cpp.Llama):  # type: ignore[misc,name-defined]
            """``llama_cpp.Llama`` whose weights stay in their file layout."""

            @property
            def model_params(self) -> Any:
                return self.__dict__["model_params"]

            @model_params.setter
            def model_params(self, value: Any) -> None:
                value.use_extra_bufts = False
                self.__dict__["model_params"] = value

        _UNREPACKED.append(UnrepackedLlama)
    return _UNREPACKED[0]


def _close_model(slots_box: list[_Slots], close_model: Callable[[], Any]) -> None:
    """Free the batch context, then the model it was made from."""
    while slots_box:
        slots_box.pop().close()
    close_model()


def _sampler(llm: Any, p: Mapping[str, Any], grammar: Any) -> Any:
    """A sampler chain for one sequence, built exactly as ``Llama.generate`` builds it."""
    llama_cpp = require("llama_cpp")
    llm.set_seed(p["seed"] if p["seed"] >= 0 else llama_cpp.LLAMA_DEFAULT_SEED)
    return llm._init_sampler(
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


# ------------------------------------------------------------ exact prefix reuse
# llama.cpp does not compute a token alike in every batch: its CPU kernels pick their
# path and tiling by the number of tokens in a llama_decode (a batch of one takes the
# vector path; repacked K-quants take a GEMM for rows in whole groups of four), and a
# token's KV differs, by up to ~0.75 in Gemma-3-270M Q4_K_M's logits, depending on
# where a prompt was split. So every prompt is evaluated in the same chunks, cut at
# fixed positions (multiples of the chunk size), and only whole chunks are reused:
# each chunk is then computed from the same tokens, positions and earlier KV as in a
# cold prefill, and the answer is a cold call's whatever the kernels do.

#: The most prompt tokens per llama_decode: 256 evaluate as fast as 512 here (Gemma-3-
#: 270M, 2 cores, 450-token prompt: 791 vs 790 tokens/s median of 14, interleaved;
#: 128: 734), and a shared prefix is reused in whole chunks of this size.
PREFILL_CHUNK = 256


def prefill_chunks(start: int, end: int, chunk: int) -> list[tuple[int, int]]:
    """The ``llama_decode`` calls that evaluate tokens ``start..end``: ``[a, b)`` pairs.

    Boundaries sit at multiples of ``chunk`` (and at ``start`` and ``end``), so where a
    token lands depends on its position, not on how much of the prompt was cached.
    """
    if chunk < 1:
        msg = f"chunk must be at least 1, got {chunk}"
        raise ValueError(msg)
    out = []
    a = start
    while a < end:
        b = min((a // chunk + 1) * chunk, end)
        out.append((a, b))
        a = b
    return out


def canonical_length(n: int, chunk: int) -> int:
    """How many leading tokens of a prompt of ``n``, just prefilled, a later one may reuse.

    Those of its whole chunks: the last, partial one is computed in a batch of its
    own size, which a longer prompt's cold prefill would not use.
    """
    return n - n % chunk


def reusable_length(cached: Sequence[int], tokens: Sequence[int], chunk: int) -> int:
    """How many leading ``tokens`` may keep the KV computed for ``cached``, exactly.

    ``cached`` holds only whole chunks (:func:`canonical_length`). The cut is at a
    chunk boundary, before the first token that differs, and leaves at least one
    token to evaluate (its logits give the first answer token).
    """
    common = 0
    for a, b in zip(cached, tokens, strict=False):
        if a != b:
            break
        common += 1
    keep = min(common, len(tokens) - 1)
    return max(0, keep - keep % chunk)


# --------------------------------------------------------------- batch decoding
#: Sequences per llama_decode that give every row exactly a single call's logits, on
#: weights that are not repacked: measured bitwise on Gemma-3-270M Q4_K_M up to 7 rows
#: (8 and more differ for some sequences); repacked q4_K weights differ from 4 on.
EXACT_ROWS = 4
#: The most sequences llama.cpp decodes in one context (LLAMA_MAX_SEQ).
_MAX_SEQUENCES = 256
#: A shared prefix is copied from another sequence's KV when it saves this many
#: prompt tokens more than what the free sequence holds itself.
COPY_MIN_TOKENS = 32


class _Sequence:
    """One prompt of a batch: its tokens, sampler, pieces and usage so far."""

    def __init__(self, tokens: list[int], limit: int, stops: list[str], prefix: str) -> None:
        self.tokens = tokens
        self.limit = limit
        self.prefix = prefix
        self.pieces: list[str] = []
        self.tally = Tally(prompt_tokens=len(tokens))
        self.watch = StopStream(stops)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.seq = -1
        self.n_past = 0
        self.last = -1
        self.sampler: Any = None
        self.done = False


class _Slots:
    """A llama.cpp context for batches: ``n_seq`` sequences, each a KV stream of its own.

    Its parameters are the instance context's (threads, KV types, attention), but
    for ``n_seq_max`` and a KV cache that is not unified: each sequence's cells are
    laid out as in a context of its own, so its attention adds up alike. It keeps,
    per sequence, the prompt tokens whose KV a later prompt may reuse.
    """

    def __init__(self, llm: Any, n_seq: int, n_ctx_seq: int, *, verbose: bool) -> None:
        llama_cpp = require("llama_cpp")
        internals = require("llama_cpp._internals")
        params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
        params.n_seq_max = n_seq
        params.kv_unified = False
        params.n_ctx = n_seq * n_ctx_seq
        self.context = internals.LlamaContext(model=llm._model, params=params, verbose=verbose)
        try:
            adapter = getattr(llm, "_lora_adapter", None)
            if adapter is not None:
                adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
                scales = (ctypes.c_float * 1)(llm.lora_scale)
                if llama_cpp.llama_set_adapters_lora(self.context.ctx, adapters, 1, scales):
                    msg = f"llama.cpp could not apply the LoRA adapter {llm.lora_path} to a batch"
                    raise RuntimeError(msg)
            self.capacity = max(n_seq, int(params.n_batch))
            self.batch = llama_cpp.llama_batch_init(self.capacity, 0, 1)
        except BaseException:
            self.context.close()
            raise
        self.n_seq = n_seq
        self.n_ctx_seq = n_ctx_seq
        self.memory = self.context.memory
        self.cached: list[list[int]] = [[] for _ in range(n_seq)]
        self._closed = False

    def close(self) -> None:
        """Free the context (once)."""
        if self._closed:
            return
        self._closed = True
        require("llama_cpp").llama_batch_free(self.batch)
        self.context.close()

    def decode(self, items: Sequence[tuple[int, int, int, bool]]) -> None:
        """One ``llama_decode`` of ``(token, position, sequence, wants_logits)`` rows."""
        llama_cpp = require("llama_cpp")
        if not 0 < len(items) <= self.capacity:
            msg = f"a batch of {len(items)} tokens does not fit the {self.capacity} allocated"
            raise ValueError(msg)
        b = self.batch
        for i, (token, pos, seq, logits) in enumerate(items):
            if not 0 <= seq < self.n_seq:  # llama.cpp would abort the process
                msg = f"sequence {seq} outside 0..{self.n_seq - 1}"
                raise ValueError(msg)
            b.token[i] = token
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = logits
        b.n_tokens = len(items)
        rc = llama_cpp.llama_decode(self.context.ctx, b)
        if rc != 0:
            self.forget()
            msg = (
                f"llama_decode failed ({rc}) on a batch of {len(items)} tokens; run with "
                "verbose=True for llama.cpp's reason"
            )
            raise RuntimeError(msg)

    def clear(self, seq: int, keep: int) -> None:
        """Drop sequence ``seq``'s KV from position ``keep`` on."""
        llama_cpp = require("llama_cpp")
        if not llama_cpp.llama_memory_seq_rm(self.memory, seq, keep if keep else -1, -1):
            msg = f"llama.cpp could not cut sequence {seq} back to {keep} tokens"
            raise RuntimeError(msg)

    def copy(self, src: int, dst: int) -> None:
        """Make ``dst``'s KV a copy of ``src``'s, whole (done at the next decode)."""
        if src != dst:
            require("llama_cpp").llama_memory_seq_cp(self.memory, src, dst, -1, -1)
            self.cached[dst] = self.cached[src]

    def forget(self) -> None:
        """Drop every sequence's KV (after a failure nothing cached is trusted)."""
        require("llama_cpp").llama_memory_clear(self.memory, True)
        self.cached = [[] for _ in range(self.n_seq)]


def _run(
    llm: Any,
    slots: _Slots,
    jobs: list[_Sequence],
    p: Mapping[str, Any],
    grammar: Any,
    engine: LlamaCppEngine,
    reuse: bool,
    cancel: Any,
) -> None:
    """Continuous batching of ``jobs`` on ``slots`` (on the llama.cpp thread)."""
    llama_cpp = require("llama_cpp")
    vocab = llm._model.vocab
    ctx = slots.context.ctx
    pending = collections.deque(jobs)
    free = list(range(slots.n_seq))
    active: list[_Sequence] = []

    def advance(job: _Sequence, index: int) -> None:
        """Sample the job's next token from row ``index`` of the last decode."""
        token = llama_cpp.llama_sampler_sample(job.sampler.sampler, ctx, index)
        if job.tally.first_piece is None:
            job.tally.first_piece = time.perf_counter()
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            job.tally.finish_reason = "stop"
            job.done = True
        else:
            job.pieces.append(job.decoder.decode(llm.detokenize([token])))
            job.tally.completion_tokens += 1
            job.watch.push(job.pieces[-1])
            job.last = token
            job.done = job.tally.completion_tokens >= job.limit or job.watch.stopped
        if job.done:
            job.tally.completion_ms = (time.perf_counter() - job.tally.first_piece) * 1e3
            tail = job.decoder.decode(b"", final=True)
            if tail and job.pieces:
                job.pieces[-1] += tail
            job.sampler.close()
            job.sampler = None

    def admit(job: _Sequence) -> None:
        """Give the job a free sequence, evaluate its prompt, sample its first token."""
        job.tally.started = time.perf_counter()
        job.tally.finish_reason = "length"
        seq, keep, src = free[0], 0, -1
        if reuse and engine.reusable:
            chunk = engine.chunk
            for s in free:  # what a free sequence still holds
                k = reusable_length(slots.cached[s], job.tokens, chunk)
                if k > keep:
                    seq, keep = s, k
            for s in range(slots.n_seq):  # what another sequence holds, copied
                k = reusable_length(slots.cached[s], job.tokens, chunk)
                if k >= keep + COPY_MIN_TOKENS:
                    src, keep = s, k
            if src >= 0 and src != seq:
                seq = min(free, key=lambda s: len(slots.cached[s]))
                slots.copy(src, seq)
        free.remove(seq)
        job.seq = seq
        job.sampler = _sampler(llm, p, grammar)
        slots.cached[seq] = []
        slots.clear(seq, keep)
        job.tally.extra["cached_tokens"] = keep
        n = len(job.tokens)
        last = 0
        for start, end in prefill_chunks(keep, n, engine.chunk):
            if cancel is not None and cancel.is_set:
                return
            rows = [(job.tokens[i], i, seq, i == n - 1) for i in range(start, end)]
            slots.decode(rows)
            last = end - start - 1
        slots.cached[seq] = job.tokens[: canonical_length(n, engine.chunk)]
        engine.prefilled += n - keep
        job.n_past = n
        advance(job, last)
        if job.done:
            free.append(seq)
        else:
            active.append(job)

    try:
        while pending or active:
            if cancel is not None and cancel.is_set:
                return  # the caller gave up: nobody reads the rows
            while pending and free:
                admit(pending.popleft())
            if not active:
                continue
            step = list(active)
            width = engine.rows_per_decode or len(step)
            for first in range(0, len(step), width):
                part = step[first : first + width]
                slots.decode([(j.last, j.n_past, j.seq, True) for j in part])
                for i, job in enumerate(part):
                    job.n_past += 1
                    advance(job, i)
                    if job.done:
                        active.remove(job)
                        free.append(job.seq)
    except BaseException:
        slots.forget()
        raise
    finally:
        for job in jobs:
            if job.sampler is not None:
                job.sampler.close()
                job.sampler = None


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


def gguf_special_tokens(path: Path) -> dict[str, Any]:
    """The start and end tokens of the GGUF file at ``path`` (see ``special_tokens``)."""
    return _special_tokens(_vocab(path)._model)


def _special_tokens(vocab: Any) -> dict[str, Any]:
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
    trained = _metadata_number(md, "context_length")
    if not trained:
        msg = (
            f"n_ctx='auto' needs the trained context from the GGUF metadata, and {path.name} "
            f"has no {arch}.context_length; give n_ctx as a number"
        )
        raise ValueError(msg)
    per_token = kv_bytes_per_token(md, kv_bytes)
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


def _metadata_number(md: Mapping[str, str], key: str) -> int | None:
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
    layers = _metadata_number(md, "block_count") or 0
    heads = _metadata_number(md, "attention.head_count") or 1
    kv_heads = _metadata_number(md, "attention.head_count_kv") or heads
    head_dim = (_metadata_number(md, "embedding_length") or 0) // heads
    keys = _metadata_number(md, "attention.key_length") or head_dim
    values = _metadata_number(md, "attention.value_length") or head_dim
    return int(layers * kv_heads * (keys + values) * kv_bytes)


def _kv_element_bytes(llm: Any) -> float:
    """Bytes of one element of the instance's KV cache (by its ggml type)."""
    return {0: 4.0, 1: 2.0, 30: 2.0}.get(int(llm.context_params.type_k), 1.0)


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
