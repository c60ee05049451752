"""Ollama against the loopback server that speaks Ollama's API (real Gemma tokens), and
against a real Ollama when ``OLLAMA_BASE_URL`` is set (model: ``OLLAMA_MODEL``)."""

from __future__ import annotations

import json
import os

import pydantic
import pytest
from langchain_core.callbacks import CallbackManager, StreamingStdOutCallbackHandler

from langchain_localllms import Grammar, LlamaCpp, Ollama
from langchain_localllms.errors import (
    BadRequestError,
    IncompleteResponseError,
    NotFoundError,
    ServerError,
)
from tests.integration_tests import servers
from tests.integration_tests.contract import PROMPT, PROMPTS, LLMContract

GREEDY = {"temperature": 0.0, "num_predict": 16}
GEMMA = servers.GEMMA


@pytest.fixture(scope="module")
def ollama():
    return servers.ollama_server()


@pytest.fixture(scope="module")
def gemma(ollama):
    return Ollama(model=GEMMA, base_url=ollama.url, **GREEDY)


class TestLoopbackContract(LLMContract):
    max_tokens_option = "num_predict"
    names_the_stop = False  # Ollama ends at the stop and does not say it was one

    @pytest.fixture
    def llm(self, gemma):
        return gemma

    def test_batch_isolates_a_prompt_that_fails(self, llm, ollama):
        # Ollama cuts an over-long prompt to num_ctx instead of failing it, so here the
        # prompt that fails is one whose runner errors (the server's error line).
        one_at_a_time = llm.model_copy(update={"max_concurrency": 1})
        good = self.prompts[:2]
        want = one_at_a_time.batch(good)
        ollama.inject("error", after=0)  # the next generation: the first of the batch
        outs = one_at_a_time.batch([self.prompts[2], *good], return_exceptions=True)
        assert isinstance(outs[0], ServerError) and "running the model" in str(outs[0])
        assert outs[1:] == want


class Person(pydantic.BaseModel):
    name: str
    age: int


def test_known_greedy_answer(ollama):
    llm = Ollama(model=GEMMA, base_url=ollama.url, repeat_penalty=1.0, **GREEDY)
    assert llm.invoke("The first man on the moon was").startswith(" a man named Apollo 11.")


def test_the_request_is_the_contracts(gemma, ollama):
    gemma.invoke(PROMPT, top_k=20, seed=3, keep_alive="5m", system="Be brief.")
    request = ollama.requests[-1]
    assert (request["method"], request["path"]) == ("POST", "/api/generate")
    assert request["body"] == {
        "model": GEMMA,
        "prompt": PROMPT,
        "stream": True,
        "system": "Be brief.",
        "keep_alive": "5m",
        "options": {"num_predict": 16, "temperature": 0.0, "top_k": 20, "seed": 3},
    }
    assert ollama.warnings == []  # no option the server does not know


def test_system_goes_through_the_models_template(gemma):
    system = "The capital of France is Paris."
    templated = gemma.invoke("The capital of Italy is", system=system)
    assert templated == gemma.invoke(f"{system}\n\nThe capital of Italy is", raw=True)
    own = gemma.invoke("Italy", template="The capital of {{ .Prompt }} is")
    assert own == gemma.invoke("The capital of Italy is")


def test_format_json_and_schemas_give_json(gemma):
    prompt = 'A person in JSON: {"name": "Ada", "age": 36}\nDescribe a person in JSON format:'
    gen = gemma.generate([prompt], format="json", num_predict=96).generations[0][0]
    assert gen.generation_info["finish_reason"] == "stop"
    assert isinstance(json.loads(gen.text), dict)
    person = Person.model_validate_json(
        gemma.invoke("Describe a person in JSON format:", format=Person, num_predict=64)
    )
    assert person.name
    bound = gemma.bind(grammar=Grammar.from_pydantic(Person), num_predict=64)
    assert Person.model_validate_json(bound.invoke("Describe a person in JSON format:"))


def test_gbnf_is_refused_before_any_request(gemma, ollama):
    before = len(ollama.requests)
    with pytest.raises(ValueError, match="takes no GBNF"):
        gemma.invoke("x", grammar=Grammar.builtin("list"))
    assert len(ollama.requests) == before


@pytest.mark.parametrize("streaming", [True, False])
def test_a_stop_ends_generation_on_the_server_with_exact_usage(gemma, streaming):
    llm = gemma.model_copy(update={"streaming": streaming})
    p = "The first man on the moon was"
    full = llm.generate([p]).generations[0][0]
    assert " He" in full.text, full.text
    gen = llm.generate([p], stop=[" He"]).generations[0][0]
    info = gen.generation_info
    assert gen.text == full.text[: full.text.index(" He")]
    assert info["finish_reason"] == "stop"
    # the server's own counts: the whole prompt, and fewer tokens than the full answer
    assert info["prompt_tokens"] == full.generation_info["prompt_tokens"] > 0
    assert 0 < info["completion_tokens"] < full.generation_info["completion_tokens"]
    assert gemma.invoke(PROMPT)  # the loopback server is free again


def test_unknown_model_says_how_to_pull_it(ollama):
    with pytest.raises(
        NotFoundError, match=r"model 'llama2' not found at .*run `ollama pull llama2`"
    ):
        Ollama(model="llama2", base_url=ollama.url).invoke("x")


def test_not_running_names_url_and_ollama_serve():
    url = f"http://127.0.0.1:{servers.free_port()}"
    with pytest.raises(ConnectionError, match=f"Ollama at {url} .*`ollama serve`"):
        Ollama(model=GEMMA, base_url=url).invoke("x")


def test_a_request_ollama_refuses_carries_its_message(gemma):
    with pytest.raises(BadRequestError, match="does not support thinking"):
        gemma.invoke("x", think=True)
    with pytest.raises(BadRequestError, match="does not support insert"):
        gemma.invoke("def f(", suffix="return x")


async def test_an_error_line_mid_stream_raises(gemma, ollama):
    ollama.inject("error", after=2)
    with pytest.raises(ServerError, match="error was encountered while running the model"):
        gemma.invoke(PROMPT)
    ollama.inject("error", after=2)
    with pytest.raises(ServerError, match="error was encountered"):
        await gemma.ainvoke(PROMPT)
    assert gemma.invoke(PROMPT)


async def test_a_cut_connection_raises_instead_of_a_partial_answer(gemma, ollama):
    ollama.inject("cut", after=3)
    with pytest.raises(IncompleteResponseError):
        gemma.invoke(PROMPT)
    ollama.inject("cut", after=3)
    with pytest.raises(IncompleteResponseError):
        [c async for c in gemma.astream(PROMPT)]
    assert gemma.invoke(PROMPT)


def test_basic_auth_from_the_url(ollama):
    ollama.require_auth = ("amy", "t0p-s3cret")
    try:
        port = ollama.url.rsplit(":", 1)[1]
        llm = Ollama(model=GEMMA, base_url=f"http://amy:t0p-s3cret@127.0.0.1:{port}", **GREEDY)
        assert llm.invoke(PROMPT)
        assert "t0p-s3cret" not in repr(llm)
        with pytest.raises(ServerError, match="HTTP 401") as e:
            Ollama(model=GEMMA, base_url=f"http://amy:wrong-pw@127.0.0.1:{port}").invoke("x")
        assert "wrong-pw" not in str(e.value)
    finally:
        ollama.require_auth = None


def test_keep_alive_zero_unloads_after_the_answer(gemma, ollama):
    assert gemma.invoke(PROMPT, keep_alive=0)
    assert ollama.requests[-1]["body"]["keep_alive"] == 0
    assert GEMMA not in ollama._loaded
    assert gemma.invoke(PROMPT)  # loads again


def test_streaming_false_gives_the_same_answer(gemma):
    one = gemma.model_copy(update={"streaming": False})
    gen = one.generate([PROMPT]).generations[0][0]
    assert gen.text == gemma.invoke(PROMPT)
    assert gen.generation_info["completion_tokens"] > 0


def test_model_info(gemma):
    info = gemma.get_model_info()
    assert info["details"]["family"] == "gemma3"
    assert "{{ .Prompt }}" in info["template"]


async def test_abatch_of_8_in_order(gemma):
    prompts = [
        *PROMPTS,
        PROMPT,
        "Count: 1, 2, 3,",
        "Roses are red,",
        "Once upon a time",
        "The sky is",
    ]
    outs = await gemma.abatch(prompts)
    assert outs == [gemma.invoke(p) for p in prompts]


def test_seed_flow_streams_to_stdout(ollama, capsys):
    llm = Ollama(
        model=GEMMA,
        base_url=ollama.url,
        num_predict=12,
        callback_manager=CallbackManager([StreamingStdOutCallbackHandler()]),
    )
    out = llm.invoke("The first man on the moon was ...")
    assert out
    assert out in capsys.readouterr().out


# ----------------------------------------------------------------- a real Ollama
REAL_URL = os.environ.get("OLLAMA_BASE_URL")
REAL_MODEL = os.environ.get("OLLAMA_MODEL", "llama3.2")
real = pytest.mark.skipif(
    not REAL_URL, reason="set OLLAMA_BASE_URL (and OLLAMA_MODEL) to test against a real Ollama"
)


@real
class TestRealOllamaContract(LLMContract):
    names_the_stop = False
    max_tokens_option = "num_predict"
    batch_matches_single = False  # Ollama may decode parallel requests together

    @pytest.fixture
    def llm(self):
        return Ollama(model=REAL_MODEL, base_url=REAL_URL, temperature=0, seed=0, num_predict=24)


@real
def test_real_ollama_json_format():
    llm = Ollama(model=REAL_MODEL, base_url=REAL_URL, temperature=0, num_predict=128, format=Person)
    assert Person.model_validate_json(llm.invoke("Describe a person called Ada, aged 36, in JSON."))


@real
def test_real_ollama_unknown_model():
    with pytest.raises(NotFoundError, match="ollama pull no-such-model-xyz"):
        Ollama(model="no-such-model-xyz", base_url=REAL_URL).invoke("x")


@real
def test_real_ollama_model_info():
    assert "template" in Ollama(model=REAL_MODEL, base_url=REAL_URL).get_model_info()


def test_tokens_are_counted_offline_with_the_models_own_vocabulary(gemma, model_path):
    # The loopback server, like Ollama, names the GGUF it runs in /api/show's modelfile.
    ref = LlamaCpp(model_path=str(model_path("gemma-gguf")), n_ctx=64)
    assert gemma.get_num_tokens(PROMPT) == ref.get_num_tokens(PROMPT) > 5
    assert gemma.get_token_ids(PROMPT) == ref.client.tokenize(PROMPT.encode(), add_bos=False, special=True)
