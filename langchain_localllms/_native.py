"""Threads around native runtimes: a model used by one generation at a time, and more.

:class:`SharedModel` is a model loaded in this process, shared by an instance and
its copies; :func:`iterate_in_thread` reads a blocking iterator without blocking
the event loop.

In-process runtimes (llama.cpp, GPT4All) hold one native model that only one
generation may use at a time. Holding a lock in the generator that the caller
iterates would make a second call from the same thread wait for itself forever: two
streams read in turn (``zip(llm.stream(a), llm.stream(b))``), an ``invoke`` inside a
``for piece in llm.stream(...)`` loop, or one from an ``on_llm_new_token`` handler.

So decoding runs in a worker thread that holds the model, and the caller only reads
what the worker hands over. A worker never waits on a reader for long: it keeps at
most :data:`LOOKAHEAD` pieces ahead of its reader (so a stream that is closed early
stops decoding at once), and while another call waits for the model it runs on
freely to its end, which frees the model for that call. No pattern of use in any
number of threads can then wait on itself.

The model is released when the last instance sharing it goes, or at exit while
Python can still run the runtime's destructor, whichever comes first; copies
(``model_copy``, ``copy.deepcopy``) that outlive the original keep it alive.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from typing import Any, Generic, TypeVar

M = TypeVar("M")
T = TypeVar("T")

#: How many pieces a worker decodes ahead of its reader when nobody else waits.
LOOKAHEAD = 2

Emit = Callable[[Any], bool]
"""Hands one item to the reader; False once the reader has gone (stop decoding)."""


class SharedModel(Generic[M]):
    """A loaded native model, its one-at-a-time use, and its release.

    Args:
        model: The runtime's model object.
        close: Frees the native memory (called once, when this object goes or at exit).
        name: Names the worker threads (shown in thread dumps).
    """

    def __init__(self, model: M, close: Callable[[], Any] | None, name: str) -> None:
        self.model = model
        self._name = name
        self._busy = threading.Lock()
        self._cond = threading.Condition()
        self._waiting = 0  # generations waiting for the model
        self._release = weakref.finalize(self, close) if close is not None else None

    def stream(self, work: Callable[[Emit], None]) -> Generator[Any, None, None]:
        """Run ``work(emit)`` on the model in a worker thread; yield what it emits.

        ``work`` returns when it is done, or as soon as ``emit`` returns False (the
        reader closed the stream). An exception in ``work`` reaches the reader.
        Closing the iterator waits for the worker, so no decoding outlives it.
        """
        cond = self._cond
        items: collections.deque[Any] = collections.deque()
        state: dict[str, Any] = {"gone": False, "done": False, "error": None}

        def emit(item: Any) -> bool:
            with cond:
                items.append(item)
                cond.notify_all()
                while not state["gone"] and len(items) >= LOOKAHEAD and not self._waiting:
                    cond.wait()
                return not state["gone"]

        def run() -> None:
            waiting = True
            try:
                with cond:
                    self._waiting += 1
                    cond.notify_all()  # whoever holds the model runs on freely now
                with self._busy:
                    with cond:
                        self._waiting -= 1
                        waiting = False
                    if not state["gone"]:
                        work(emit)
            except BaseException as e:
                state["error"] = e
            finally:
                with cond:
                    if waiting:
                        self._waiting -= 1
                    state["done"] = True
                    cond.notify_all()

        worker = threading.Thread(target=run, name=self._name, daemon=True)
        worker.start()
        try:
            while True:
                with cond:
                    while not items and not state["done"]:
                        cond.wait()
                    if items:
                        item = items.popleft()
                        cond.notify_all()
                    elif state["error"] is not None:
                        raise state["error"]
                    else:
                        return
                yield item
        finally:
            with cond:
                state["gone"] = True
                cond.notify_all()
            worker.join()

    def run(self, work: Callable[[], T]) -> T:
        """Run ``work()`` in this thread while holding the model (calls that don't stream).

        Waiting here counts as waiting for the model, so a stream that holds it runs on
        to its end instead of waiting for its reader.
        """
        with self._cond:
            self._waiting += 1
            self._cond.notify_all()
        try:
            self._busy.acquire()
        finally:
            with self._cond:
                self._waiting -= 1
        try:
            return work()
        finally:
            self._busy.release()


_END = object()


async def iterate_in_thread(make: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
    """Run a blocking iterator in one worker thread without blocking the event loop.

    The iterator is created, advanced and closed in the same thread (native runtimes
    and their locks expect that). When the consumer stops early, the worker stops at
    the next item and closes the iterator, so no decoding runs on in the background.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[bool, Any]] = asyncio.Queue()
    cancelled = threading.Event()

    def put(ok: bool, value: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (ok, value))
        except RuntimeError:  # the loop is gone; nobody is listening any more
            cancelled.set()

    def work() -> None:
        try:
            iterator = make()
            try:
                for item in iterator:
                    if cancelled.is_set():
                        break
                    put(True, item)
            finally:
                close = getattr(iterator, "close", None)
                if close is not None:
                    close()
            put(True, _END)
        except BaseException as e:
            put(False, e)

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
