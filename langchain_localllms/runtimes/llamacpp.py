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
the next prompt (:class:`_Batcher`). A single call that starts while another call of
the model runs joins that batch as one more sequence, from any thread or task; a call
running alone moves into the batch when others come to join it in its first tokens.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import ctypes
import functools
import inspect
import logging
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from langchain_localllms._base import Echo, Row
from langchain_localllms._imports import require
from langchain_localllms._native import Emit, SharedModel, current_cancel
from langchain_localllms._stop import StopStream
from langchain_localllms._usage import Tally
from langchain_localllms.errors import ContextOverflowError, GrammarSyntaxError
from langchain_localllms.grammars import Grammar
from langchain_localllms.grammars.guidance import Guide, advance, mask_logits

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
        self._batcher = _Batcher(self)

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
                        cached = _llama_grammar(llm, g.gbnf, verbose=self.verbose)
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
        p: Mapping[str, Any],
        tally: Tally,
        *,
        reuse: bool = True,
        parallel: int = 1,
    ) -> Iterator[str]:
        """Generate for one prompt with sampling parameters ``p``, piece by piece.

        ``reuse``: take the KV of a prefix this prompt shares with an earlier prompt
        from the cache, where that is exact. ``parallel``: when it is above 1 and
        another call of this model is running (another thread, task or stream), the
        prompt joins the batch instead of waiting: it decodes as one more sequence of
        the batch context, in the same ``llama_decode`` calls as the others.
        """
        with self.shared.use() as llm, self._batcher.call(parallel) as turn:
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
        job = _Sequence(tokens, limit, [], "", p, grammar, reuse, parallel)
        tally.prompt_tokens = len(tokens)
        echo = bool(p["echo"])  # given once the batch has taken the prompt
        with contextlib.closing(self._batcher.follow(job)) as pieces:
            for text in pieces:
                if echo:
                    echo = False
                    yield Echo(prompt)
                tally.completion_tokens += 1  # one item per token, as _pieces hands them
                if text:
                    yield text
        if isinstance(job.error, _NoRoom):
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
        llama_cpp = require("llama_cpp")
        tokens, limit = self._tokens(llm, prompt, p)
        grammar = self.grammar(p["grammar"]) if p["grammar"] is not None else None
        tally.prompt_tokens = len(tokens)

        def work(emit: Emit) -> None:
            started()
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            sampler = _sampler(llm, p, grammar)
            try:
                cached = self._prefill(llm, tokens, emit, reuse)
                if cached is None:
                    return  # the caller gave up during the prompt
                tally.extra["cached_tokens"] = cached
                tally.finish_reason = "length"
                n = 0
                generated: list[int] = []
                # Whether this call may still move into a batch: once a move failed,
                # a later token would fail alike (nothing it depends on changes while
                # this job holds the runtime's thread).
                movable = parallel > 1
                while True:
                    token = sampler.sample(llm._ctx, -1)
                    if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
                        tally.finish_reason = "stop"
                        break
                    # Tokens the grammar leaves no choice for are taken, not sampled,
                    # and decoded with this one in one llama_decode.
                    step = [token, *_forced(sampler, limit - n - 1)]
                    # One item per token, text or not, so the reader counts exactly
                    # the tokens it took.
                    gone = False
                    for t in step:
                        n += 1
                        generated.append(t)
                        if not emit((1, decoder.decode(llm.detokenize([t])))):
                            gone = True
                            break
                    if gone or n >= limit:
                        break
                    # A call that fast-forwarded is not moved: the batch would evaluate
                    # its tokens again one per decode, not as they were.
                    movable = movable and len(step) == 1
                    if movable and n <= REPLAY_MAX and self._batcher.wanted():
                        # Calls wait to join a batch: this one moves there and leads it.
                        moved = _Sequence(tokens, limit, [], "", p, grammar, reuse, parallel)
                        moved.sampler, moved.decoder, moved.sink = sampler, decoder, emit
                        moved.last, moved.n_past = token, llm.n_tokens
                        moved.tally.completion_tokens = n
                        moved.tally.finish_reason = "length"
                        moved.tally.first_piece = time.perf_counter()
                        if self._batcher.adopt(llm, moved, generated[:-1]):
                            sampler = None  # the batch closed it
                            if moved.error is not None:
                                raise moved.error
                            tally.finish_reason = moved.tally.finish_reason
                            decoder = moved.decoder
                            break
                        movable = False
                    llm.eval(step)
                tail = decoder.decode(b"", final=True)
                if tail:
                    emit((0, tail))
            except BaseException:
                self._forget(llm)  # a half-done step must not look like a cached prefix
                raise
            finally:
                if sampler is not None:
                    sampler.close()

        # The echo comes once the job is queued: a reader that holds the stream after
        # it holds no call that joins after this one (see _Batcher.call).
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
        (continuous batching), and calls from other threads join the same batch. Each
        sequence has its own sampler chain (grammar, penalties, seed), the prompt and
        token limits of a single call, and ends at its first stop sequence. None when
        not even one sequence fits in the memory available (the caller then generates
        one prompt at a time).

        Raises:
            ContextOverflowError: A prompt does not fit the context (before any
                decoding).
        """
        with self.shared.use() as llm, self._batcher.call(parallel, batch=True):
            grammar = self.grammar(p["grammar"]) if p["grammar"] is not None else None
            jobs = []
            for prompt in prompts:
                tokens, limit = self._tokens(llm, prompt, p)
                prefix = prompt if p["echo"] else ""
                jobs.append(_Sequence(tokens, limit, stops, prefix, p, grammar, reuse, parallel))
            if not self._batcher.wait(jobs):
                return None
        for job in jobs:
            if job.tail and job.pieces:
                job.pieces[-1] += job.tail
        return [Row(j.pieces, j.tally, prefix=j.prefix) for j in jobs]

    def _slots(self, llm: Any, width: int, need: int) -> _Slots | None:
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


def _llama_grammar(llm: Any, gbnf: str, *, verbose: bool) -> Any:
    """A ``LlamaGrammar`` of ``gbnf`` that llama.cpp's own parser has accepted."""
    llama_cpp = require("llama_cpp")
    llama_grammar = require("llama_cpp.llama_grammar", feature="LlamaCpp")
    sampler = llama_cpp.llama_sampler_init_grammar(llm._model.vocab, gbnf.encode(), b"root")
    if not sampler:
        msg = (
            "llama.cpp cannot parse this grammar (its parser's message is on stderr; "
            "a repetition like x{0,100} inside another repetition is a usual cause: "
            "llama.cpp refuses grammars that expand past its limit)"
        )
        raise GrammarSyntaxError(msg)
    llama_cpp.llama_sampler_free(sampler)
    return llama_grammar.LlamaGrammar.from_string(gbnf, verbose=verbose)


class _Guided:
    """A sampler chain that first masks the tokens llguidance does not allow next.

    Sampling, penalties and seed are the chain's, as ``Llama.generate`` builds it;
    the mask comes first, so they only ever see allowed tokens.
    """

    def __init__(self, llm: Any, p: Mapping[str, Any], guide: Guide) -> None:
        self.matcher = guide.matcher()

        def mask(_ids: Any, logits: Any) -> Any:
            mask_logits(self.matcher, logits)
            return logits

        self.chain = _chain(llm, p, None, [mask])
        self.sampler = self.chain.sampler

    def sample(self, ctx: Any, index: int = -1) -> int:
        token: int = self.chain.sample(ctx, index)
        advance(self.matcher, token)
        return token

    def forced(self, room: int) -> list[int]:
        """Up to ``room`` tokens the grammar forces next, taken as if sampled.

        Guidance's fast-forward (SGLang's jump-forward): a key or punctuation the
        schema fixes is not sampled token by token. The chain sees them too (its
        penalties count them).
        """
        tokens: list[int] = list(self.matcher.compute_ff_tokens())[:room]
        for token in tokens:
            advance(self.matcher, token)
            self.chain.accept(token)
        return tokens

    def close(self) -> None:
        self.chain.close()


#: The most tokens fast-forwarded at once (one llama_decode holds them and the last
#: sampled token, within any n_batch).
FORCED_MAX = 32


def _forced(sampler: Any, room: int) -> list[int]:
    """The tokens the grammar allows no choice for next (at most ``room``); none unguided."""
    room = min(room, FORCED_MAX)
    return sampler.forced(room) if isinstance(sampler, _Guided) and room > 0 else []


def _sampler(llm: Any, p: Mapping[str, Any], grammar: Any) -> Any:
    """A sampler chain for one sequence, built exactly as ``Llama.generate`` builds it."""
    if isinstance(grammar, Guide):
        return _Guided(llm, p, grammar)
    return _chain(llm, p, grammar, None)


def _chain(llm: Any, p: Mapping[str, Any], grammar: Any, processors: Any) -> Any:
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
        logits_processor=processors,
    )


# ------------------------------------------------------------ exact prefix reuse
# llama.cpp does not compute a token alike in every batch: its CPU kernels pick their
# path and tiling by the number of tokens in a llama_decode (a batch of one takes the
# vector path; repacked K-quants take a GEMM for rows in whole groups of four), and a
# token's KV differs, by up to ~0.75 in Gemma-3-270M Q4_K_M's logits, depending on
# where a prompt was split. So every prompt is evaluated in pieces cut at places that
# depend only on its length (prefill_cuts), and a prefix is reused only up to a cut
# that a cold prefill of the new prompt makes too, with the same cuts before it: each
# reused piece was computed from the same tokens, positions and earlier KV as a cold
# prefill computes it, and the answer is a cold call's whatever the kernels do.

#: The most prompt tokens per llama_decode: 256 evaluate as fast as 512 here (Gemma-3-
#: 270M, 2 cores, 450-token prompt: 791 vs 790 tokens/s median of 14, interleaved;
#: 128: 734), and a prompt is cut at every multiple of this size.
PREFILL_CHUNK = 256
#: A prompt of at least two chunks cuts its last, partial chunk once more, at a
#: multiple of this share of the chunk (64 tokens of 256): a later prompt that ends in
#: the same stretch (another question after the same few-shot prefix) reuses up to
#: that cut. The one more llama_decode cost a cold prefill of 450 and 1,010 tokens
#: 2.0% and 1.2% here (a cut at every 64: 6.8% and 4.1%; llama-cpp-python alone,
#: median of 6, interleaved).
SUB_CUT = 4


def prefill_cuts(n: int, chunk: int) -> list[int]:
    """Where a cold prefill of ``n`` prompt tokens ends its ``llama_decode`` calls.

    Every multiple of ``chunk``, and ``n``. A prompt of two chunks or more also cuts
    its last, partial chunk at the last multiple of ``chunk // SUB_CUT`` in it.
    """
    if chunk < 1:
        msg = f"chunk must be at least 1, got {chunk}"
        raise ValueError(msg)
    cuts = list(range(chunk, n + 1, chunk))
    base = n - n % chunk
    if n >= 2 * chunk:
        sub = max(1, chunk // SUB_CUT)
        if base < n - n % sub < n:
            cuts.append(n - n % sub)
    if base < n:
        cuts.append(n)
    return cuts


def prefill_chunks(start: int, n: int, chunk: int) -> list[tuple[int, int]]:
    """The ``llama_decode`` calls that evaluate tokens ``start..n`` of ``n``: ``[a, b)`` pairs.

    Cut where a cold prefill cuts (:func:`prefill_cuts`), so where a token lands
    depends on the prompt's length and the token's position, not on how much of the
    prompt was cached.
    """
    out = []
    a = start
    for b in prefill_cuts(n, chunk):
        if b > a:
            out.append((a, b))
            a = b
    return out


def canonical_length(n: int, chunk: int) -> int:
    """How many leading tokens of a prompt of ``n``, just prefilled, a later one may reuse.

    Up to its last cut that a longer prompt's cold prefill can make too: a multiple
    of ``chunk``, or the cut inside the last chunk (:func:`prefill_cuts`). The piece
    after it is computed in a batch of its own size, which another prompt's cold
    prefill would not use.
    """
    sub = max(1, chunk // SUB_CUT)
    return max(
        c
        for c in [0, *prefill_cuts(n, chunk)]
        if c % chunk == 0 or (n >= 2 * chunk and c % sub == 0)
    )


def reusable_length(cached: Sequence[int], tokens: Sequence[int], chunk: int) -> int:
    """How many leading ``tokens`` may keep the KV computed for ``cached``, exactly.

    ``cached`` ends at a cut of its own prefill (:func:`canonical_length`), which cut
    it at every multiple of ``chunk`` before that. The keep is a cut of ``tokens``' cold
    prefill, before the first token that differs, with only cuts of ``cached`` before
    it, and leaves at least one token to evaluate (its logits give the first answer
    token).
    """
    common = 0
    for a, b in zip(cached, tokens, strict=False):
        if a != b:
            break
        common += 1
    limit = min(common, len(tokens) - 1)
    made = {*range(chunk, len(cached) + 1, chunk), len(cached)}
    keep = 0
    for cut in prefill_cuts(len(tokens), chunk):
        if cut > limit or cut not in made:
            break
        keep = cut
    return keep


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


class _NoRoom(Exception):
    """Not even one sequence of this length fits in the memory available for a batch."""


class _Sequence:
    """One prompt of the batch: its tokens, sampling, pieces and usage so far.

    ``pieces`` holds one text per generated token (empty where the token completes
    no character yet); ``tail`` what the decoder still held at the end.
    """

    def __init__(
        self,
        tokens: list[int],
        limit: int,
        stops: list[str],
        prefix: str,
        p: Mapping[str, Any],
        grammar: Any,
        reuse: bool,
        parallel: int,
    ) -> None:
        self.tokens = tokens
        self.limit = limit
        self.prefix = prefix
        self.p = p
        self.grammar = grammar
        self.reuse = reuse
        self.parallel = parallel
        self.cancel = current_cancel()
        self.pieces: list[str] = []
        self.tail = ""
        self.tally = Tally(prompt_tokens=len(tokens))
        self.watch = StopStream(stops)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.seq = -1
        self.n_past = 0
        self.last = -1
        #: Tokens the grammar forced after ``last`` (fast-forwarded: emitted, not
        #: sampled), decoded with it at the next step.
        self.forced: list[int] = []
        self.sampler: Any = None
        #: Set by the batch loop: no more pieces come (done, failed or given up).
        self.finished = False
        self.error: BaseException | None = None
        #: Set by the reader: it no longer reads (a stream closed early).
        self.gone = False
        #: Where a call moved from the instance context hands its pieces (its
        #: stream's ``emit``) instead of ``pieces``.
        self.sink: Emit | None = None

    @property
    def dropped(self) -> bool:
        """Whether nobody waits for this sequence any more."""
        return self.gone or (self.cancel is not None and self.cancel.is_set)


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


#: A call running alone moves into the batch that other calls wait to join only in
#: its first tokens: each one it generated is decoded again there, one step each.
REPLAY_MAX = 4
#: Rows that decode faster one by one still decode together every this many steps.
PROBE_EVERY = 16
#: A batch context made for calls that join one another has room for at least this
#: many sequences (up to ``n_parallel``): more calls may come than are waiting now.
MIN_WIDTH = 4


class _Turn:
    """Where one call runs: ``join`` the batch, or alone.

    A lone call says ``started()`` once its job begins on the runtime's thread.
    """

    def __init__(self, join: bool, batcher: _Batcher) -> None:
        self.join = join
        self._batcher: _Batcher | None = None if join else batcher

    def started(self) -> None:
        """Say, once, that the lone call's job began (or that it never will)."""
        batcher, self._batcher = self._batcher, None
        if batcher is not None:
            batcher._started()


class _Batcher:
    """Continuous batching on an engine's batch context, fed from any thread.

    Batches (:meth:`wait`) and single calls that find another call of the model
    running (:meth:`follow`) queue their sequences here. One loop on the runtime's
    thread admits them into free sequences of the batch context between decode steps
    and advances every running sequence by one token per step, in one
    ``llama_decode``; it ends when nothing runs or waits, and the next sequence
    starts it again.
    """

    def __init__(self, engine: LlamaCppEngine) -> None:
        self.engine = engine
        self.cond = threading.Condition()
        self.waiting: collections.deque[_Sequence] = collections.deque()
        self.looping = False
        #: Calls of this model in progress (single calls and batches).
        self.calls = 0
        #: Lone calls whose job has not begun on the runtime's thread yet.
        self.starting = 0
        #: The most sequences that have run in the batch at once (for tests).
        self.widest = 0
        #: Per width: decode steps seen, and the seconds one takes (moving average).
        self._cost: dict[int, tuple[int, float]] = {}
        self._split_steps = 0
        # What the loop runs (touched on the runtime's thread only): the batch
        # context, its running sequences, and its free sequences.
        self._running_in: _Slots | None = None
        self._active: list[_Sequence] = []
        self._free: list[int] = []

    @contextlib.contextmanager
    def call(self, parallel: int, *, batch: bool = False) -> Iterator[_Turn]:
        """Count a call of the model while it runs, and say where it runs.

        A single call joins the batch (``turn.join``) when another call runs and
        ``parallel`` allows more than one sequence. Otherwise it runs alone in the
        instance context, and until its job starts on the runtime's thread
        (``turn.started()``), calls that join after it do not start the batch loop:
        that loop would run first and keep the lone call waiting until the batch
        drains. The lone call leads the batch instead (:meth:`adopt`), or starts the
        loop once it has begun.
        """
        thread = self.engine.shared.thread
        with self.cond:
            join = batch or (self.calls > 0 and parallel > 1 and not thread.is_current())
            self.calls += 1
            if not join:
                self.starting += 1
        turn = _Turn(join, self)
        try:
            yield turn
        finally:
            turn.started()
            with self.cond:
                self.calls -= 1

    def _started(self) -> None:
        """A lone call's job began: start the loop for the calls that wait to join."""
        with self.cond:
            self.starting -= 1
            start = bool(self.waiting) and not self.looping and not self.starting
            if start:
                self.looping = True
        if start:
            self.engine.shared.thread.post(self._loop)

    def submit(self, jobs: list[_Sequence]) -> None:
        """Queue sequences; start the loop on the runtime's thread if it is not running.

        Not while a lone call is about to start: that call leads or starts it.
        """
        with self.cond:
            self.waiting.extend(jobs)
            start = not self.looping and not self.starting
            if start:
                self.looping = True
            self.cond.notify_all()
        for job in jobs:
            if job.cancel is not None:
                job.cancel.on_set(self._wake)
        if start:
            self.engine.shared.thread.post(self._loop)

    def _wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def wait(self, jobs: list[_Sequence]) -> bool:
        """Run ``jobs`` to their end; False when they found no room (see :class:`_NoRoom`)."""
        if self.engine.shared.thread.is_current():
            return False  # the loop would have to run on this very thread: one at a time
        self.submit(jobs)
        with self.cond:
            while not all(j.finished for j in jobs):
                if any(j.cancel is not None and j.cancel.is_set for j in jobs):
                    break  # the caller gave up; the loop drops its sequences
                self.cond.wait()
        for job in jobs:
            if job.error is not None and not isinstance(job.error, _NoRoom):
                raise job.error
        return not any(isinstance(j.error, _NoRoom) for j in jobs)

    def follow(self, job: _Sequence) -> Generator[str, None, None]:
        """Queue ``job``; yield its pieces as the loop makes them (one per token)."""
        self.submit([job])
        read = 0
        try:
            while True:
                with self.cond:
                    while read >= len(job.pieces) and not job.finished and not job.dropped:
                        self.cond.wait()
                    if read < len(job.pieces):
                        piece = job.pieces[read]
                        read += 1
                    elif job.error is not None and not isinstance(job.error, _NoRoom):
                        raise job.error
                    else:
                        return
                yield piece
        finally:
            with self.cond:
                job.gone = True  # a stream closed early: the loop drops the sequence

    # ---------------------------------------------------------------- the loop
    def wanted(self) -> bool:
        """Whether calls wait for the loop to take them.

        Asked on the runtime's thread, where the loop does not run now.
        """
        with self.cond:
            return bool(self.waiting)

    def adopt(self, llm: Any, job: _Sequence, replay: list[int]) -> bool:
        """Move a call running in the instance context into the batch, and run it.

        The batch runs to its end here, on the runtime's thread, in that call's job.
        ``job`` carries the call's sampler, decoder, last sampled token and ``sink``.
        Its KV is computed again in a free sequence as the instance context computed
        it: the prompt in the same chunks (what a sequence holds of it is kept), then
        ``replay`` (the tokens it generated before the last) one per ``llama_decode``.
        (llama.cpp cannot load a one-stream context's sequence state into a context
        of several streams.) False, and nothing moved, when the batch context has no
        room for it or its prompt is more than a chunk to evaluate again.
        """
        if self._active:
            return False  # a batch runs already (its loop is queued): join it as others do
        with self.cond:
            width, need = self._shape(llm, [job, *self.waiting])
        slots = self.engine._slots(llm, width, need)
        if slots is None:
            return False
        seq, keep = self._seat(slots, job, list(range(slots.n_seq)))
        if len(job.tokens) - keep > PREFILL_CHUNK:
            return False  # its prompt would take longer to evaluate again than to wait
        slots.cached[seq] = []
        slots.clear(seq, keep)
        self._prefill(slots, seq, job.tokens, keep, logits=False)
        for pos, token in enumerate(replay, len(job.tokens)):
            slots.decode([(token, pos, seq, False)])
        job.seq = seq
        self._running_in = slots
        self._active[:] = [job]
        self._free[:] = [s for s in range(slots.n_seq) if s != seq]
        self._loop(lead=job)
        return True

    def _loop(self, lead: _Sequence | None = None) -> None:
        """Admit waiting sequences and decode running ones until none is left.

        Started with nothing running (the job :meth:`submit` queues), or by
        :meth:`adopt` with the call it moved running: that call's job returns once its
        own sequence ends, and a job queued after it runs the rest.
        """
        engine = self.engine
        active, free = self._active, self._free
        taken: list[_Sequence] = []
        slots = self._running_in
        try:
            llm = engine.llm
            while True:
                with self.cond:
                    for job in [j for j in active if j.dropped]:
                        active.remove(job)
                        self._end(job, free)
                    for job in [j for j in self.waiting if j.dropped]:
                        self.waiting.remove(job)
                        self._end(job, free)
                    if lead is not None and lead.finished:
                        if active or self.waiting:
                            engine.shared.thread.post(self._loop)
                        return
                    if not active:
                        slots = self._context(llm) if self.waiting else None
                        self._running_in = slots
                        free[:] = range(slots.n_seq) if slots is not None else []
                    while self.waiting and len(taken) < len(free) and slots is not None:
                        job = self.waiting[0]
                        if len(job.tokens) + job.limit > slots.n_ctx_seq:
                            break  # it needs a larger context: made once the batch drains
                        taken.append(self.waiting.popleft())
                    if not active and not taken:
                        self.looping = False
                        self.cond.notify_all()
                        return
                assert slots is not None
                while taken:
                    job = taken.pop(0)
                    self._admit(llm, slots, job, free)
                    if not job.finished:
                        active.append(job)
                if active:
                    self._step(llm, slots, active, free)
        except BaseException as e:
            if slots is not None:
                slots.forget()
            with self.cond:
                for job in [*active, *taken, *self.waiting]:
                    job.error = e
                    self._end(job, [])
                active.clear()
                self.waiting.clear()
                self.looping = False
                self.cond.notify_all()
            if not isinstance(e, Exception):
                raise

    def _context(self, llm: Any) -> _Slots | None:
        """The batch context for what waits now (made or grown while nothing runs).

        None, and the waiting sequences failed with :class:`_NoRoom`, when not even
        one of them fits in memory. Called with the lock held.
        """
        waiting = self.waiting
        slots = self.engine._slots(llm, *self._shape(llm, list(waiting)))
        if slots is None:
            for job in waiting:
                job.error = _NoRoom()
                self._end(job, [])
            waiting.clear()
            self.cond.notify_all()
        return slots

    def _shape(self, llm: Any, jobs: list[_Sequence]) -> tuple[int, int]:
        """Sequences and tokens per sequence a batch context needs for ``jobs``.

        As many sequences as calls may come (at least :data:`MIN_WIDTH`), up to
        their ``parallel``; room for the longest prompt and answer.
        """
        width = min(
            max(j.parallel for j in jobs),
            max(len(jobs), self.calls, MIN_WIDTH),
            llm.n_batch,
            _MAX_SEQUENCES,
        )
        return width, max(len(j.tokens) + j.limit for j in jobs)

    def _end(self, job: _Sequence, free: list[int]) -> None:
        """The sequence is over: close its sampler, free its KV stream, wake readers."""
        if job.sampler is not None:
            job.sampler.close()
            job.sampler = None
        if job.seq >= 0:
            free.append(job.seq)
            job.seq = -1
        job.finished = True
        self.cond.notify_all()

    def _seat(self, slots: _Slots, job: _Sequence, free: list[int]) -> tuple[int, int]:
        """A free sequence for the job, and how many of its prompt tokens it keeps.

        The free sequence that holds the longest reusable prefix of the prompt, or a
        copy of another sequence's when that saves :data:`COPY_MIN_TOKENS` more.
        """
        engine = self.engine
        seq, keep, src = free[0], 0, -1
        if job.reuse and engine.reusable:
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
        return seq, keep

    def _prefill(
        self, slots: _Slots, seq: int, tokens: list[int], keep: int, *, logits: bool
    ) -> int:
        """Evaluate ``tokens[keep:]`` in sequence ``seq``, in the fixed chunks.

        Returns the row of the last token in the last decode (``logits``: its logits
        are computed).
        """
        n = len(tokens)
        last = 0
        for start, end in prefill_chunks(keep, n, self.engine.chunk):
            rows = [(tokens[i], i, seq, logits and i == n - 1) for i in range(start, end)]
            slots.decode(rows)
            last = end - start - 1
        slots.cached[seq] = tokens[: canonical_length(n, self.engine.chunk)]
        self.engine.prefilled += n - keep
        return last

    def _admit(self, llm: Any, slots: _Slots, job: _Sequence, free: list[int]) -> None:
        """Give the job a free sequence, evaluate its prompt, sample its first token."""
        job.tally.started = time.perf_counter()
        job.tally.finish_reason = "length"
        seq, keep = self._seat(slots, job, free)
        free.remove(seq)
        job.seq = seq
        job.sampler = _sampler(llm, job.p, job.grammar)
        slots.cached[seq] = []
        slots.clear(seq, keep)
        job.tally.extra["cached_tokens"] = keep
        if job.dropped:
            with self.cond:
                self._end(job, free)
            return
        last = self._prefill(slots, seq, job.tokens, keep, logits=True)
        job.n_past = len(job.tokens)
        self._advance(llm, slots, job, last, free)

    def _step(self, llm: Any, slots: _Slots, active: list[_Sequence], free: list[int]) -> None:
        """One token for every running sequence (``rows_per_decode`` rows a decode).

        Where one ``llama_decode`` of these rows has taken longer than as many
        decodes of one row (llama.cpp's kernels for a few rows can be slower than
        its one-row path: 2 rows of Gemma-3-270M Q4_K_M took 2.3 times one row on 2
        cores), the rows are decoded one by one instead.
        """
        width = self.engine.rows_per_decode or len(active)
        step = [j for j in active if not j.forced]
        if self._slower_together(min(width, len(step))):
            width = 1
        self.widest = max(self.widest, len(active))
        for job in [j for j in active if j.forced]:
            # Fast-forwarded tokens: decoded with the last sampled one in one decode of
            # this sequence alone, as a single call decodes them.
            tokens = [job.last, *job.forced]
            slots.decode([(t, job.n_past + i, job.seq, i == len(tokens) - 1)
                          for i, t in enumerate(tokens)])  # fmt: skip
            job.n_past += len(tokens)
            job.forced = []
            self._advance(llm, slots, job, len(tokens) - 1, free)
            if job.finished:
                active.remove(job)
        for first in range(0, len(step), width):
            part = step[first : first + width]
            t0 = time.perf_counter()
            slots.decode([(j.last, j.n_past, j.seq, True) for j in part])
            self._note_cost(len(part), time.perf_counter() - t0)
            for i, job in enumerate(part):
                job.n_past += 1
                self._advance(llm, slots, job, i, free)
                if job.finished:
                    active.remove(job)

    def _note_cost(self, rows: int, seconds: float) -> None:
        """Keep a moving average of how long a decode step of ``rows`` rows takes.

        The first step of a width is not counted: it includes llama.cpp's setup of
        that batch shape.
        """
        n, before = self._cost.get(rows, (0, 0.0))
        average = seconds if n <= 1 else 0.8 * before + 0.2 * seconds
        self._cost[rows] = (n + 1, average if n else 0.0)

    def _slower_together(self, rows: int) -> bool:
        """Whether ``rows`` rows took longer in one decode than one by one.

        Every :data:`PROBE_EVERY` steps the rows decode together all the same, so
        the average follows what the machine does now.
        """
        if rows <= 1:
            return False
        (n1, one), (n, together) = self._cost.get(1, (0, 0.0)), self._cost.get(rows, (0, 0.0))
        if n1 < 2 or n < 2 or together <= rows * one:
            return False
        self._split_steps += 1
        return self._split_steps % PROBE_EVERY != 0

    def _advance(
        self, llm: Any, slots: _Slots, job: _Sequence, index: int, free: list[int]
    ) -> None:
        """Sample the job's next token from row ``index`` of the last decode."""
        llama_cpp = require("llama_cpp")
        token = job.sampler.sample(slots.context, index)
        if job.tally.first_piece is None:
            job.tally.first_piece = time.perf_counter()
        done = llama_cpp.llama_vocab_is_eog(llm._model.vocab, token)
        texts: list[str] = []
        if done:
            job.tally.finish_reason = "stop"
        else:
            room = job.limit - job.tally.completion_tokens - 1
            tokens = [token, *_forced(job.sampler, room)]
            for t in tokens:
                text = job.decoder.decode(llm.detokenize([t]))
                texts.append(text)
                job.tally.completion_tokens += 1
                job.watch.push(text)
                if job.sink is not None and not job.sink((1, text)):
                    job.gone = True
                    break
            job.last, job.forced = token, tokens[1:]
            done = job.gone or job.tally.completion_tokens >= job.limit or job.watch.stopped
        with self.cond:
            if job.sink is None:
                job.pieces.extend(texts)
            if done:
                job.tally.completion_ms = (time.perf_counter() - job.tally.first_piece) * 1e3
                if job.sink is None:
                    job.tail = job.decoder.decode(b"", final=True)
                self._end(job, free)
            else:
                self.cond.notify_all()


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
