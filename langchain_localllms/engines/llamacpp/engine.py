"""llama.cpp in this process, through llama-cpp-python: load, tokenize, generate.

One :class:`LlamaCppEngine` per loaded GGUF, shared by an LLM instance, its copies
and the chat class over the same model. Every model's generation runs on the one
llama.cpp thread of the process (:class:`~langchain_localllms.core.threads.NativeThread`):
one OpenMP pool, and no pattern of use can wait on itself.

Single calls run in the ``llama_cpp.Llama``'s own context and keep its KV cache: a
prompt that shares a prefix with the previous one skips that prefix's prefill, where
the result is exactly a cold prefill's (:func:`reusable_length`). Batches run in a
second context with one KV stream per sequence (:class:`Slots`): up to ``parallel``
prompts decode in each ``llama_decode``, and a finished one frees its sequence for
the next prompt (:class:`Batcher`). A single call that starts while another call of
the model runs joins that batch as one more sequence, from any thread or task; a call
running alone moves into the batch when others come to join it in its first tokens.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import inspect
import logging
import threading
import warnings
from collections.abc import Callable, Generator, Iterator, Mapping
from pathlib import Path
from typing import Any

from langchain_localllms.core.errors import ContextOverflowError
from langchain_localllms.core.events import Echo, Row, Tally
from langchain_localllms.core.imports import require
from langchain_localllms.core.requests import Call
from langchain_localllms.core.threads import Emit, SharedModel
from langchain_localllms.engines.gguf import (
    AUTO_CONTEXT_MEMORY_SHARE,
    available_memory,
    kv_bytes_per_token,
    kv_element_bytes,
    special_tokens_of,
    warn_if_amx_build,
)
from langchain_localllms.engines.llamacpp.batching import REPLAY_MAX, Batcher
from langchain_localllms.engines.llamacpp.prefix import (
    PREFILL_CHUNK,
    canonical_length,
    prefill_chunks,
    reusable_length,
)
from langchain_localllms.engines.llamacpp.sampling import checked_grammar, forced_run, make_sampler
from langchain_localllms.engines.llamacpp.slots import EXACT_ROWS, BatchSequence, NoRoom, Slots
from langchain_localllms.grammars import Grammar
from langchain_localllms.grammars.guidance import Guide

_log = logging.getLogger(__name__)

__all__ = ["LlamaCppEngine"]


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
        llm = _load(llama_cpp, path, load_kwargs, repack=repack)
        self.path = path
        self.verbose = bool(load_kwargs.get("verbose"))
        # The batch context (see Slots) is freed before the model it was made from.
        self._slots_box: list[Slots] = []
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
        self._grammar_lock = threading.Lock()
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
        self.batcher = Batcher(self)

    @property
    def llm(self) -> Any:
        """The ``llama_cpp.Llama``."""
        return self.shared.model

    @property
    def batch_slots(self) -> Slots | None:
        """The batch context, once a batch made it (None before)."""
        return self._slots_box[0] if self._slots_box else None

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
            return special_tokens_of(llm._model)

    def grammar(self, g: Grammar) -> Any:
        """The constraint of ``g``, compiled once.

        A JSON schema (or a GBNF template around one) is compiled by llguidance
        (:class:`~langchain_localllms.grammars.guidance.Guide`): llama-cpp-python's
        converter ignores bounds and writes GBNF that llama.cpp's parser may refuse.
        GBNF goes to llama.cpp's own grammar sampler once llama.cpp's parser has read
        it here: a grammar it refuses is a ``GrammarSyntaxError``, where llama-cpp-
        python would add the missing sampler to its chain and crash the process.
        """
        with self._grammar_lock:
            cached = self._grammars.get(g.identity)
            if cached is None:
                with self.shared.use() as llm:
                    if g.schema is not None or g.slot is not None:
                        cached = Guide(self.lltokenizer(), g)
                    else:
                        cached = checked_grammar(llm, g.gbnf, verbose=self.verbose)
                self._grammars[g.identity] = cached
            return cached

    def lltokenizer(self) -> Any:
        """Llguidance's view of this model's vocabulary (built once: ~1 s for 262k tokens)."""
        tokenizer = self._grammars.get("\0tokenizer")
        if tokenizer is None:
            guidance = require("llguidance.llamacpp", feature="JSON schemas")
            with self.shared.use() as llm, warnings.catch_warnings():
                # It reads each token's attributes through a function llama-cpp-python
                # marks deprecated: one DeprecationWarning per token (262,144 on Gemma).
                warnings.simplefilter("ignore", DeprecationWarning)
                tokenizer = guidance.lltokenizer_from_vocab(llm._model.vocab)
            self._grammars["\0tokenizer"] = tokenizer
        return tokenizer

    def pieces(
        self,
        prompt: str,
        call: Call,
        tally: Tally,
        *,
        reuse: bool = True,
        parallel: int = 1,
    ) -> Iterator[str]:
        """Generate for one prompt with the call's sampling parameters, piece by piece.

        ``reuse``: take the KV of a prefix this prompt shares with an earlier prompt
        from the cache, where that is exact. ``parallel``: when it is above 1 and
        another call of this model is running (another thread, task or stream), the
        prompt joins the batch instead of waiting: it decodes as one more sequence of
        the batch context, in the same ``llama_decode`` calls as the others.
        """
        p = call.params
        with self.shared.use() as llm, self.batcher.call(parallel) as turn:
            if turn.join:
                done = yield from self._joined(llm, prompt, p, tally, reuse, parallel)
                if done:
                    return
            yield from self._pieces(llm, prompt, p, tally, reuse, parallel, turn.started)

    def _joined(
        self, llm: Any, prompt: str, p: Mapping[str, Any], tally: Tally, reuse: bool, parallel: int
    ) -> Generator[str, None, bool]:
        """One prompt as a sequence of the running batch.

        Returns False when the batch has no room for it (the caller then runs it on
        its own).
        """
        tokens, limit = self._tokens(llm, prompt, p)
        grammar = self.grammar(p["grammar"]) if p["grammar"] is not None else None
        job = BatchSequence(tokens, limit, [], "", p, grammar, reuse, parallel)
        tally.prompt_tokens = len(tokens)
        echo = bool(p["echo"])  # given once the batch has taken the prompt
        with contextlib.closing(self.batcher.follow(job)) as pieces:
            for text in pieces:
                if echo:
                    echo = False
                    yield Echo(prompt)
                tally.completion_tokens += 1  # one item per token, as _pieces hands them
                if text:
                    yield text
        if isinstance(job.error, NoRoom):
            return False
        if echo:
            yield Echo(prompt)
        if job.tail:
            yield job.tail
        tally.finish_reason = job.tally.finish_reason
        tally.extra["cached_tokens"] = job.tally.extra.get("cached_tokens", 0)
        return True

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
        self,
        llm: Any,
        prompt: str,
        p: Mapping[str, Any],
        tally: Tally,
        reuse: bool,
        parallel: int = 1,
        started: Callable[[], None] = lambda: None,
    ) -> Iterator[str]:
        tokens, limit = self._tokens(llm, prompt, p)
        grammar = self.grammar(p["grammar"]) if p["grammar"] is not None else None
        tally.prompt_tokens = len(tokens)

        work = _LoneCall(self, llm, tokens, limit, p, grammar, tally, reuse, parallel, started)

        # The echo comes once the job is queued: a reader that holds the stream after
        # it holds no call that joins after this one (see Batcher.call).
        echo = bool(p["echo"])
        for n, text in self.shared.stream(work):
            if echo:
                echo = False
                yield Echo(prompt)
            tally.completion_tokens += n
            if text:
                yield text
        if echo:
            yield Echo(prompt)

    def forget(self, llm: Any) -> None:
        """Drop what the instance's context holds: the next prompt starts cold."""
        self._cached = []
        llm.reset()

    def prefill(self, llm: Any, tokens: list[int], emit: Emit, reuse: bool) -> int | None:
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
                self.forget(llm)
                return None
            llm.eval(tokens[start:end])
        self._cached = tokens[: canonical_length(len(tokens), self.chunk)]
        self.prefilled += len(tokens) - keep
        return keep

    # ------------------------------------------------------------------ batches
    def rows(
        self,
        prompts: list[str],
        call: Call,
        *,
        parallel: int = 1,
        reuse: bool = True,
    ) -> list[Row] | None:
        """Generate for many prompts as sequences of one llama.cpp context.

        Up to ``parallel`` prompts decode together, one token each per
        ``llama_decode``; a prompt that ends frees its sequence for the next
        (continuous batching), and calls from other threads join the same batch. Each
        sequence has its own sampler chain (grammar, penalties, seed), the prompt and
        token limits of a single call, and ends at its first stop sequence. None when
        not even one sequence fits in the memory available (the caller then generates
        one prompt at a time).

        Raises:
            ContextOverflowError: A prompt does not fit the context (before any
                decoding).
        """
        p, stops = call.params, call.stops
        with self.shared.use() as llm, self.batcher.call(parallel, batch=True):
            grammar = self.grammar(p["grammar"]) if p["grammar"] is not None else None
            jobs = []
            for prompt in prompts:
                tokens, limit = self._tokens(llm, prompt, p)
                prefix = prompt if p["echo"] else ""
                jobs.append(
                    BatchSequence(tokens, limit, stops, prefix, p, grammar, reuse, parallel)
                )
            if not self.batcher.wait(jobs):
                return None
        for job in jobs:
            if job.tail and job.pieces:
                job.pieces[-1] += job.tail
        return [Row(j.pieces, j.tally, prefix=j.prefix) for j in jobs]

    def batch_context(self, llm: Any, width: int, need: int) -> Slots | None:
        """The batch context, with at least ``width`` sequences of ``need`` tokens.

        Made on first use and kept (its KV serves later batches' shared prefixes);
        made anew, larger, when a batch needs more (only while no sequence runs in
        it). None when it would take more than half the memory available at one
        sequence already.
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
        per_seq = kv_bytes_per_token(llm.metadata, kv_element_bytes(llm)) * n_ctx_seq
        available = available_memory()
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
        slots = Slots(llm, width, n_ctx_seq, verbose=self.verbose)
        box.append(slots)
        return slots


def _load(llama_cpp: Any, path: Path, load_kwargs: Mapping[str, Any], *, repack: bool) -> Any:
    """A ``llama_cpp.Llama`` of ``path``; arguments it does not take are an error first."""
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
        return (llama_cpp.Llama if repack else _unrepacked())(model_path=str(path), **load_kwargs)
    except ValueError as e:
        msg = (
            f"llama.cpp could not load {path}: {e}. The file may be truncated, "
            "of an architecture this llama-cpp-python build does not know, or "
            "need more memory than is free; run with verbose=True for the reason."
        )
        raise ValueError(msg) from e


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


def _close_model(slots_box: list[Slots], close_model: Callable[[], Any]) -> None:
    """Free the batch context, then the model it was made from."""
    while slots_box:
        slots_box.pop().close()
    close_model()


class _LoneCall:
    """A single call's job: decode in the instance's context, reusing its cache.

    While others wait to join a batch, the call moves there (in its first
    :data:`REPLAY_MAX` tokens) and leads it.
    """

    def __init__(
        self,
        engine: LlamaCppEngine,
        llm: Any,
        tokens: list[int],
        limit: int,
        p: Mapping[str, Any],
        grammar: Any,
        tally: Tally,
        reuse: bool,
        parallel: int,
        started: Callable[[], None],
    ) -> None:
        self.engine, self.llm, self.tokens, self.limit = engine, llm, tokens, limit
        self.p, self.grammar, self.tally = p, grammar, tally
        self.reuse, self.parallel, self.started = reuse, parallel, started
        self.sampler: Any = None
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, emit: Emit) -> None:
        self.started()
        self.sampler = make_sampler(self.llm, self.p, self.grammar)
        try:
            cached = self.engine.prefill(self.llm, self.tokens, emit, self.reuse)
            if cached is None:
                return  # the caller gave up during the prompt
            self.tally.extra["cached_tokens"] = cached
            self.tally.finish_reason = "length"
            self._decode(emit)
            tail = self.decoder.decode(b"", final=True)
            if tail:
                emit((0, tail))
        except BaseException:
            self.engine.forget(self.llm)  # a half-done step must not look like a cached prefix
            raise
        finally:
            if self.sampler is not None:
                self.sampler.close()

    def _decode(self, emit: Emit) -> None:
        llama_cpp = require("llama_cpp")
        llm, limit = self.llm, self.limit
        n = 0
        generated: list[int] = []
        # Whether this call may still move into a batch: once a move failed, a later
        # token would fail alike (nothing it depends on changes while this job holds
        # the runtime's thread).
        movable = self.parallel > 1
        while True:
            token = self.sampler.sample(llm._ctx, -1)
            if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
                self.tally.finish_reason = "stop"
                return
            # Tokens the grammar leaves no choice for are taken, not sampled, and
            # decoded with this one in one llama_decode.
            step = [token, *forced_run(self.sampler, limit - n - 1)]
            # One item per token, text or not, so the reader counts exactly the tokens
            # it took.
            for t in step:
                n += 1
                generated.append(t)
                if not emit((1, self.decoder.decode(llm.detokenize([t])))):
                    return
            if n >= limit:
                return
            # A call that fast-forwarded is not moved: the batch would evaluate its
            # tokens again one per decode, not as they were.
            movable = movable and len(step) == 1
            if movable and n <= REPLAY_MAX and self.engine.batcher.wanted():
                if self._move(emit, token, n, generated):
                    return
                movable = False
            llm.eval(step)

    def _move(self, emit: Emit, token: int, n: int, generated: list[int]) -> bool:
        """Move into the batch that calls wait to join, and lead it; False if it cannot."""
        state = (self.sampler, self.decoder, emit, token, self.llm.n_tokens, n)
        moved = BatchSequence.moving(
            self.tokens, self.limit, self.p, self.grammar, self.reuse, self.parallel, state=state
        )
        if not self.engine.batcher.adopt(self.llm, moved, generated[:-1]):
            return False
        self.sampler = None  # the batch closed it
        if moved.error is not None:
            raise moved.error
        self.tally.finish_reason = moved.tally.finish_reason
        self.decoder = moved.decoder
        return True
