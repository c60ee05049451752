"""LangChain's ``generate`` / ``batch`` and their async forms over an engine.

One prompt streams; several go to the engine's native batch where it has one (one
:class:`~langchain_localllms.core.events.Row` per prompt), else run concurrently up to
what the runtime takes. ``batch(return_exceptions=True)`` keeps each prompt's failure
its own; per-call options reach the cache key.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, ClassVar

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
    Callbacks,
)
from langchain_core.language_models import BaseLLM
from langchain_core.outputs import Generation, GenerationChunk, LLMResult, RunInfo
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import get_config_list

from langchain_localllms.core.events import Row
from langchain_localllms.core.requests import Call
from langchain_localllms.core.threads import current_cancel, run_in_thread
from langchain_localllms.llms._assemble import finish_row, join_chunks, llm_output

#: Per-call options of the ``generate``/``agenerate`` call in progress, so that the
#: cache key (built by LangChain from ``self.dict()``) includes them.
CALL_OPTIONS: ContextVar[dict[str, Any] | None] = ContextVar(
    "langchain_localllms_call_options", default=None
)
#: The prompts of the ``batch``/``abatch`` with ``return_exceptions=True`` in progress:
#: one prompt's failure is its own, and the others still get their answers. (A call
#: made meanwhile for other prompts, from a callback say, fails as usual.)
ISOLATE: ContextVar[frozenset[str]] = ContextVar("langchain_localllms_isolate", default=frozenset())


def isolating(prompts: list[str]) -> bool:
    """Whether failures of this call are per prompt (it is an isolating batch's)."""
    batch = ISOLATE.get()
    return bool(batch) and all(p in batch for p in prompts)


Outcome = Generation | Exception
"""One prompt's result: its generation, or the error that ended it."""


class PartialFailure(Exception):
    """Some prompts of an isolating batch failed; carries every prompt's outcome."""

    def __init__(self, prompts: list[str], outcomes: list[Outcome]) -> None:
        super().__init__("some prompts of the batch failed")
        self.prompts = prompts
        self.outcomes = outcomes

    def _matches(self, prompts: list[str]) -> list[int | None]:
        """Each batch prompt's place among those that ran (None: the cache answered it).

        LangChain runs the prompts the cache misses, in order: a subsequence.
        """
        j, places = 0, list[int | None]()
        for prompt in prompts:
            if j < len(self.prompts) and prompt == self.prompts[j]:
                places.append(j)
                j += 1
            else:
                places.append(None)
        return places

    def unmatched(self, prompts: list[str]) -> list[int]:
        """The batch prompts the cache answered."""
        return [i for i, j in enumerate(self._matches(prompts)) if j is None]

    def place(self, prompts: list[str], cached: Callable[[int], Any]) -> list[Any]:
        """Each batch prompt's text or error; ``cached(i)`` for those the cache answered."""
        out: list[Any] = []
        for i, j in enumerate(self._matches(prompts)):
            outcome = cached(i) if j is None else self.outcomes[j]
            out.append(outcome.text if isinstance(outcome, Generation) else outcome)
        return out


class BatchedLLM(BaseLLM):
    """``generate``, ``batch`` and their async forms, for :class:`LocalLLM`."""

    if TYPE_CHECKING:

        def resolve_call(self, stop: list[str] | None, kwargs: dict[str, Any]) -> Call: ...
        def _check_call_options(self, kwargs: dict[str, Any]) -> dict[str, Any]: ...
        def _check_open(self) -> None: ...
        def _llm_output_extra(self) -> dict[str, Any]: ...

        _streaming_gates_tokens: ClassVar[bool]
        max_concurrency: int | None

    def _generate_batch(self, prompts: list[str], call: Call) -> list[Row] | None:
        """Runtimes that batch natively return one :class:`Row` per prompt, else None.

        The base cuts each row at its stops and reports usage as it does for streams.
        """
        return None

    def generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        callbacks: Callbacks | list[Callbacks] = None,
        *,
        tags: list[str] | list[list[str]] | None = None,
        metadata: dict[str, Any] | list[dict[str, Any]] | None = None,
        run_name: str | list[str] | None = None,
        run_id: uuid.UUID | list[uuid.UUID | None] | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        check_prompts(prompts)
        self._check_open()  # also before a cache hit
        token = CALL_OPTIONS.set(self._check_call_options(kwargs) or None)
        try:
            return super().generate(
                prompts,
                stop,
                callbacks,
                tags=tags,
                metadata=metadata,
                run_name=run_name,
                run_id=run_id,
                **kwargs,
            )
        finally:
            CALL_OPTIONS.reset(token)

    async def agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        callbacks: Callbacks | list[Callbacks] = None,
        *,
        tags: list[str] | list[list[str]] | None = None,
        metadata: dict[str, Any] | list[dict[str, Any]] | None = None,
        run_name: str | list[str] | None = None,
        run_id: uuid.UUID | list[uuid.UUID | None] | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        check_prompts(prompts)
        self._check_open()  # also before a cache hit
        token = CALL_OPTIONS.set(self._check_call_options(kwargs) or None)
        try:
            return await super().agenerate(
                prompts,
                stop,
                callbacks,
                tags=tags,
                metadata=metadata,
                run_name=run_name,
                run_id=run_id,
                **kwargs,
            )
        finally:
            CALL_OPTIONS.reset(token)

    def _generate_helper(
        self,
        prompts: list[str],
        stop: list[str] | None,
        run_managers: list[CallbackManagerForLLMRun],
        *,
        new_arg_supported: bool,
        **kwargs: Any,
    ) -> LLMResult:
        managers: list[Any] = list(run_managers) or [None] * len(prompts)
        try:
            outcomes = self.outcomes(prompts, stop, managers, **kwargs)
        except BaseException as e:  # the call as a whole (an interrupt, say)
            for m in run_managers:
                m.on_llm_error(e, response=LLMResult(generations=[]))
            raise
        for m, o in zip(run_managers, outcomes, strict=True):
            if isinstance(o, Exception):
                m.on_llm_error(o, response=LLMResult(generations=[]))
            else:
                m.on_llm_end(LLMResult(generations=[[o]], llm_output=self._llm_output([[o]])))
        return self._result(prompts, outcomes, run_managers)

    async def _agenerate_helper(
        self,
        prompts: list[str],
        stop: list[str] | None,
        run_managers: list[AsyncCallbackManagerForLLMRun],
        *,
        new_arg_supported: bool,
        **kwargs: Any,
    ) -> LLMResult:
        managers: list[Any] = list(run_managers) or [None] * len(prompts)
        try:
            outcomes = await self.aoutcomes(prompts, stop, managers, **kwargs)
        except BaseException as e:
            await asyncio.gather(
                *(m.on_llm_error(e, response=LLMResult(generations=[])) for m in run_managers)
            )
            raise
        await asyncio.gather(
            *(
                m.on_llm_error(o, response=LLMResult(generations=[]))
                if isinstance(o, Exception)
                else m.on_llm_end(LLMResult(generations=[[o]], llm_output=self._llm_output([[o]])))
                for m, o in zip(run_managers, outcomes, strict=True)
            )
        )
        return self._result(prompts, outcomes, run_managers)

    def _result(
        self, prompts: list[str], outcomes: list[Outcome], managers: Sequence[Any]
    ) -> LLMResult:
        """The call's result, or its first failure (every failure inside an isolating batch)."""
        failures = [o for o in outcomes if isinstance(o, Exception)]
        if failures:
            if isolating(prompts):
                raise PartialFailure(prompts, outcomes)
            raise failures[0]
        gens = [[o] for o in outcomes if isinstance(o, Generation)]
        run = [RunInfo(run_id=m.run_id) for m in managers] or None
        return LLMResult(generations=gens, llm_output=self._llm_output(gens), run=run)

    def outcomes(
        self, prompts: list[str], stop: list[str] | None, managers: list[Any], **kwargs: Any
    ) -> list[Outcome]:
        """Each prompt's generation or error; a native batch where the runtime has one."""
        call = self.resolve_call(stop, kwargs) if len(prompts) > 1 else None
        split = isolating(prompts)
        rows = self._batch_rows(prompts, call, split) if call and self._batches_natively() else None
        if call is not None and rows is not None:
            done, sent = self._finish_rows(rows, call, managers)
            for m, chunks in zip(managers, sent, strict=True):
                for chunk in chunks:  # its tokens to its own run, in order
                    m.on_llm_new_token(chunk.text, chunk=chunk)
            return done

        tokens = self._tokens_in_generate()

        def one(prompt: str, manager: Any) -> Outcome:
            try:
                return join_chunks(
                    self._stream(prompt, stop, manager if tokens else None, **kwargs)
                )
            except Exception as e:
                return e

        workers = min(self._concurrency(), len(prompts)) if len(prompts) > 1 else 1
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                return list(pool.map(one, prompts, managers))
        outcomes: list[Outcome] = []
        for prompt, manager in zip(prompts, managers, strict=True):
            outcome = one(prompt, manager)
            outcomes.append(outcome)
            if isinstance(outcome, Exception) and not isolating(prompts):
                # The call fails with this error: the rest need not run.
                outcomes += [outcome] * (len(prompts) - len(outcomes))
                break
        return outcomes

    async def aoutcomes(
        self, prompts: list[str], stop: list[str] | None, managers: list[Any], **kwargs: Any
    ) -> list[Outcome]:
        call = self.resolve_call(stop, kwargs) if len(prompts) > 1 else None
        rows = None
        if call is not None and self._batches_natively():
            split = isolating(prompts)  # read here: the worker thread has its own context
            rows = await run_in_thread(lambda: self._batch_rows(prompts, call, split))
        if call is not None and rows is not None:
            done, sent = self._finish_rows(rows, call, managers)
            for m, chunks in zip(managers, sent, strict=True):
                for chunk in chunks:
                    await m.on_llm_new_token(chunk.text, chunk=chunk)
            return done
        limit = asyncio.Semaphore(await self._aconcurrency() if len(prompts) > 1 else 1)

        tokens = self._tokens_in_generate()

        async def one(prompt: str, manager: Any) -> Outcome:
            async with limit:
                try:
                    chunks = [
                        c
                        async for c in self._astream(
                            prompt, stop, manager if tokens else None, **kwargs
                        )
                    ]
                except Exception as e:
                    return e
                return join_chunks(iter(chunks))

        return list(
            await asyncio.gather(*(one(p, m) for p, m in zip(prompts, managers, strict=True)))
        )

    def _finish_rows(
        self, rows: list[Row | Exception], call: Call, managers: list[Any]
    ) -> tuple[list[Outcome], list[list[GenerationChunk]]]:
        """Native batch rows cut at their stops, with usage, as streams would be.

        Also, per run, the chunks its callbacks get.
        """
        send = self._tokens_in_generate()
        done: list[Outcome] = []
        tokens: list[list[GenerationChunk]] = []
        for row, m in zip(rows, managers, strict=True):
            if isinstance(row, Row):
                generation, chunks = finish_row(row, call.stops)
                done.append(generation)
                tokens.append(chunks if send and m is not None else [])
            else:
                done.append(row)
                tokens.append([])
        return done, tokens

    def _batch_rows(
        self, prompts: list[str], call: Call, split: bool
    ) -> list[Row | Exception] | None:
        """The native batch's rows, or per prompt the error that failed it.

        None: the runtime streams these prompts one at a time instead. When the batch
        fails and ``split`` (failures are per prompt), its halves are tried apart: a
        prompt that fails on its own fails alone, and the others still batch.
        """
        try:
            rows = self._generate_batch(prompts, call)
        except Exception as e:
            cancel = current_cancel()
            if not split or len(prompts) == 1 or (cancel is not None and cancel.is_set):
                return [e] * len(prompts)
            mid = len(prompts) // 2
            left = self._batch_rows(prompts[:mid], call, split)
            right = self._batch_rows(prompts[mid:], call, split)
            return [*(left or [e] * mid), *(right or [e] * (len(prompts) - mid))]
        return None if rows is None else list(rows)

    # Direct callers of the hooks (LangChain calls the helpers above).
    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        return self._result(
            prompts, self.outcomes(prompts, stop, [run_manager] * len(prompts), **kwargs), []
        )

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        outcomes = await self.aoutcomes(prompts, stop, [run_manager] * len(prompts), **kwargs)
        return self._result(prompts, outcomes, [])

    # Failures per prompt: LangChain core's ``batch(return_exceptions=True)`` fails every
    # prompt of a generate call when one fails.
    def batch(
        self,
        inputs: list[Any],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[str]:
        if not return_exceptions or not inputs:
            return super().batch(inputs, config, return_exceptions=return_exceptions, **kwargs)
        out: list[Any] = []
        for part, confs in config_parts(inputs, get_config_list(config, len(inputs))):
            prompts = [self._convert_input(x) for x in part]
            texts = [p.to_string() for p in prompts]
            token = ISOLATE.set(frozenset(texts))
            try:
                result = self.generate_prompt(prompts, **per_prompt(confs), **kwargs)
                out += [g[0].text for g in result.generations]
            except PartialFailure as e:
                # Prompts the cache answered: asked again, one by one (the cache answers).
                cached = {
                    i: self.batch([part[i]], confs[i], return_exceptions=True, **kwargs)[0]
                    for i in e.unmatched(texts)
                }
                out += e.place(texts, cached.__getitem__)
            except Exception as e:
                out += [e] * len(part)
            finally:
                ISOLATE.reset(token)
        return out

    async def abatch(
        self,
        inputs: list[Any],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[str]:
        if not return_exceptions or not inputs:
            return await super().abatch(
                inputs, config, return_exceptions=return_exceptions, **kwargs
            )
        out: list[Any] = []
        for part, confs in config_parts(inputs, get_config_list(config, len(inputs))):
            prompts = [self._convert_input(x) for x in part]
            texts = [p.to_string() for p in prompts]
            token = ISOLATE.set(frozenset(texts))
            try:
                result = await self.agenerate_prompt(prompts, **per_prompt(confs), **kwargs)
                out += [g[0].text for g in result.generations]
            except PartialFailure as e:
                cached = {
                    i: (await self.abatch([part[i]], confs[i], return_exceptions=True, **kwargs))[0]
                    for i in e.unmatched(texts)
                }
                out += e.place(texts, cached.__getitem__)
            except Exception as e:
                out += [e] * len(part)
            finally:
                ISOLATE.reset(token)
        return out

    def _llm_output(self, gens: list[list[Generation]]) -> dict[str, Any]:
        return llm_output(gens, **self._llm_output_extra())

    def _concurrency(self) -> int:
        return self.max_concurrency or 1

    async def _aconcurrency(self) -> int:
        """``_concurrency`` for the async path (runtimes that must ask override)."""
        return self._concurrency()

    def _tokens_in_generate(self) -> bool:
        """Whether ``invoke``/``generate`` send tokens to callbacks.

        A ``streaming`` field says, where the class has one that means this.
        """
        return bool(getattr(self, "streaming", True)) if self._streaming_gates_tokens else True

    def _batches_natively(self) -> bool:
        return type(self)._generate_batch is not BatchedLLM._generate_batch


def config_parts(
    inputs: list[Any], configs: list[RunnableConfig]
) -> Iterator[tuple[list[Any], list[RunnableConfig]]]:
    """Sub-batches of ``max_concurrency`` prompts, as LangChain core's ``batch`` makes them."""
    size = configs[0].get("max_concurrency") or len(inputs)
    for i in range(0, len(inputs), size):
        yield inputs[i : i + size], [{**c, "max_concurrency": None} for c in configs[i : i + size]]


def per_prompt(configs: list[RunnableConfig]) -> dict[str, Any]:
    return {
        key: [c.get(key) for c in configs] for key in ("callbacks", "tags", "metadata", "run_name")
    }


def check_prompts(prompts: Any) -> None:
    if isinstance(prompts, str) or not isinstance(prompts, list):
        msg = f"generate() takes a list of prompt strings, got {type(prompts).__name__}"
        raise TypeError(msg)
    for p in prompts:
        if not isinstance(p, str):
            msg = f"prompts must be strings, got {type(p).__name__}: {p!r:.60}"
            raise TypeError(msg)
