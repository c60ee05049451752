"""Continuous batching: sequences join and leave one ``llama_decode`` loop."""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING, Any

from langchain_localllms.core.imports import require
from langchain_localllms.engines.llamacpp.prefix import (
    PREFILL_CHUNK,
    canonical_length,
    prefill_chunks,
    reusable_length,
)
from langchain_localllms.engines.llamacpp.sampling import forced_run, make_sampler
from langchain_localllms.engines.llamacpp.slots import (
    COPY_MIN_TOKENS,
    MAX_SEQUENCES,
    BatchSequence,
    NoRoom,
    Slots,
)

if TYPE_CHECKING:
    from langchain_localllms.engines.llamacpp.engine import LlamaCppEngine

_log = logging.getLogger(__name__)


REPLAY_MAX = 4
#: Rows that decode faster one by one still decode together every this many steps.
PROBE_EVERY = 16
#: A batch context made for calls that join one another has room for at least this
#: many sequences (up to ``n_parallel``): more calls may come than are waiting now.
MIN_WIDTH = 4


class BatchTurn:
    """Where one call runs: ``join`` the batch, or alone.

    A lone call says ``started()`` once its job begins on the runtime's thread.
    """

    def __init__(self, join: bool, batcher: Batcher) -> None:
        self.join = join
        self.batcher: Batcher | None = None if join else batcher

    def started(self) -> None:
        """Say, once, that the lone call's job began (or that it never will)."""
        batcher, self.batcher = self.batcher, None
        if batcher is not None:
            batcher.lone_call_started()


class Batcher:
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
        self.waiting: collections.deque[BatchSequence] = collections.deque()
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
        self._running_in: Slots | None = None
        self._active: list[BatchSequence] = []
        self._free: list[int] = []

    @contextlib.contextmanager
    def call(self, parallel: int, *, batch: bool = False) -> Iterator[BatchTurn]:
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
        turn = BatchTurn(join, self)
        try:
            yield turn
        finally:
            turn.started()
            with self.cond:
                self.calls -= 1

    def lone_call_started(self) -> None:
        """A lone call's job began: start the loop for the calls that wait to join."""
        with self.cond:
            self.starting -= 1
            start = bool(self.waiting) and not self.looping and not self.starting
            if start:
                self.looping = True
        if start:
            self.engine.shared.thread.post(self._loop)

    def submit(self, jobs: list[BatchSequence]) -> None:
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

    def wait(self, jobs: list[BatchSequence]) -> bool:
        """Run ``jobs`` to their end; False when they found no room (see :class:`NoRoom`)."""
        if self.engine.shared.thread.is_current():
            return False  # the loop would have to run on this very thread: one at a time
        self.submit(jobs)
        with self.cond:
            while not all(j.finished for j in jobs):
                if any(j.cancel is not None and j.cancel.is_set for j in jobs):
                    break  # the caller gave up; the loop drops its sequences
                self.cond.wait()
        for job in jobs:
            if job.error is not None and not isinstance(job.error, NoRoom):
                raise job.error
        return not any(isinstance(j.error, NoRoom) for j in jobs)

    def follow(self, job: BatchSequence) -> Generator[str, None, None]:
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
                    elif job.error is not None and not isinstance(job.error, NoRoom):
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

    def adopt(self, llm: Any, job: BatchSequence, replay: list[int]) -> bool:
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
        slots = self.engine.batch_context(llm, width, need)
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

    def _loop(self, lead: BatchSequence | None = None) -> None:
        """Admit waiting sequences and decode running ones until none is left.

        Started with nothing running (the job :meth:`submit` queues), or by
        :meth:`adopt` with the call it moved running: that call's job returns once its
        own sequence ends, and a job queued after it runs the rest.
        """
        engine = self.engine
        active, free = self._active, self._free
        taken: list[BatchSequence] = []
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

    def _context(self, llm: Any) -> Slots | None:
        """The batch context for what waits now (made or grown while nothing runs).

        None, and the waiting sequences failed with :class:`NoRoom`, when not even
        one of them fits in memory. Called with the lock held.
        """
        waiting = self.waiting
        slots = self.engine.batch_context(llm, *self._shape(llm, list(waiting)))
        if slots is None:
            for job in waiting:
                job.error = NoRoom()
                self._end(job, [])
            waiting.clear()
            self.cond.notify_all()
        return slots

    def _shape(self, llm: Any, jobs: list[BatchSequence]) -> tuple[int, int]:
        """Sequences and tokens per sequence a batch context needs for ``jobs``.

        As many sequences as calls may come (at least :data:`MIN_WIDTH`), up to
        their ``parallel``; room for the longest prompt and answer.
        """
        width = min(
            max(j.parallel for j in jobs),
            max(len(jobs), self.calls, MIN_WIDTH),
            llm.n_batch,
            MAX_SEQUENCES,
        )
        return width, max(len(j.tokens) + j.limit for j in jobs)

    def _end(self, job: BatchSequence, free: list[int]) -> None:
        """The sequence is over: close its sampler, free its KV stream, wake readers."""
        if job.sampler is not None:
            job.sampler.close()
            job.sampler = None
        if job.seq >= 0:
            free.append(job.seq)
            job.seq = -1
        job.finished = True
        self.cond.notify_all()

    def _seat(self, slots: Slots, job: BatchSequence, free: list[int]) -> tuple[int, int]:
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
        self, slots: Slots, seq: int, tokens: list[int], keep: int, *, logits: bool
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

    def _admit(self, llm: Any, slots: Slots, job: BatchSequence, free: list[int]) -> None:
        """Give the job a free sequence, evaluate its prompt, sample its first token."""
        job.tally.started = time.perf_counter()
        job.tally.finish_reason = "length"
        seq, keep = self._seat(slots, job, free)
        free.remove(seq)
        job.seq = seq
        job.sampler = make_sampler(llm, job.p, job.grammar)
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

    def _step(self, llm: Any, slots: Slots, active: list[BatchSequence], free: list[int]) -> None:
        """One token for every running sequence (``rows_per_decode`` rows a decode).

        Where one ``llama_decode`` of these rows has taken longer than as many
        decodes of one row (llama.cpp's kernels for a few rows can be slower than
        its one-row path: 2 rows of Gemma-3-270M Q4_K_M took 2.3 times one row on 2
        cores), the rows are decoded one by one instead.
        """
        width = self.engine.rows_per_decode or len(active)
        step = [j for j in active if not j.forced]
        if self.slower_together(min(width, len(step))):
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
            self.note_cost(len(part), time.perf_counter() - t0)
            for i, job in enumerate(part):
                job.n_past += 1
                self._advance(llm, slots, job, i, free)
                if job.finished:
                    active.remove(job)

    def note_cost(self, rows: int, seconds: float) -> None:
        """Keep a moving average of how long a decode step of ``rows`` rows takes.

        The first step of a width is not counted: it includes llama.cpp's setup of
        that batch shape.
        """
        n, before = self._cost.get(rows, (0, 0.0))
        average = seconds if n <= 1 else 0.8 * before + 0.2 * seconds
        self._cost[rows] = (n + 1, average if n else 0.0)

    def slower_together(self, rows: int) -> bool:
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
        self, llm: Any, slots: Slots, job: BatchSequence, index: int, free: list[int]
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
            tokens = [token, *forced_run(job.sampler, room)]
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
