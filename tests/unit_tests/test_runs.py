"""Each prompt of a batch is a run of its own: its tokens, its end, its failure."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

import pytest
from langchain_core.caches import InMemoryCache
from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler

from tests.unit_tests.fake import BatchingLLM, ScriptedLLM

ANSWERS = {"a": ["A1", "A2"], "b": ["B1", "B2", "B3"], "c": ["C1"], "d": ["D1", "D2"]}


class Runs(BaseCallbackHandler):
    """Records what each run received."""

    def __init__(self) -> None:
        self.prompt: dict[Any, str] = {}
        self.tokens: dict[Any, list[str]] = defaultdict(list)
        self.ended: dict[Any, str] = {}
        self.failed: dict[Any, BaseException] = {}

    def on_llm_start(self, serialized: Any, prompts: list[str], *, run_id: Any, **kw: Any) -> None:
        self.prompt[run_id] = prompts[0]

    def on_llm_new_token(self, token: str, *, run_id: Any, **kw: Any) -> None:
        self.tokens[run_id].append(token)

    def on_llm_end(self, response: Any, *, run_id: Any, **kw: Any) -> None:
        self.ended[run_id] = response.generations[0][0].text

    def on_llm_error(self, error: BaseException, *, run_id: Any, **kw: Any) -> None:
        self.failed[run_id] = error

    def by_prompt(self) -> dict[str, tuple[str, str | None]]:
        """prompt -> (the text its tokens make, the text its run ended with)."""
        return {p: ("".join(self.tokens[r]), self.ended.get(r)) for r, p in self.prompt.items()}


class AsyncRuns(AsyncCallbackHandler, Runs):
    async def on_llm_start(self, *a: Any, **kw: Any) -> None:  # type: ignore[override]
        Runs.on_llm_start(self, *a, **kw)

    async def on_llm_new_token(self, *a: Any, **kw: Any) -> None:  # type: ignore[override]
        Runs.on_llm_new_token(self, *a, **kw)

    async def on_llm_end(self, *a: Any, **kw: Any) -> None:  # type: ignore[override]
        Runs.on_llm_end(self, *a, **kw)

    async def on_llm_error(self, *a: Any, **kw: Any) -> None:  # type: ignore[override]
        Runs.on_llm_error(self, *a, **kw)


def own_tokens(runs: Runs) -> dict[str, tuple[str, str | None]]:
    return {p: ("".join(ANSWERS[p]), "".join(ANSWERS[p])) for p in runs.prompt.values()}


@pytest.mark.parametrize("cls", [ScriptedLLM, BatchingLLM])
@pytest.mark.parametrize("concurrency", [1, 2])
def test_batch_tokens_reach_each_prompts_own_run(cls, concurrency):
    llm = cls(answers=ANSWERS, max_concurrency=concurrency)
    runs = Runs()
    out = llm.batch(["a", "b", "c"], config={"callbacks": [runs]})
    assert out == ["A1A2", "B1B2B3", "C1"]
    assert len(runs.prompt) == 3
    assert runs.by_prompt() == own_tokens(runs)


@pytest.mark.parametrize("cls", [ScriptedLLM, BatchingLLM])
def test_abatch_tokens_reach_each_prompts_own_run(cls):
    llm = cls(answers=ANSWERS, max_concurrency=2)
    runs = AsyncRuns()
    out = asyncio.run(llm.abatch(["a", "b", "c"], config={"callbacks": [runs]}))
    assert out == ["A1A2", "B1B2B3", "C1"]
    assert runs.by_prompt() == own_tokens(runs)


@pytest.mark.parametrize("cls", [ScriptedLLM, BatchingLLM])
@pytest.mark.parametrize("config", [{}, {"max_concurrency": 2}])
def test_one_bad_prompt_fails_only_itself(cls, config):
    llm = cls(answers=ANSWERS, refuse="TOO LONG")
    runs = Runs()
    out = llm.batch(["a", "b TOO LONG", "c", "d"], config={**config, "callbacks": [runs]},
                    return_exceptions=True)  # fmt: skip
    assert out[0] == "A1A2"
    assert out[2] == "C1"
    assert out[3] == "D1D2"
    assert isinstance(out[1], ValueError)
    assert "does not fit" in str(out[1])
    # the bad prompt's run failed; the good ones ended with their own answers
    assert [runs.prompt[r] for r in runs.failed] == ["b TOO LONG"]
    assert sorted(runs.ended.values()) == ["A1A2", "C1", "D1D2"]


@pytest.mark.parametrize("cls", [ScriptedLLM, BatchingLLM])
def test_one_bad_prompt_fails_only_itself_async(cls):
    llm = cls(answers=ANSWERS, refuse="TOO LONG", max_concurrency=2)
    out = asyncio.run(llm.abatch(["a", "b TOO LONG", "c"], config={"max_concurrency": 2},
                                 return_exceptions=True))  # fmt: skip
    assert out[0] == "A1A2"
    assert out[2] == "C1"
    assert isinstance(out[1], ValueError)


def test_native_batching_still_batches_the_good_prompts():
    BatchingLLM.batches.clear()
    llm = BatchingLLM(answers=ANSWERS, refuse="TOO LONG")
    out = llm.batch(["a", "b", "c TOO LONG", "d"], return_exceptions=True)
    assert out[:2] == ["A1A2", "B1B2B3"]
    assert out[3] == "D1D2"
    assert 2 in BatchingLLM.batches  # a and b decoded together, in one native call


def test_without_return_exceptions_the_bad_prompts_error_is_raised_and_runs_end_truthfully():
    # One at a time: the good prompt before it was answered, the bad one failed.
    runs = Runs()
    with pytest.raises(ValueError, match="does not fit"):
        ScriptedLLM(answers=ANSWERS, refuse="TOO LONG").batch(
            ["a", "b TOO LONG"], config={"callbacks": [runs]}
        )
    assert [runs.prompt[r] for r in runs.failed] == ["b TOO LONG"]
    assert list(runs.ended.values()) == ["A1A2"]
    # One native call: it failed for both, and is not retried in parts (nobody asked
    # for the others' answers).
    BatchingLLM.batches.clear()
    runs = Runs()
    with pytest.raises(ValueError, match="does not fit"):
        BatchingLLM(answers=ANSWERS, refuse="TOO LONG").batch(
            ["a", "b TOO LONG"], config={"callbacks": [runs]}
        )
    assert sorted(runs.prompt[r] for r in runs.failed) == ["a", "b TOO LONG"]
    assert BatchingLLM.batches == []


def test_isolation_with_a_cache_answers_cached_prompts_too():
    llm = ScriptedLLM(answers=ANSWERS, refuse="TOO LONG", cache=InMemoryCache())
    assert llm.invoke("a") == "A1A2"
    ScriptedLLM.produced.clear()
    out = llm.batch(["a", "b TOO LONG", "c"], return_exceptions=True)
    assert out[0] == "A1A2"
    assert isinstance(out[1], ValueError)
    assert out[2] == "C1"
    assert ScriptedLLM.produced == ["C1"]  # "a" came from the cache


def test_a_bad_option_fails_every_prompt_alike():
    llm = ScriptedLLM(answers=ANSWERS)
    out = llm.batch(["a", "b"], return_exceptions=True, no_such_option=1)
    assert all(isinstance(o, TypeError) for o in out)


def test_a_call_from_a_callback_during_an_isolating_batch_fails_as_usual():
    llm = ScriptedLLM(answers=ANSWERS, refuse="TOO LONG")
    seen: list[BaseException] = []

    class Nested(BaseCallbackHandler):
        def on_llm_end(self, response: Any, **kw: Any) -> None:
            if not seen:
                try:
                    llm.invoke("x TOO LONG")
                except Exception as e:
                    seen.append(e)

    out = llm.batch(["a", "b TOO LONG"], config={"callbacks": [Nested()]}, return_exceptions=True)
    assert out[0] == "A1A2"
    assert isinstance(out[1], ValueError)
    assert len(seen) == 1
    assert isinstance(seen[0], ValueError)  # its own error, not the batch's
