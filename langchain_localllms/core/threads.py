"""Threads around native runtimes: one thread per runtime, models used one call at a time.

:class:`SharedModel` is a model loaded in this process, shared by an instance and
its copies; :class:`NativeThread` is the one thread that runs a runtime's native
work; :func:`iterate_in_thread` reads a blocking iterator without blocking the event
loop.

**One thread per runtime.** llama.cpp and torch split each step over a pool of
OpenMP threads, and libgomp keeps one pool per calling thread. With a second pool
in the process (a second thread that ever generated), libgomp manages more threads
than there are CPUs and stops spinning at its barriers; on 2 cores, llama.cpp then
decodes about 25% slower, in every thread. So all of a runtime's generations in this
process run on one long-lived thread, whatever thread the caller is on and however
many models are loaded.

**No pattern of use waits on itself.** Holding a lock in the generator that the
caller iterates would make a second call from the same thread wait for itself
forever: two streams read in turn (``zip(llm.stream(a), llm.stream(b))``), an
``invoke`` inside a ``for piece in llm.stream(...)`` loop, or one from an
``on_llm_new_token`` handler. So the runtime's thread generates and the caller
only reads what it hands over. The thread keeps at most :data:`LOOKAHEAD` pieces
ahead of its reader (so a stream that is closed early stops decoding at once), and
while another call waits for the thread it runs on freely to its end, which frees
the thread for that call.

The model is released when the last instance sharing it goes, or at exit while
Python can still run the runtime's destructor, whichever comes first; copies
(``model_copy``, ``copy.deepcopy``) that outlive the original keep it alive.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import ctypes
import gc
import os
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from typing import Any, Generic, Protocol, TypeVar

from langchain_localllms.core.errors import ClosedError

M = TypeVar("M")
T = TypeVar("T")

#: How many pieces the thread decodes ahead of its reader when nobody else waits.
LOOKAHEAD = 2


class Emit(Protocol):
    """What a job gets to hand items to its reader."""

    def __call__(self, item: Any) -> bool:
        """Hand one item to the reader; False once the reader has gone (stop decoding)."""
        ...

    def wanted(self) -> bool:
        """Whether the reader still waits (check between long native steps)."""
        ...


class Cancel:
    """A caller that gave up (an async task cancelled or timed out).

    Set from the event loop; whoever waits on the caller's behalf registers a wake-up.
    """

    def __init__(self) -> None:
        self._set = False
        self._lock = threading.Lock()
        self._wakeups: list[Callable[[], None]] = []

    @property
    def is_set(self) -> bool:
        """Whether the caller gave up."""
        return self._set

    def set(self) -> None:
        """Cancel: the work stops at its next step, and waiters are woken."""
        with self._lock:
            self._set = True
            wakeups, self._wakeups = self._wakeups, []
        for wake in wakeups:
            wake()

    def on_set(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` when this is set (at once if it is already)."""
        with self._lock:
            if not self._set:
                self._wakeups.append(wake)
                return
        wake()


#: The cancel signal of the async call this thread works for (see iterate_in_thread).
_CANCEL: contextvars.ContextVar[Cancel | None] = contextvars.ContextVar(
    "langchain_localllms_cancel", default=None
)


def current_cancel() -> Cancel | None:
    """The cancel signal of the async call this thread works for, if any."""
    return _CANCEL.get()


async def run_in_thread(fn: Callable[[], T]) -> T:
    """``fn()`` in a worker thread, without blocking the event loop.

    If the caller gives up, :func:`current_cancel` tells ``fn`` (engines stop their
    batch at the next step), and the caller waits only for that.
    """
    cancel = Cancel()

    def work() -> T:
        token = _CANCEL.set(cancel)
        try:
            return fn()
        finally:
            _CANCEL.reset(token)

    future = asyncio.get_running_loop().run_in_executor(None, work)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        cancel.set()
        with contextlib.suppress(Exception):
            await future
        raise


class _Job:
    """One piece of work queued on a :class:`NativeThread`."""

    __slots__ = ("done", "error", "fn", "result", "started")

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.started = False
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None


class NativeThread:
    """The one long-lived thread that runs a runtime's native work, one job at a time.

    Args:
        name: Names the thread (shown in thread dumps).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.cond = threading.Condition()
        self._jobs: collections.deque[_Job] = collections.deque()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._running = 0

    @property
    def busy(self) -> bool:
        """Whether a job runs or waits on this thread now."""
        with self.cond:
            return bool(self._running or self._jobs)

    def _submit(self, fn: Callable[[], Any]) -> _Job:
        job = _Job(fn)
        with self.cond:
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                # First use, or a child process forked from one that had the thread.
                self._jobs.clear()
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()
            self._jobs.append(job)
            self.cond.notify_all()  # a running stream stops waiting for its reader
        return job

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self._jobs:
                    self.cond.wait()
                job = self._jobs.popleft()
                job.started = True
                self._running = 1
                self.cond.notify_all()
            try:
                job.result = job.fn()
            except BaseException as e:
                job.error = e
            finally:
                del job.fn  # drop what the work holds (a model's last reference, say)
                with self.cond:
                    job.done = True
                    self._running = 0
                    self.cond.notify_all()

    def is_current(self) -> bool:
        """Whether the caller runs on this thread."""
        return threading.current_thread() is self._thread

    def post(self, fn: Callable[[], Any]) -> None:
        """Queue ``fn()`` on this thread and return at once.

        ``fn`` reports its own result and errors: what it raises is dropped.
        """
        self._submit(fn)

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` on this thread and return its result (or raise its error).

        Waiting here counts as waiting for the thread, so a stream that holds it runs on
        to its end instead of waiting for its reader.
        """
        if threading.current_thread() is self._thread:
            return fn()  # already here (a finalizer, say): queueing would wait forever
        job = self._submit(fn)
        with self.cond:
            while not job.done:
                self.cond.wait()
        if job.error is not None:
            raise job.error
        return job.result  # type: ignore[no-any-return]

    def stream(self, work: Callable[[Emit], None]) -> Generator[Any, None, None]:
        """Run ``work(emit)`` on this thread; yield what it emits.

        ``work`` returns when it is done, or as soon as ``emit`` returns False (the
        reader closed the stream). An exception in ``work`` reaches the reader.
        Closing the iterator waits for ``work`` to return, so no decoding outlives it.
        """
        cond = self.cond
        items: collections.deque[Any] = collections.deque()
        gone = False
        cancel = _CANCEL.get() or Cancel()

        queued = self._jobs  # calls waiting for this thread

        class _Emitter:
            def __call__(self, item: Any) -> bool:
                with cond:
                    items.append(item)
                    cond.notify_all()
                    while not gone and not cancel.is_set and len(items) >= LOOKAHEAD and not queued:
                        cond.wait()
                    return not gone and not cancel.is_set

            def wanted(self) -> bool:
                return not gone and not cancel.is_set

        def run() -> None:
            if not gone and not cancel.is_set:
                work(_Emitter())

        def wake() -> None:
            with cond:
                cond.notify_all()

        job = self._submit(run)
        cancel.on_set(wake)  # a caller that gives up stops waiting at once
        try:
            while True:
                with cond:
                    while not items and not job.done and not cancel.is_set:
                        cond.wait()
                    if cancel.is_set:
                        return
                    if items:
                        item = items.popleft()
                        cond.notify_all()
                    elif job.error is not None:
                        raise job.error
                    else:
                        return
                yield item
        finally:
            with cond:
                gone = True
                if not job.started:
                    self._jobs.remove(job)
                    job.done = True
                cond.notify_all()
                while not job.done:
                    cond.wait()


_THREADS: dict[str, NativeThread] = {}
_THREADS_LOCK = threading.Lock()


def native_thread(runtime: str) -> NativeThread:
    """The thread that runs ``runtime``'s native work in this process."""
    with _THREADS_LOCK:
        thread = _THREADS.get(runtime)
        if thread is None:
            thread = _THREADS[runtime] = NativeThread(f"{runtime}-generate")
        return thread


class SharedModel(Generic[M]):
    """A loaded native model, its runtime's thread, and its release.

    Args:
        model: The runtime's model object.
        close: Frees the native memory, if dropping the model does not (called once:
            at :meth:`close`, when this object goes, or at exit, while Python can still
            run the runtime's destructor).
        runtime: Whose thread runs this model's work (:func:`native_thread`).
        name: What the model is, for the error after :meth:`close` (``"LlamaCpp model
            gemma.gguf"``).
        parts: What else goes with the model (its tokenizer): :meth:`part`.

    Every use of the native model runs inside :meth:`use`, so :meth:`close` never
    frees it under a running call: it frees at once when nothing runs, else as soon
    as the running calls end.
    """

    def __init__(
        self,
        model: M,
        close: Callable[[], Any] | None,
        runtime: str,
        *,
        name: str = "model",
        parts: dict[str, Any] | None = None,
    ) -> None:
        self._box: list[M] = [model]  # emptied when freed
        self.name = name
        self.thread = native_thread(runtime)
        self._parts: dict[str, Any] = dict(parts or {})
        self._release = weakref.finalize(self, _free, self._box, self._parts, close)
        self._lock = threading.Lock()
        self._users = 0
        self._closed = False

    @property
    def model(self) -> M:
        """The runtime's model object; :class:`ClosedError` once closed."""
        if self._closed or not self._box:
            raise self._closed_error()
        return self._box[0]

    def part(self, name: str) -> Any:
        """One of ``parts``; kept for the calls that run while the model closes."""
        try:
            return self._parts[name]
        except KeyError:
            raise self._closed_error() from None

    def set_part(self, name: str, value: Any) -> None:
        """Add to (or replace in) ``parts``."""
        self._parts[name] = value

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def _closed_error(self) -> ClosedError:
        return ClosedError(
            f"this {self.name} was closed (close(), or the end of its with block), and its "
            "memory freed; create a new instance to use the model again"
        )

    @contextlib.contextmanager
    def use(self) -> Iterator[M]:
        """The model, kept from being freed until the block ends."""
        with self._lock:
            if self._closed or not self._box:
                raise self._closed_error()
            self._users += 1
            model = self._box[0]
        try:
            yield model
        finally:
            with self._lock:
                self._users -= 1
                last = self._closed and self._users == 0
            if last:
                self._release()

    def close(self) -> None:
        """Free the model now, or when the calls running on it end; once."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            idle = self._users == 0
        if idle:
            self._release()

    def stream(self, work: Callable[[Emit], None]) -> Generator[Any, None, None]:
        """Run ``work(emit)`` on the runtime's thread; yield what it emits."""
        return self.thread.stream(work)

    def run(self, work: Callable[[], T]) -> T:
        """Run ``work()`` on the runtime's thread (calls that don't stream)."""
        return self.thread.call(work)


def _free(box: list[Any], parts: dict[str, Any], close: Callable[[], Any] | None) -> None:
    """Drop the model and its parts, run the runtime's close (once: it is a finalizer)."""
    box.clear()
    parts.clear()
    if close is not None:
        close()
    gc.collect()  # what referred to the model in cycles goes now, not later
    trim_heap()


def trim_heap() -> None:
    """Hand freed heap memory back to the system now (glibc keeps it otherwise)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


_END = object()


async def iterate_in_thread(make: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
    """Run a blocking iterator in one worker thread without blocking the event loop.

    The iterator is created, advanced and closed in the same thread (native runtimes
    and their locks expect that). When the consumer stops early, the worker stops at
    the next item and closes the iterator, so no decoding runs on in the background.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[bool, Any]] = asyncio.Queue()
    cancelled = Cancel()

    def put(ok: bool, value: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (ok, value))
        except RuntimeError:  # the loop is gone; nobody is listening any more
            cancelled.set()

    def work() -> None:
        # Native waits on this caller's behalf end when it goes (reset: executor
        # threads are reused).
        token = _CANCEL.set(cancelled)
        try:
            iterator = make()
            try:
                for item in iterator:
                    if cancelled.is_set:
                        break
                    put(True, item)
            finally:
                close = getattr(iterator, "close", None)
                if close is not None:
                    close()
            put(True, _END)
        except BaseException as e:
            put(False, e)
        finally:
            _CANCEL.reset(token)

    worker = loop.run_in_executor(None, work)
    try:
        while True:
            ok, value = await queue.get()
            if not ok:
                raise value
            if value is _END:
                break
            yield value
    finally:
        cancelled.set()
        await asyncio.shield(worker)
