"""Ollama against replies written from its API reference (no sockets)."""

from __future__ import annotations

import asyncio
import base64
import json
import warnings

import httpx
import pydantic
import pytest
from langchain_core.load import dumpd

import langchain_localllms._base as base
from langchain_localllms import Grammar, Ollama
from langchain_localllms.errors import IncompleteResponseError, NotFoundError, ServerError
from tests.unit_tests.wire import (
    Chunks,
    FakeServer,
    body_reply,
    json_reply,
    ndjson,
    read,
    text_reply,
)

DONE = {"model": "llama2", "response": "", "done": True, "done_reason": "stop",
        "prompt_eval_count": 3,
        "prompt_eval_duration": 2_000_000, "eval_count": 1, "eval_duration": 4_000_000}  # fmt: skip


def make(fake, **kw):
    kw.setdefault("model", "llama2")
    return Ollama(client_kwargs=fake.kwargs(), **kw)


def lines(*messages):
    return "".join(json.dumps(m) + "\n" for m in messages).encode()


class Person(pydantic.BaseModel):
    name: str
    age: int


# ------------------------------------------------------------------- requests
def test_defaults_send_model_prompt_stream_and_a_bounded_num_predict():
    fake = FakeServer(ndjson("ollama_generate_stream.ndjson"))
    assert make(fake).invoke("Hi") == " Neil Armstrong."
    request = fake.requests[0]
    assert (request.method, str(request.url)) == ("POST", "http://localhost:11434/api/generate")
    assert fake.body == {
        "model": "llama2",
        "prompt": "Hi",
        "stream": True,
        "options": {"num_predict": 256},
    }


def test_options_hold_exactly_the_known_keys_and_the_rest_goes_top_level():
    options = {
        "num_keep": 4, "seed": 42, "num_predict": 9, "top_k": 10, "top_p": 0.5, "min_p": 0.1,
        "typical_p": 0.9, "repeat_last_n": 33, "temperature": 0.0, "repeat_penalty": 1.2,
        "presence_penalty": 0.1, "frequency_penalty": 0.2, "num_ctx": 4096, "num_batch": 64,
        "num_gpu": 0, "main_gpu": 0, "use_mmap": False, "num_thread": 2,
    }  # fmt: skip
    top = {"system": "Be brief.", "template": "{{ .Prompt }}", "raw": False, "format": "json",
           "keep_alive": 0, "think": "low", "suffix": "</code>"}  # fmt: skip
    fake = FakeServer(ndjson("ollama_generate_stream.ndjson"))
    make(fake, **options, **top, images=[b"\x89PNG"]).invoke("Hi")
    assert fake.body == {
        "model": "llama2", "prompt": "Hi", "stream": True, **top,
        "images": [base64.b64encode(b"\x89PNG").decode()], "options": options,
    }  # fmt: skip


def test_per_call_options_override_for_that_call_only():
    fake = FakeServer(ndjson("ollama_generate_stream.ndjson"))
    llm = make(fake, temperature=0.8)
    llm.invoke("Hi", temperature=0, num_predict=3, system="S", keep_alive="1m")
    llm.invoke("Hi")
    first, second = fake.bodies
    assert first["options"] == {"temperature": 0, "num_predict": 3}
    assert (first["system"], first["keep_alive"]) == ("S", "1m")
    assert second == {
        "model": "llama2",
        "prompt": "Hi",
        "stream": True,
        "options": {"temperature": 0.8, "num_predict": 256},
    }


def test_the_langchain_ollama_parameter_names_are_accepted():
    llm = Ollama(
        model="llama2:13b", base_url="http://localhost:11434", num_ctx=2048, num_gpu=1,
        num_thread=4, num_predict=64, repeat_last_n=64, repeat_penalty=1.1, temperature=0.8,
        stop=["\n"], top_k=40, top_p=0.9, system="s", template="{{ .Prompt }}", format="json",
        timeout=30, keep_alive="5m", raw=False, headers={"X": "y"}, auth=("u", "p"),
        mirostat=None, mirostat_eta=None, mirostat_tau=None, tfs_z=None,
    )  # fmt: skip
    assert llm._llm_type == "ollama"
    assert llm.model == "llama2:13b"


@pytest.mark.parametrize("name", ["mirostat", "mirostat_tau", "mirostat_eta", "tfs_z"])
def test_parameters_ollama_ignores_are_taken_with_one_warning(name, monkeypatch):
    # langchain_community sends them and Ollama's server ignores them: drop-in code
    # keeps working, and is told once that they change nothing.
    monkeypatch.setattr(base, "_WARNED", set())
    with pytest.warns(UserWarning, match=f"Ollama ignores {name}=1: Ollama's API no longer"):
        Ollama(model="m", **{name: 1})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Ollama(model="m", **{name: 2})  # once per class and parameter


# -------------------------------------------------------------------- format
@pytest.mark.parametrize(
    ("given", "sent"),
    [
        ("json", "json"),
        ({"type": "object"}, {"type": "object"}),
        ('{"type": "object"}', {"type": "object"}),
        (Person, Person.model_json_schema()),
        (Grammar.from_pydantic(Person), Person.model_json_schema()),
    ],
)
def test_format_takes_json_or_a_schema(given, sent):
    fake = FakeServer(ndjson("ollama_generate_stream.ndjson"))
    make(fake, format=given).invoke("x")
    assert fake.body["format"] == sent
    make(fake).invoke("x", format=given)
    assert fake.body["format"] == sent


def test_grammar_per_call_maps_to_format_and_gbnf_is_refused():
    fake = FakeServer(ndjson("ollama_generate_stream.ndjson"))
    make(fake).invoke("x", grammar=Person)
    assert fake.body["format"] == Person.model_json_schema()
    with pytest.raises(ValueError, match="takes no GBNF"):
        make(fake, format=Grammar.builtin("json"))
    with pytest.raises(ValueError, match="takes no GBNF"):
        make(fake).invoke("x", grammar=Grammar.builtin("json"))
    with pytest.raises(ValueError, match="format or grammar"):
        make(fake, format="json").invoke("x", grammar=Person)
    with pytest.raises(ValueError, match="'json' or a JSON schema"):
        make(fake, format="yaml")
    assert len(fake.requests) == 1


# ------------------------------------------------------------------- replies
def test_usage_timings_and_reason_from_the_final_line():
    fake = FakeServer(ndjson("ollama_generate_stream.ndjson", chunk=17))
    chunks = list(make(fake)._stream("The first man on the moon was"))
    assert [c.text for c in chunks] == [" Neil", " Armstrong", ".", ""]
    info = chunks[-1].generation_info
    assert info["finish_reason"] == "length"  # done_reason "length"
    assert (info["prompt_tokens"], info["completion_tokens"], info["total_tokens"]) == (7, 3, 10)
    assert info["timings"]["prompt_ms"] == 325.953
    assert info["timings"]["completion_ms"] == 150.0
    assert info["timings"]["completion_tokens_per_second"] == 20.0  # eval_count / eval_duration
    assert (info["model"], info["load_ms"]) == ("llama2", 5.026)


def test_streaming_false_reads_one_reply():
    fake = FakeServer(body_reply(read("ollama_generate_nonstream.json"), "application/json"))
    gen = make(fake, streaming=False).generate(["x"]).generations[0][0]
    assert fake.body["stream"] is False
    assert gen.text == " Neil Armstrong."
    assert (gen.generation_info["finish_reason"], gen.generation_info["completion_tokens"]) == (
        "stop",
        4,
    )


@pytest.mark.parametrize(
    ("done_reason", "finish"), [("stop", "stop"), ("length", "length"), ("unload", "stop")]
)
def test_finish_reason_from_done_reason(done_reason, finish):
    fake = FakeServer(
        body_reply(lines({**DONE, "done_reason": done_reason}), "application/x-ndjson")
    )
    assert make(fake).generate(["x"]).generations[0][0].generation_info["finish_reason"] == finish


def test_stops_go_to_ollama_and_one_it_misses_is_still_cut_here_and_named():
    pieces = [" Neil", " Armstrong", ".", " He", " was", " born"]
    stream = Chunks(lines(*({"response": p, "done": False} for p in pieces), DONE), 40)
    fake = FakeServer(lambda request: httpx.Response(200, stream=stream))
    gen = make(fake).generate(["x"], stop=[" He"]).generations[0][0]
    assert fake.body["options"]["stop"] == [" He"]
    assert gen.text == " Neil Armstrong."
    assert (gen.generation_info["finish_reason"], gen.generation_info["stop_sequence"]) == (
        "stop",
        " He",
    )
    assert gen.generation_info["completion_tokens"] == 4  # streamed so far, stop included
    assert stream.closed  # the connection closes at the stop, so Ollama stops generating


def test_thinking_is_kept_apart_from_the_answer():
    data = lines(
        {"response": "", "thinking": "Hmm, ", "done": False},
        {"response": "", "thinking": "the moon.", "done": False},
        {"response": "Armstrong", "done": False},
        DONE,
    )
    gen = (
        make(FakeServer(body_reply(data, "application/x-ndjson")), think=True)
        .generate(["x"])
        .generations[0][0]
    )
    assert gen.text == "Armstrong"
    assert gen.generation_info["thinking"] == "Hmm, the moon."


# -------------------------------------------------------------------- errors
def test_unknown_model_says_how_to_pull_it():
    fake = FakeServer(json_reply({"error": "model 'llama2' not found"}, 404))
    with pytest.raises(
        NotFoundError,
        match=r"model 'llama2' not found at http://localhost:11434: run `ollama pull llama2`",
    ):
        make(fake).invoke("x")
    with pytest.raises(NotFoundError, match="ollama pull llama2"):
        make(fake).get_model_info()


def test_a_404_without_a_model_error_is_the_wrong_server():
    fake = FakeServer(text_reply("404 page not found", 404))
    with pytest.raises(NotFoundError, match=r"no Ollama API.*Llamafile"):
        make(fake).invoke("x")


def test_not_running_names_the_url_and_ollama_serve():
    fake = FakeServer(httpx.ConnectError("[Errno 111] Connection refused"))
    with pytest.raises(ConnectionError, match=r"Ollama at http://localhost:11434 .*`ollama serve`"):
        make(fake).invoke("x")


def test_http_errors_carry_ollamas_message():
    fake = FakeServer(json_reply({"error": '"llama2" does not support thinking'}, 400))
    with pytest.raises(ValueError, match="does not support thinking"):
        make(fake, think=True).invoke("x")
    with pytest.raises(ServerError, match=r"HTTP 429.*server busy"):
        make(FakeServer(json_reply({"error": "server busy"}, 429))).invoke("x")


async def test_error_line_and_cut_connection_raise_sync_and_async():
    error = FakeServer(ndjson("ollama_generate_error.ndjson"))
    with pytest.raises(ServerError, match="unexpected EOF"):
        make(error).invoke("x")
    with pytest.raises(ServerError, match="unexpected EOF"):
        await make(error).ainvoke("x")
    data = read("ollama_generate_stream.ndjson")[:200]
    cut = FakeServer(body_reply(data, "application/x-ndjson", chunk=50, cut=True))
    with pytest.raises(IncompleteResponseError):
        make(cut).invoke("x")
    with pytest.raises(IncompleteResponseError):
        await make(cut).ainvoke("x")
    ended = FakeServer(body_reply(data.rsplit(b"\n", 2)[0] + b"\n", "application/x-ndjson"))
    with pytest.raises(IncompleteResponseError, match="final message"):
        make(ended).invoke("x")


def test_timeout_names_the_timeout_field():
    with pytest.raises(TimeoutError, match=r"timeout=5\)"):
        make(FakeServer(httpx.ReadTimeout("timed out")), timeout=5).invoke("x")


# --------------------------------------------------------------- credentials
def test_auth_from_the_url_or_the_auth_field_and_headers_are_sent():
    fake = FakeServer(ndjson("ollama_generate_stream.ndjson"))
    make(fake, base_url="https://amy:t0ps3cret@ollama.example.com", headers={"X-Team": "a"}).invoke(
        "x"
    )
    request = fake.requests[-1]
    assert str(request.url) == "https://ollama.example.com/api/generate"
    assert (
        request.headers["Authorization"] == "Basic " + base64.b64encode(b"amy:t0ps3cret").decode()
    )
    assert request.headers["X-Team"] == "a"
    make(fake, auth=("bob", "pw")).invoke("x")
    assert (
        fake.requests[-1].headers["Authorization"]
        == "Basic " + base64.b64encode(b"bob:pw").decode()
    )
    with pytest.raises(ValueError, match="give them once"):
        Ollama(model="m", base_url="http://a:b@h", auth=("a", "b"))


def test_credentials_never_show_in_repr_identity_or_errors():
    llm = Ollama(
        model="m", base_url="http://amy:t0ps3cret@127.0.0.1:11434",
        headers={"Authorization": "Bearer s3cr3t-token"}, auth=None,
        client_kwargs=FakeServer(httpx.ConnectError("refused")).kwargs(),
    )  # fmt: skip
    shown = (
        repr(llm)
        + str(llm)
        + json.dumps(llm._identifying_params, default=str)
        + str(llm.asdict())
        + str(dumpd(llm))  # what callbacks and tracers get
    )
    assert "t0ps3cret" not in shown
    assert "s3cr3t-token" not in shown
    with pytest.raises(ConnectionError) as e:
        llm.invoke("x")
    assert "t0ps3cret" not in str(e.value)
    assert "pw" not in repr(Ollama(model="m", auth=("u", "pw")))


# ------------------------------------------------------------ async, batches
async def test_async_is_native_and_matches_sync(monkeypatch):
    import langchain_localllms._base as base

    def no_threads(*a, **k):
        raise AssertionError("async ran the sync client in a worker thread")

    monkeypatch.setattr(base, "iterate_in_thread", no_threads)
    llm = make(FakeServer(ndjson("ollama_generate_stream.ndjson", chunk=30)))
    sync = llm.generate(["x"]).generations[0][0]
    agen = (await llm.agenerate(["x"])).generations[0][0]
    assert agen.text == sync.text == " Neil Armstrong."
    assert agen.generation_info["prompt_tokens"] == sync.generation_info["prompt_tokens"] == 7
    assert [c async for c in llm.astream("x")] == [" Neil", " Armstrong", ".", ""]


class Parallel(httpx.AsyncBaseTransport):
    """Counts requests in progress; answers each prompt with itself reversed."""

    def __init__(self) -> None:
        self.now = self.peak = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.now += 1
        self.peak = max(self.peak, self.now)
        await asyncio.sleep(0.05)
        self.now -= 1
        prompt = json.loads(request.content)["prompt"]
        data = lines({"response": prompt[::-1], "done": False}, DONE)
        return httpx.Response(200, content=data)


async def test_abatch_sends_up_to_max_concurrency_at_once_in_order():
    transport = Parallel()
    prompts = [f"p{i}" for i in range(8)]
    outs = await Ollama(
        model="m", client_kwargs={"transport": transport}, max_concurrency=3
    ).abatch(prompts)
    assert outs == [p[::-1] for p in prompts]
    assert transport.peak == 3


# --------------------------------------------------------------------- extras
def test_model_info_from_api_show():
    info = {
        "template": "{{ .Prompt }}",
        "details": {"family": "llama"},
        "capabilities": ["completion"],
    }
    fake = FakeServer(json_reply(info))
    assert make(fake).get_model_info() == info
    assert (fake.requests[0].url.path, fake.body) == ("/api/show", {"model": "llama2"})


def test_identity_and_langsmith_params():
    a = Ollama(model="llama2", temperature=0)
    assert a._identifying_params != Ollama(model="mistral", temperature=0)._identifying_params
    assert (
        a._identifying_params
        != Ollama(model="llama2", temperature=0, format="json")._identifying_params
    )
    assert (
        a._identifying_params
        != Ollama(model="llama2", temperature=0, base_url="http://h:1")._identifying_params
    )
    params = Ollama(model="llama2", temperature=0.3, num_predict=12)._get_ls_params()
    assert (params["ls_provider"], params["ls_model_name"]) == ("ollama", "llama2")
    assert (params["ls_temperature"], params["ls_max_tokens"]) == (0.3, 12)
