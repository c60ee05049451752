"""The contract every runtime class keeps, run on real models.

LangChain's standard tests have no suite for ``BaseLLM``; this is ours. A runtime's
test module subclasses :class:`LLMContract` and provides the ``llm`` fixture: a
greedy instance (same prompt -> same answer) that generates a few dozen tokens at most.
``max_tokens_option`` names the runtime's own parameter for the answer length.
"""

from __future__ import annotations

import asyncio
import copy
import gc
import pickle
import resource
import threading
from collections.abc import Callable
from itertools import zip_longest
from typing import Any, ClassVar, TypeVar

import pytest
from langchain_core.caches import InMemoryCache
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.globals import set_llm_cache
from langchain_core.language_models import BaseLLM
from langchain_core.outputs import GenerationChunk
from langchain_core.prompts import PromptTemplate

from langchain_localllms.errors import ClosedError, ContextOverflowError

T = TypeVar("T")
#: How long a usage pattern may take before it counts as a hang.
HANG_S = 120

PROMPT = "The capital of France is Paris. The capital of Italy is"
PROMPTS = [
    "The first man on the moon was",
    "My favourite colour is",
    "One, two, three, four,",
]


class Recorder(BaseCallbackHandler):
    """Records what LangChain's callbacks see."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.chunks: list[Any] = []
        self.starts = 0
        self.ends: list[Any] = []

    def on_llm_start(self, *args: Any, **kwargs: Any) -> None:
        self.starts += 1

    def on_llm_new_token(self, token: str, *, chunk: Any = None, **kwargs: Any) -> None:
        self.tokens.append(token)
        self.chunks.append(chunk)

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        self.ends.append(response)


class RunRecorder(BaseCallbackHandler):
    """Records each run's prompt and tokens by run id."""

    def __init__(self) -> None:
        self.prompts: dict[Any, str] = {}
        self.tokens: dict[Any, list[str]] = {}

    def on_llm_start(
        self, serialized: Any, prompts: list[str], *, run_id: Any, **kwargs: Any
    ) -> None:
        self.prompts[run_id] = prompts[0]
        self.tokens.setdefault(run_id, [])

    def on_llm_new_token(self, token: str, *, run_id: Any, **kwargs: Any) -> None:
        self.tokens.setdefault(run_id, []).append(token)


#: Longer than the context of every model the tests load (Gemma's is 32,768 tokens).
TOO_LONG = "word " * 40_000


class LLMContract:
    """Subclass, and provide an ``llm`` fixture (greedy)."""

    max_tokens_option: ClassVar[str] = "max_tokens"
    #: Whether a batch gives exactly the greedy answers of single calls (padding in
    #: a true batch can change float rounding in some runtimes).
    batch_matches_single: ClassVar[bool] = True
    #: Prompts the model answers with a few words at least (random test models may
    #: end some prompts at once).
    prompts: ClassVar[list[str]] = PROMPTS
    #: Whether the runtime's reply says which stop sequence ended an answer.
    names_the_stop: ClassVar[bool] = True
    #: Options that give the runtime a context limit, where it has none by default.
    context_limit: ClassVar[dict[str, Any]] = {}
    #: What a prompt longer than the context raises.
    overflow_error: ClassVar[type[Exception]] = ContextOverflowError

    @pytest.fixture
    def llm(self) -> BaseLLM:  # pragma: no cover - subclasses override
        raise NotImplementedError

    @pytest.fixture
    def other_llm(self, llm: BaseLLM) -> BaseLLM:
        """An instance that differs in sampling; override where copying is not cheap."""
        return llm.model_copy(update={"temperature": 0.7})

    # ------------------------------------------------------------------ tests
    def test_invoke_returns_only_the_completion(self, llm: BaseLLM) -> None:
        out = llm.invoke(PROMPT)
        assert isinstance(out, str)
        assert out.strip(), "empty answer"
        assert not out.startswith(PROMPT)
        assert PROMPT not in out

    def test_greedy_is_repeatable(self, llm: BaseLLM) -> None:
        # Same prompt back to back, and again after another prompt: runtimes that
        # reuse cached state between calls must not change the answer.
        first = llm.invoke(PROMPT)
        assert llm.invoke(PROMPT) == first
        assert llm.invoke(PROMPT) == first
        llm.invoke(self.prompts[0])
        assert llm.invoke(PROMPT) == first

    def test_batch_returns_results_in_order(self, llm: BaseLLM) -> None:
        outs = llm.batch(self.prompts)
        assert len(outs) == len(self.prompts)
        assert all(isinstance(o, str) and o for o in outs)
        if self.batch_matches_single:
            assert outs == [llm.invoke(p) for p in self.prompts]
        else:
            assert len(set(outs)) > 1, "a batch gave every prompt the same answer"

    def test_batch_tokens_reach_their_own_runs(self, llm: BaseLLM) -> None:
        # Tracers and per-run handlers see each prompt's tokens under its own run.
        rec = RunRecorder()
        outs = llm.batch(self.prompts, config={"callbacks": [rec]})
        assert len(rec.prompts) == len(self.prompts)
        by_prompt = {rec.prompts[run]: "".join(rec.tokens[run]) for run in rec.prompts}
        assert by_prompt == dict(zip(self.prompts, outs, strict=True))

    def test_batch_isolates_a_prompt_that_fails(self, llm: BaseLLM) -> None:
        # A prompt far longer than any context fails alone; the others are answered.
        good = self.prompts[:2]
        outs = llm.batch([good[0], TOO_LONG, good[1]], return_exceptions=True, **self.context_limit)
        assert isinstance(outs[1], Exception), f"an over-long prompt was answered: {outs[1]!r:.80}"
        assert "context" in str(outs[1]) or "long" in str(outs[1]), outs[1]
        assert [outs[0], outs[2]] == llm.batch(good)

    def test_a_prompt_longer_than_the_context_is_a_typed_error(self, llm: BaseLLM) -> None:
        with pytest.raises(self.overflow_error, match="context"):
            llm.invoke(TOO_LONG, **self.context_limit)

    def test_generate_many_prompts_sums_usage(self, llm: BaseLLM) -> None:
        result = llm.generate(self.prompts[:2])
        assert len(result.generations) == 2
        infos = [g[0].generation_info for g in result.generations]
        usage = result.llm_output["token_usage"]
        assert usage["prompt_tokens"] == sum(i["prompt_tokens"] for i in infos)
        assert usage["completion_tokens"] == sum(i["completion_tokens"] for i in infos)
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    def test_stream_yields_pieces_that_join_to_invoke(self, llm: BaseLLM) -> None:
        pieces = list(llm.stream(PROMPT))
        assert len([p for p in pieces if p]) > 1, "not streamed: one piece only"
        assert "".join(pieces) == llm.invoke(PROMPT)

    def test_callbacks_get_every_chunk(self, llm: BaseLLM) -> None:
        rec = Recorder()
        text = llm.invoke(PROMPT, config={"callbacks": [rec]})
        assert len(rec.tokens) > 1
        assert "".join(rec.tokens) == text
        assert all(
            isinstance(c, GenerationChunk) and c.text == t
            for c, t in zip(rec.chunks, rec.tokens, strict=True)
        )
        rec2 = Recorder()
        streamed = "".join(llm.stream(PROMPT, config={"callbacks": [rec2]}))
        assert "".join(rec2.tokens) == streamed
        assert rec2.starts == 1
        assert len(rec2.ends) == 1

    def test_usage_and_timings(self, llm: BaseLLM) -> None:
        gen = llm.generate([PROMPT]).generations[0][0]
        info = gen.generation_info
        assert info["prompt_tokens"] > 0
        assert info["completion_tokens"] > 0
        assert info["total_tokens"] == info["prompt_tokens"] + info["completion_tokens"]
        assert info["finish_reason"] in ("stop", "length")
        assert info["timings"]["completion_ms"] > 0
        assert info["timings"]["prompt_ms"] > 0

    def test_max_tokens_is_respected(self, llm: BaseLLM) -> None:
        gen = llm.generate([self.prompts[0]], **{self.max_tokens_option: 3}).generations[0][0]
        assert gen.generation_info["completion_tokens"] <= 3
        if gen.generation_info["completion_tokens"] == 3:
            assert gen.generation_info["finish_reason"] == "length"
        full = llm.invoke(self.prompts[0])
        assert full.startswith(gen.text)

    def test_stop_truncates_and_says_why(self, llm: BaseLLM) -> None:
        full = llm.invoke(self.prompts[0])
        words = full.split()
        assert len(words) >= 3, f"answer too short to test stops: {full!r}"
        stop = words[2]
        cut = full[: full.index(stop)]
        for result in (
            llm.generate([self.prompts[0]], stop=[stop]).generations[0][0],
            _join_stream(llm, self.prompts[0], stop=[stop]),
        ):
            assert result.text == cut
            assert result.generation_info["finish_reason"] == "stop"
            assert result.generation_info["stop_sequence"] == (
                stop if self.names_the_stop else None
            )
        assert llm.bind(stop=[stop]).invoke(self.prompts[0]) == cut

    async def test_async_forms_do_not_block_the_loop(self, llm: BaseLLM) -> None:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                # 1 ms: the tiny models answer all three calls in ~10 ms.
                await asyncio.sleep(0.001)
                ticks += 1

        task = asyncio.create_task(ticker())
        try:
            out = await llm.ainvoke(PROMPT)
            chunks = [c async for c in llm.astream(PROMPT)]
            outs = await llm.abatch(self.prompts[:2])
        finally:
            task.cancel()
        assert out == llm.invoke(PROMPT)
        assert "".join(chunks) == out
        assert len([c for c in chunks if c]) > 1
        if self.batch_matches_single:
            assert outs == [llm.invoke(p) for p in self.prompts[:2]]
        assert ticks > 3, "the event loop was blocked while the model generated"

    def test_cache_keeps_models_and_options_apart(self, llm: BaseLLM, other_llm: BaseLLM) -> None:
        assert llm._identifying_params != other_llm._identifying_params
        set_llm_cache(InMemoryCache())
        try:
            short = llm.invoke(self.prompts[0], **{self.max_tokens_option: 2})
            longer = llm.invoke(self.prompts[0], **{self.max_tokens_option: 6})
            assert short != longer
            assert longer.startswith(short)
            assert llm.invoke(self.prompts[0], **{self.max_tokens_option: 2}) == short
        finally:
            set_llm_cache(None)

    def test_prompt_template_pipe(self, llm: BaseLLM) -> None:
        chain = PromptTemplate.from_template("The capital of {country} is") | llm
        out = chain.invoke({"country": "France"})
        assert out == llm.invoke("The capital of France is")

    def test_unknown_option_is_refused(self, llm: BaseLLM) -> None:
        with pytest.raises(TypeError, match="unknown option"):
            llm.invoke(PROMPT, no_such_option=1)

    # ------------------------------------------- one instance, any pattern of use
    # Each pattern runs under a bounded wait: a hang fails the test instead of CI.
    def test_two_streams_read_in_turn(self, llm: BaseLLM) -> None:
        a, b = self.prompts[0], self.prompts[1]

        def interleave() -> tuple[str, str]:
            pieces = list(zip_longest(llm.stream(a), llm.stream(b), fillvalue=""))
            return "".join(p for p, _ in pieces), "".join(q for _, q in pieces)

        assert bounded(interleave) == (llm.invoke(a), llm.invoke(b))

    def test_call_inside_a_stream(self, llm: BaseLLM) -> None:
        a, b = self.prompts[0], self.prompts[1]

        def nested() -> tuple[str, list[str]]:
            outer, inner = [], []
            for piece in llm.stream(a):
                outer.append(piece)
                if len(inner) < 2:
                    inner.append(llm.invoke(b))
            return "".join(outer), inner

        outer, inner = bounded(nested)
        assert outer == llm.invoke(a)
        assert inner == [llm.invoke(b)] * 2

    def test_call_from_a_token_callback(self, llm: BaseLLM) -> None:
        b = self.prompts[1]
        answers: list[str] = []

        class CallsBack(BaseCallbackHandler):
            def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
                if not answers:
                    answers.append("")  # once only: the inner call has callbacks too
                    answers[0] = llm.invoke(b)

        out = bounded(lambda: llm.invoke(PROMPT, config={"callbacks": [CallsBack()]}))
        assert out == llm.invoke(PROMPT)
        assert answers == [llm.invoke(b)]

    def test_abandoned_stream_does_not_block_others(self, llm: BaseLLM) -> None:
        expected = llm.invoke(PROMPT)

        def abandon() -> tuple[str, str]:
            stream = llm.stream(self.prompts[0])
            next(stream)  # left open: neither read to the end nor closed
            same_thread = llm.invoke(PROMPT)
            other_thread = bounded(llm.invoke, PROMPT)
            stream.close()
            return same_thread, other_thread

        assert bounded(abandon) == (expected, expected)

    async def test_two_async_streams_read_in_turn(self, llm: BaseLLM) -> None:
        a, b = self.prompts[0], self.prompts[1]
        sa, sb = llm.astream(a), llm.astream(b)
        texts = ["", ""]
        live = [sa, sb]
        while live:
            for i, s in enumerate((sa, sb)):
                if s in live:
                    try:
                        texts[i] += await asyncio.wait_for(anext(s), HANG_S)
                    except StopAsyncIteration:
                        live.remove(s)
        assert texts == [llm.invoke(a), llm.invoke(b)]

    def test_copies_share_the_model_and_answer_alike(self, llm: BaseLLM) -> None:
        expected = llm.invoke(PROMPT)
        shallow = llm.model_copy()
        deep = copy.deepcopy(llm)
        assert bounded(shallow.invoke, PROMPT) == expected
        assert bounded(deep.invoke, PROMPT) == expected
        assert deep._identifying_params == llm._identifying_params

    def test_close_frees_the_model_and_refuses_later_use(self, llm: BaseLLM) -> None:
        expected = llm.invoke(PROMPT)
        fresh = pickle.loads(pickle.dumps(llm))  # its own load of the same model
        twin = fresh.model_copy()
        with fresh as same:
            assert same is fresh
            assert fresh.invoke(PROMPT) == expected
        assert fresh.closed
        assert twin.closed  # copies share the model: closed with it
        for use in (
            lambda: fresh.invoke(PROMPT),
            lambda: list(twin.stream(PROMPT)),
            lambda: fresh.batch([PROMPT, PROMPTS[0]]),
        ):
            with pytest.raises(ClosedError, match="was closed"):
                use()
        fresh.close()  # a second close does nothing
        assert llm.invoke(PROMPT) == expected  # other instances of the model go on

    async def test_async_with_closes_and_refuses_later_use(self, llm: BaseLLM) -> None:
        async with pickle.loads(pickle.dumps(llm)) as fresh:
            assert await fresh.ainvoke(PROMPT) == llm.invoke(PROMPT)
        with pytest.raises(ClosedError):
            await fresh.ainvoke(PROMPT)
        with pytest.raises(ClosedError):
            async for _ in fresh.astream(PROMPT):
                pass

    def test_close_during_a_stream_lets_it_finish(self, llm: BaseLLM) -> None:
        fresh = pickle.loads(pickle.dumps(llm))
        expected = fresh.invoke(PROMPT)
        stream = fresh.stream(PROMPT)
        first = next(stream)
        bounded(fresh.close)  # returns at once: the memory goes when the stream ends
        assert first + "".join(stream) == expected
        with pytest.raises(ClosedError):
            fresh.invoke(PROMPT)

    def test_pickle_round_trip_loads_the_same_model(self, llm: BaseLLM) -> None:
        again = pickle.loads(pickle.dumps(llm))
        assert type(again) is type(llm)
        assert again._identifying_params == llm._identifying_params
        assert again.invoke(PROMPT) == llm.invoke(PROMPT)


def rss_mb() -> float:
    """This process's resident memory in MB, after a garbage collection."""
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def bounded(fn: Callable[..., T], *args: Any, timeout: float = HANG_S) -> T:
    """``fn(*args)`` in a helper thread; a test failure if it has not ended in time."""
    done: list[Any] = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            done.append(fn(*args))
        except BaseException as e:
            failed.append(e)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        pytest.fail(f"hung: {getattr(fn, '__name__', fn)} did not end within {timeout} s")
    if failed:
        raise failed[0]
    return done[0]


def _join_stream(llm: BaseLLM, prompt: str, **kwargs: Any) -> Any:
    """The final aggregated chunk of a stream, with its generation_info."""
    total = None
    for chunk in llm._stream(prompt, **kwargs):
        total = chunk if total is None else total + chunk
    return total
