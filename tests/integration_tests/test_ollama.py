"""Ollama against the loopback server that speaks Ollama's API (real Gemma tokens), and
against a real Ollama when ``OLLAMA_BASE_URL`` is set (model: ``OLLAMA_MODEL``)."""

from __future__ import annotations

import json
import os
import warnings

import pydantic
import pytest
from langchain_core.callbacks import CallbackManager, StreamingStdOutCallbackHandler

from langchain_localllms import Grammar, LlamaCpp, Ollama
from langchain_localllms.errors import (
    BadRequestError,
    ContextOverflowError,
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
        # Ollama cuts an over-long prompt to num_ctx instead of failing it (this class
        # then raises ContextOverflowError: the contract's overflow test), so here the
        # prompt that fails is one whose runner errors (the server's error line).
        one_at_a_time = llm.model_copy(update={"max_concurrency": 1})
        good = self.prompts[:2]
        want = one_at_a_time.batch(good)
        ollama.inject("error", after=0)  # the next generation: the first of the batch
        outs = one_at_a_time.batch([self.prompts[2], *good], return_exceptions=True)
        assert isinstance(outs[0], ServerError)
        assert "running the model" in str(outs[0])
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


# ------------------------------------------------------------------------- pull
@pytest.fixture(scope="module")
def empty_ollama():
    """A fresh Ollama with no model pulled, whose registry has Gemma as gemma3:270m."""
    server = servers.OllamaLoopback({}, library={GEMMA: servers.gemma_gguf()})
    yield server
    server.stop()


def test_pull_true_pulls_a_missing_model_with_progress_then_generates(empty_ollama, gemma):
    events = []
    llm = Ollama(
        model=GEMMA, base_url=empty_ollama.url, pull=True, on_progress=events.append, **GREEDY
    )
    sent = [(r["method"], r["path"], r["body"]) for r in empty_ollama.requests[:2]]
    assert sent == [
        ("POST", "/api/show", {"model": GEMMA}),  # 404: not there
        ("POST", "/api/pull", {"model": GEMMA, "stream": True}),
    ]
    assert events[0].status == "pulling manifest"
    assert [e.status for e in events[-3:]] == [
        "verifying sha256 digest",
        "writing manifest",
        "success",
    ]
    layers: dict[str, list] = {}
    for event in events:
        if event.digest:
            layers.setdefault(event.digest, []).append(event)
    weights = layers[max(layers, key=lambda d: layers[d][0].total)]
    assert weights[0].total == servers.gemma_gguf().stat().st_size
    assert len(weights) > 3  # the bytes as they arrived
    done = [e.completed or 0 for e in weights]
    assert done == sorted(done)
    for digest, lines in layers.items():
        assert {e.status for e in lines} == {f"pulling {digest[7:19]}"}
        assert lines[-1].completed == lines[-1].total  # each layer complete at its end
    assert llm.invoke(PROMPT) == gemma.invoke(PROMPT)  # the pulled model is Gemma


async def test_pulling_a_model_again_finds_every_layer_present(empty_ollama):
    llm = Ollama(model=GEMMA, base_url=empty_ollama.url, pull=True)  # pulled once at most
    events = []
    await llm.apull(on_progress=events.append, progress_bar=False)
    layer_lines = [e for e in events if e.digest]
    assert layer_lines
    assert all(e.completed == e.total for e in layer_lines)
    assert len(layer_lines) == len({e.digest for e in layer_lines})  # one line each
    assert events[-1].done


def test_a_name_the_registry_lacks_is_not_found(empty_ollama):
    with pytest.raises(
        NotFoundError,
        match=r"could not pull 'no-such-model'.*file does not exist.*ollama\.com/library",
    ):
        Ollama(model="no-such-model", base_url=empty_ollama.url, pull=True)


def test_without_pull_a_missing_model_is_an_error_at_first_use(empty_ollama):
    before = len(empty_ollama.requests)
    llm = Ollama(model="llama2", base_url=empty_ollama.url)
    assert len(empty_ollama.requests) == before  # no request at construction
    with pytest.raises(NotFoundError, match="run `ollama pull llama2`"):
        llm.invoke("x")


def test_validate_model_on_init(ollama):
    with pytest.raises(
        NotFoundError,
        match=r"'llama2' is not in Ollama at .*`ollama pull llama2`.*pull=True.*"
        r"models: gemma3:270m",
    ):
        Ollama(model="llama2", base_url=ollama.url, validate_model_on_init=True)
    Ollama(model=GEMMA, base_url=ollama.url, validate_model_on_init=True)
    assert (ollama.requests[-1]["path"], ollama.requests[-1]["body"]) == (
        "/api/show",
        {"model": GEMMA},
    )


# ---------------------------------------------------------------------- context
LONG = " ".join(f"Item {i} is on the list." for i in range(40))  # ~300 tokens


async def test_a_prompt_longer_than_num_ctx_is_an_error_not_a_silent_cut(gemma, ollama):
    llm = gemma.model_copy(update={"num_ctx": 128, "num_predict": 4})
    with pytest.raises(
        ContextOverflowError, match=r"kept 128 tokens of a context of 128 .*truncate=True"
    ) as e:
        llm.invoke(LONG)
    assert ollama.log[-1].startswith("truncating input prompt")  # the server cut it
    assert e.value.context == 128
    assert e.value.prompt_tokens == llm.get_num_tokens(LONG) > 128  # our own count
    with pytest.raises(ContextOverflowError):
        list(llm.stream(LONG))
    with pytest.raises(ContextOverflowError):
        await llm.ainvoke(LONG)


def test_truncate_true_takes_ollamas_cut_with_a_warning(gemma):
    llm = gemma.model_copy(update={"num_ctx": 128, "num_predict": 4, "truncate": True})
    with pytest.warns(UserWarning, match="Ollama cut the prompt"):
        gen = llm.generate([LONG]).generations[0][0]
    assert gen.text
    assert gen.generation_info["prompt_truncated"] is True
    assert gen.generation_info["prompt_tokens"] == 128  # what Ollama kept
    with pytest.warns(UserWarning, match="truncate=True"):
        gemma.invoke(LONG, num_ctx=128, num_predict=4, truncate=True)  # per call


def test_no_false_alarm_when_ollama_reuses_its_cache(gemma, ollama):
    llm = gemma.model_copy(update={"num_ctx": 128, "num_predict": 4})
    fits = " ".join(f"Item {i} is on the list." for i in range(12))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = llm.generate([fits]).generations[0][0]
        again = llm.generate([fits]).generations[0][0]
    counted = first.generation_info["prompt_tokens"]
    assert ollama.reused[-1] == counted  # the second time the prompt came from the cache
    assert again.generation_info["prompt_tokens"] == counted < 127  # counted whole
    assert again.text == first.text


def test_with_num_ctx_unset_the_servers_own_context_is_checked(ollama):
    # ollama#6286: the server's default context cuts long prompts; asked via /api/ps.
    llm = Ollama(model=GEMMA, base_url=ollama.url, num_predict=1)
    with pytest.raises(ContextOverflowError, match="context of 2048") as e:
        llm.invoke("word " * 2100)
    assert e.value.context == ollama.n_ctx == 2048
    assert ("GET", "/api/ps") in [(r["method"], r["path"]) for r in ollama.requests[-3:]]


def test_num_ctx_auto_is_the_trained_context(ollama):
    llm = Ollama(model=GEMMA, base_url=ollama.url, num_ctx="auto", **GREEDY)
    assert llm.model_info().context_length == 32768  # gemma3.context_length of the GGUF
    assert llm.invoke(PROMPT)
    assert ollama.requests[-1]["body"]["options"]["num_ctx"] == 32768
    assert ollama.ps()["models"][0]["context_length"] == 32768


def test_model_info_reports_the_context_the_server_runs(gemma):
    gemma.invoke(PROMPT)
    assert gemma.model_info().context_length == 2048  # the server's default, from /api/ps
    assert gemma.model_copy(update={"num_ctx": 512}).model_info().context_length == 512


async def test_unload_frees_the_model_now(gemma, ollama):
    gemma.invoke(PROMPT)
    assert GEMMA in ollama._loaded
    gemma.unload()
    assert ollama.requests[-1]["body"] == {"model": GEMMA, "keep_alive": 0}
    assert GEMMA not in ollama._loaded
    assert ollama.ps() == {"models": []}
    assert gemma.invoke(PROMPT)  # loads again
    await gemma.aunload()
    assert GEMMA not in ollama._loaded


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


@real
def test_real_ollama_cut_prompt_is_an_error_and_unload_works():
    llm = Ollama(model=REAL_MODEL, base_url=REAL_URL, num_ctx=256, num_predict=4)
    with pytest.raises(ContextOverflowError, match="context of 256"):
        llm.invoke(LONG * 2)
    llm.unload()  # (a pull needs Ollama's registry, over the internet: not tested here)


def test_tokens_are_counted_offline_with_the_models_own_vocabulary(gemma, model_path):
    # The loopback server, like Ollama, names the GGUF it runs in /api/show's modelfile.
    ref = LlamaCpp(model_path=str(model_path("gemma-gguf")), n_ctx=64)
    assert gemma.get_num_tokens(PROMPT) == ref.get_num_tokens(PROMPT) > 5
    assert gemma.get_token_ids(PROMPT) == ref.client.tokenize(
        PROMPT.encode(), add_bos=False, special=True
    )
