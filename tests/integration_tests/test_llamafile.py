"""Llamafile against a real llama.cpp server (``llama-server``, 4 slots, Gemma-3-270M).

A llamafile is this server in one file; ``LLAMAFILE_BASE_URL`` is not needed: the
server is built from the llama-cpp-python sdist and started here.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pydantic
import pytest
from langchain_core.callbacks import CallbackManager, StreamingStdOutCallbackHandler

from langchain_localllms import Grammar, Llamafile
from langchain_localllms.errors import BadRequestError, IncompleteResponseError
from tests.integration_tests import servers
from tests.integration_tests.contract import PROMPT, PROMPTS, LLMContract

# cache_prompt off: a slot reusing another prompt's KV cache may round differently.
GREEDY = {"temperature": 0.0, "n_predict": 16, "cache_prompt": False}


@pytest.fixture(scope="module")
def server():
    return servers.llama_server()


@pytest.fixture(scope="module")
def gemma(server):
    return Llamafile(base_url=server.url, **GREEDY)


class TestLlamaServerContract(LLMContract):
    # llama.cpp's server refuses an over-long prompt with HTTP 400, which is kept as
    # the server's own error (a ValueError, like ContextOverflowError).
    overflow_error = BadRequestError
    max_tokens_option = "n_predict"

    @pytest.fixture
    def llm(self, gemma):
        return gemma


def test_known_greedy_answer(gemma):
    # Gemma-3-270M's greedy continuation, as llama.cpp gives it with no penalties.
    assert gemma.invoke("The first man on the moon was").startswith(" a man named Apollo 11.")


def test_stop_is_applied_by_the_server_and_named(gemma):
    gen = gemma.generate(["The first man on the moon was"], stop=[" He"]).generations[0][0]
    assert gen.text == " a man named Apollo 11."
    info = gen.generation_info
    assert (info["finish_reason"], info["stop_sequence"]) == ("stop", " He")
    assert info["completion_tokens"] < 16  # the server stopped generating at the stop
    assert info["timings"]["completion_ms"] > 0
    assert info["timings"]["completion_tokens_per_second"]


def test_seed_makes_sampling_repeatable(gemma):
    a = gemma.invoke(PROMPT, temperature=1.0, seed=7)
    b = gemma.invoke(PROMPT, temperature=1.0, seed=7)
    assert a == b


def test_json_grammar_gives_json(gemma):
    prompt = 'A person in JSON: {"name": "Ada", "age": 36}\nDescribe a person in JSON format:'
    gen = gemma.generate([prompt], grammar=Grammar.builtin("json"), n_predict=96).generations[0][0]
    assert gen.generation_info["finish_reason"] == "stop"
    assert isinstance(json.loads(gen.text), dict)


class Person(pydantic.BaseModel):
    name: str
    age: int


def test_json_schema_per_call_and_bound(gemma):
    out = gemma.invoke("Describe a person in JSON format:", json_schema=Person, n_predict=64)
    assert Person.model_validate_json(out).name
    bound = gemma.bind(grammar=Grammar.from_pydantic(Person), n_predict=64)
    assert json.loads(bound.invoke("Describe a person in JSON format:"))["age"] >= 0


def test_json_schema_as_gbnf_for_the_llamafile_fork(gemma):
    # The llamafile fork has no json_schema: convert the schema to GBNF here instead.
    gbnf = Grammar.from_pydantic(Person).gbnf
    out = gemma.invoke("Describe a person in JSON format:", grammar=gbnf, n_predict=64)
    assert Person.model_validate_json(out)


def test_list_grammar_streams_a_json_list(server):
    llm = Llamafile(
        base_url=server.url, temperature=0, n_predict=256, grammar=Grammar.builtin("list")
    )
    pieces = list(llm.stream("List of top-3 my favourite books:"))
    assert len(pieces) > 2
    value = json.loads("".join(pieces))
    assert isinstance(value, list)
    assert value
    assert all(isinstance(v, str) for v in value)


def test_a_schema_the_server_rejects_is_its_400_message(gemma):
    with pytest.raises(BadRequestError, match="JSON schema") as e:
        gemma.invoke("x", json_schema={"type": "nonsense"})
    assert isinstance(e.value, ValueError)
    assert e.value.status_code == 400


def test_server_not_running():
    url = f"http://127.0.0.1:{servers.free_port()}"
    with pytest.raises(ConnectionError, match=f"llamafile server at {url} .*--server"):
        Llamafile(base_url=url).invoke("x")
    with pytest.raises(ConnectionError) as e:
        Llamafile(base_url=url.replace("//", "//joe:Secr3t@")).invoke("x")
    assert "Secr3t" not in str(e.value)


def test_read_timeout_names_request_timeout(server):
    with pytest.raises(TimeoutError, match=r"request_timeout=0\.001"):
        Llamafile(base_url=server.url, request_timeout=0.001, n_predict=64).invoke(PROMPT)


def test_connection_cut_mid_answer_raises():
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    events = [
        b'data: {"content": " Rome", "stop": false}\n\n',
        b'data: {"content": ".", "stop": false}\n\n',
    ]
    llm = Llamafile(base_url=servers.one_shot_server(head + servers.chunked(*events)))
    with pytest.raises(IncompleteResponseError, match="cut before the answer ended"):
        llm.invoke("The capital of Italy is")


def test_token_count_from_the_server(gemma):
    assert gemma.get_num_tokens("Hello world") == 2


async def test_abatch_of_8_keeps_all_4_slots_busy(server):
    llm = Llamafile(base_url=server.url, temperature=0, n_predict=16, cache_prompt=False)
    prompts = [*PROMPTS, PROMPT, "Count: 1, 2, 3,", "Roses are red,", "Once upon a time", "The sky"]
    busiest = 0
    done = asyncio.Event()

    async def watch_slots() -> None:
        nonlocal busiest
        async with httpx.AsyncClient(base_url=server.url) as client:
            while not done.is_set():
                slots = (await client.get("/slots")).json()
                busiest = max(busiest, sum(s["is_processing"] for s in slots))
                await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch_slots())
    try:
        outs = await llm.abatch(prompts)
    finally:
        done.set()
        await watcher
    # max_concurrency unset: one request per slot the server reports in /props (read
    # from the server, not the fallback of 4, which equals this server's slot count).
    assert busiest == server.parallel == 4
    assert llm.engine.reported_slots == server.parallel
    # Each answer came back in its prompt's place: it starts as that prompt's own
    # greedy answer does (batched decoding may round near-ties differently later on).
    starts = [llm.invoke(p, n_predict=3) for p in prompts]
    assert [o.split()[:1] for o in outs] == [s.split()[:1] for s in starts]


def test_seed_flow_streams_to_stdout(server, capsys):
    llm = Llamafile(
        base_url=server.url,
        n_predict=12,
        callback_manager=CallbackManager([StreamingStdOutCallbackHandler()]),
    )
    out = llm.invoke("The first man on the moon was ... Let's think step by step.")
    assert out
    assert out in capsys.readouterr().out
