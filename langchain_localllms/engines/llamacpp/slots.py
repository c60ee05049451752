"""The batch context: one KV stream per sequence, and the sequences decoding in it."""

from __future__ import annotations

import codecs
import ctypes
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from langchain_localllms.core.events import Tally
from langchain_localllms.core.imports import require
from langchain_localllms.core.stops import StopStream
from langchain_localllms.core.threads import Emit, current_cancel

_log = logging.getLogger(__name__)


EXACT_ROWS = 4
#: The most sequences llama.cpp decodes in one context (LLAMA_MAX_SEQ).
MAX_SEQUENCES = 256
#: A shared prefix is copied from another sequence's KV when it saves this many
#: prompt tokens more than what the free sequence holds itself.
COPY_MIN_TOKENS = 32


class NoRoom(Exception):
    """Not even one sequence of this length fits in the memory available for a batch."""


class BatchSequence:
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

    @classmethod
    def moving(
        cls,
        tokens: list[int],
        limit: int,
        p: Mapping[str, Any],
        grammar: Any,
        reuse: bool,
        parallel: int,
        *,
        state: tuple[Any, Any, Emit, int, int, int],
    ) -> BatchSequence:
        """A lone call that moves into the batch as it runs.

        ``state``: its sampler, decoder, stream, last token, tokens in its context and
        tokens generated so far.
        """
        job = cls(tokens, limit, [], "", p, grammar, reuse, parallel)
        job.sampler, job.decoder, job.sink, job.last, job.n_past, generated = state
        job.tally.completion_tokens = generated
        job.tally.finish_reason = "length"
        job.tally.first_piece = time.perf_counter()
        return job

    @property
    def dropped(self) -> bool:
        """Whether nobody waits for this sequence any more."""
        return self.gone or (self.cancel is not None and self.cancel.is_set)


class Slots:
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
