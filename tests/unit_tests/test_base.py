"""The shared base class: what every runtime inherits."""

import asyncio

import pytest
from langchain_core.caches import InMemoryCache
from langchain_core.callbacks import BaseCallbackHandler, CallbackManager
from langchain_core.outputs import GenerationChunk
from langchain_core.prompts import PromptTemplate

from tests.unit_tests.fake import ScriptedLLM, scripted


class Recorder(BaseCallbackHandler):
    def __init__(self):
        self.tokens = []
        self.chunks = []
        self.ends = []

    def on_llm_new_token(self, token, *, chunk=None, **kwargs):
        self.tokens.append(token)
        self.chunks.append(chunk)

    def on_llm_end(self, response, **kwargs):
        self.ends.append(response)


def test_invoke_stream_and_callbacks_agree():
    rec = Recorder()
    llm = scripted(callbacks=[rec])
    assert llm.invoke("hi there") == "Hello, world!"
    assert "".join(rec.tokens) == "Hello, world!"
    assert all(
        isinstance(c, GenerationChunk) and c.text == t
        for c, t in zip(rec.chunks, rec.tokens, strict=True)
    )
    assert list(scripted().stream("hi")) == ["Hello", ",", " wor", "ld", "!", ""]


def test_usage_and_finish_reason():
    result = scripted().generate(["one two", "three"])
    infos = [g[0].generation_info for g in result.generations]
    assert [i["prompt_tokens"] for i in infos] == [2, 1]
    assert all(
        i["completion_tokens"] == 5 and i["total_tokens"] == i["prompt_tokens"] + 5 for i in infos
    )
    assert result.llm_output["token_usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 10,
        "total_tokens": 13,
    }
    assert infos[0]["finish_reason"] == "stop"
    assert infos[0]["timings"]["completion_ms"] >= 0
    short = scripted().generate(["x"], max_tokens=2).generations[0][0]
    assert short.text == "Hello,"
    assert short.generation_info["finish_reason"] == "length"


def test_stop_across_pieces_reports_stop_and_closes_the_runtime():
    llm = scripted()
    gen = llm.generate(["x"], stop=[" world"]).generations[0][0]
    assert gen.text == "Hello,"
    assert gen.generation_info["finish_reason"] == "stop"
    assert gen.generation_info["stop_sequence"] == " world"
    assert ScriptedLLM.streams_closed == [True]
    assert "!" not in ScriptedLLM.produced  # decoding ended at the stop


def test_stop_in_two_places_is_an_error_and_bad_stop_is_typed():
    with pytest.raises(ValueError, match="give it in one place"):
        scripted(stop=["a"]).invoke("x", stop=["b"])
    with pytest.raises((TypeError, ValueError), match="list of strings"):
        scripted(stop="\n")
    assert scripted(stop=["wor"]).invoke("x") == "Hello, "


def test_unknown_and_invalid_call_options_are_refused():
    with pytest.raises(TypeError, match=r"unknown option.*max_lenght.*max_tokens"):
        scripted().invoke("x", max_lenght=3)
    with pytest.raises(Exception, match="max_tokens"):
        scripted().invoke("x", max_tokens="many")
    with pytest.raises(TypeError, match="unknown option"):
        list(scripted().stream("x", bogus=1))


def test_unknown_init_argument_is_refused():
    with pytest.raises(Exception, match="bogus"):
        ScriptedLLM(bogus=1)


def test_callback_manager_alias_from_the_seeds():
    rec = Recorder()
    llm = ScriptedLLM(callback_manager=CallbackManager([rec]))
    llm.invoke("x")
    assert "".join(rec.tokens) == "Hello, world!"


def test_cache_key_includes_call_options_and_instance_params():
    cache = InMemoryCache()
    a = scripted(cache=cache, answers={"p": ["A", "B", "C"]})
    assert a.invoke("p", max_tokens=1) == "A"
    assert a.invoke("p", max_tokens=2) == "AB"  # not the cached "A"
    assert a.invoke("p", max_tokens=1) == "A"
    b = scripted(cache=cache, answers={"p": ["X"]}, temperature=0.5)
    assert b.invoke("p", max_tokens=1) == "X"
    assert a._identifying_params != b._identifying_params


def test_error_mid_stream_propagates():
    with pytest.raises(RuntimeError, match="mid-stream"):
        scripted(fail_after=2).invoke("x")


def test_prompt_template_composes():
    chain = PromptTemplate.from_template("Q: {q}") | scripted(answers={"Q: hi": ["yes"]})
    assert chain.invoke({"q": "hi"}) == "yes"


def test_ls_params():
    p = scripted(max_tokens=7)._get_ls_params(stop=["x"])
    assert p["ls_provider"] == "scripted"
    assert p["ls_max_tokens"] == 7
    assert p["ls_stop"] == ["x"]


async def test_async_does_not_block_the_loop_and_stops_early():
    llm = scripted(delay=0.02)
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    t = asyncio.create_task(ticker())
    assert await llm.ainvoke("x") == "Hello, world!"
    t.cancel()
    assert ticks >= 5  # the loop kept running while the runtime worked
    chunks = [c async for c in llm.astream("x")]
    assert "".join(chunks) == "Hello, world!"
    assert await llm.abatch(["a", "b"]) == ["Hello, world!"] * 2


async def test_abandoned_async_stream_stops_the_runtime():
    llm = scripted(delay=0.02, pieces=[str(i) for i in range(50)])
    agen = llm.astream("x")
    async for _ in agen:
        break
    await agen.aclose()
    await asyncio.sleep(0.1)
    assert ScriptedLLM.streams_closed == [True]
    assert len(ScriptedLLM.produced) < 10


def test_abandoned_sync_stream_stops_the_runtime():
    llm = scripted(pieces=[str(i) for i in range(50)])
    it = llm.stream("x")
    next(it)
    it.close()
    assert ScriptedLLM.streams_closed == [True]
    assert len(ScriptedLLM.produced) < 5


def test_batch_keeps_order_with_concurrency():
    llm = scripted(answers={"a": ["1"], "b": ["2"], "c": ["3"]}, max_concurrency=3, delay=0.01)
    assert llm.batch(["a", "b", "c"]) == ["1", "2", "3"]


def test_with_grammar_binds_and_parses():
    import pydantic

    class Person(pydantic.BaseModel):
        name: str
        age: int

    seen = {}

    class Capture(ScriptedLLM):
        def _pieces(self, prompt, call, tally):
            seen["grammar"] = call.params.get("grammar")
            yield from super()._pieces(prompt, call, tally)

    ScriptedLLM.streams_closed.clear()
    llm = Capture(pieces=['{"name": "Ada", ', '"age": 36}'])
    person = llm.with_grammar(Person).invoke("Describe a person")
    assert person == Person(name="Ada", age=36)
    assert seen["grammar"].model is Person
    with pytest.raises(pydantic.ValidationError):
        Capture(pieces=['{"name": "Ada"}']).with_grammar(Person).invoke("x")


def test_token_counts_never_fall_back_to_a_downloaded_vocabulary():
    # LangChain's default fetches GPT-2's tokenizer from the Hub (a network call, the
    # wrong vocabulary); a class that cannot tokenize says so instead.
    llm = ScriptedLLM()
    with pytest.raises(NotImplementedError, match="never downloads"):
        llm.get_num_tokens("hello")
    with pytest.raises(NotImplementedError, match="never downloads"):
        llm.get_token_ids("hello")
