"""Llamafile against recorded llama.cpp-server replies (no sockets)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pydantic
import pytest
from langchain_core.caches import InMemoryCache
from langchain_core.globals import set_llm_cache

from langchain_localllms import Grammar, Llamafile
from langchain_localllms.errors import (
    BadRequestError,
    IncompleteResponseError,
    NotFoundError,
    ServerError,
)
from tests.unit_tests.wire import (
    FakeServer,
    body_reply,
    http_reply,
    json_reply,
    read,
    sse,
    text_reply,
)

FINAL = {
    "content": "",
    "stop": True,
    "stop_type": "eos",
    "tokens_evaluated": 2,
    "tokens_predicted": 1,
}


def make(fake, **kw):
    return Llamafile(client_kwargs=fake.kwargs(), **kw)


def events(*messages):
    return "".join(f"data: {json.dumps(m)}\n\n" for m in messages).encode()


class Person(pydantic.BaseModel):
    name: str
    age: int


# ------------------------------------------------------------------- requests
def test_defaults_send_only_the_prompt_streaming_and_a_bounded_n_predict():
    fake = FakeServer(sse("llamacpp_stream_stop_word.sse"))
    make(fake).invoke("Hi")
    request = fake.requests[0]
    assert (request.method, str(request.url)) == ("POST", "http://localhost:8080/completion")
    assert fake.body == {"prompt": "Hi", "stream": True, "n_predict": 256}
    assert Llamafile().n_predict == 256
    assert Llamafile().max_concurrency is None  # the server's slot count, asked at a batch


def test_every_option_goes_out_under_the_servers_own_name():
    options = {
        "n_predict": 7, "temperature": 0.2, "top_k": 5, "top_p": 0.5, "min_p": 0.1,
        "tfs_z": 0.9, "typical_p": 0.8, "repeat_penalty": 1.2, "repeat_last_n": 32,
        "penalize_nl": False, "presence_penalty": 0.3, "frequency_penalty": 0.4,
        "mirostat": 2, "mirostat_tau": 4.0, "mirostat_eta": 0.2, "seed": 42, "n_keep": -1,
        "ignore_eos": True, "logit_bias": [[15043, -1.0]], "n_probs": 2, "cache_prompt": False,
    }  # fmt: skip
    fake = FakeServer(sse("llamacpp_stream_stop_word.sse"))
    make(fake, id_slot=1, model_kwargs={"dry_multiplier": 0.5}, **options).invoke("Hi")
    assert fake.body == {
        "prompt": "Hi", "stream": True, **options,
        "id_slot": 1, "slot_id": 1, "dry_multiplier": 0.5,
    }  # fmt: skip


def test_per_call_options_override_for_that_call_only():
    fake = FakeServer(sse("llamacpp_stream_stop_word.sse"))
    llm = make(fake, temperature=0.9)
    llm.invoke("Hi", temperature=0.0, n_predict=3, seed=1)
    llm.invoke("Hi")
    assert [(b["temperature"], b["n_predict"], b.get("seed")) for b in fake.bodies] == [
        (0.0, 3, 1),
        (0.9, 256, None),
    ]


def test_stop_goes_to_the_server_and_the_reply_names_the_stop_word():
    fake = FakeServer(sse("llamacpp_stream_stop_word.sse"))
    gen = make(fake).generate(["The first man on the moon was"], stop=[" He"]).generations[0][0]
    assert fake.body["stop"] == [" He"]
    assert gen.text == " a man named Apollo 11."
    info = gen.generation_info
    assert (info["finish_reason"], info["stop_sequence"]) == ("stop", " He")
    assert (info["prompt_tokens"], info["completion_tokens"], info["total_tokens"]) == (8, 9, 17)
    assert info["timings"]["prompt_ms"] == 24.45
    assert info["timings"]["completion_ms"] == 86.369
    assert info["model"].endswith("gemma-3-270m-Q4_K_M.gguf")


def test_streaming_false_asks_for_one_reply():
    fake = FakeServer(body_reply(read("llamacpp_nonstream_limit.json"), "application/json"))
    llm = make(fake, streaming=False)
    gen = llm.generate(["The first man on the moon was"]).generations[0][0]
    assert fake.body["stream"] is False
    assert gen.text == " a man named Apollo 11. He was a man"
    assert gen.generation_info["finish_reason"] == "length"
    assert (gen.generation_info["prompt_tokens"], gen.generation_info["completion_tokens"]) == (
        8,
        12,
    )


# --------------------------------------------------------------- both dialects
def test_llamafile_fork_booleans_give_finish_reason_and_usage():
    fake = FakeServer(sse("llamafile_fork_stream.sse"))
    chunks = list(make(fake)._stream("The capital of Italy is"))
    assert [c.text for c in chunks] == [" Rome", ".", " The", ""]
    info = chunks[-1].generation_info
    assert info["finish_reason"] == "length"
    assert info["stop_sequence"] is None
    assert (info["prompt_tokens"], info["completion_tokens"]) == (7, 3)
    assert info["timings"]["prompt_ms"] == 35.5
    assert info["timings"]["completion_ms"] == 61.2


@pytest.mark.parametrize(
    ("final", "reason", "stop"),
    [
        ({"stop_type": "limit"}, "length", None),
        ({"stop_type": "eos"}, "stop", None),
        ({"stop_type": "word", "stopping_word": "\n"}, "stop", "\n"),
        ({"stopped_limit": True, "stopped_eos": False, "stopped_word": False}, "length", None),
        ({"stopped_eos": True, "stopped_limit": False, "stopped_word": False}, "stop", None),
        ({"stopped_word": True, "stopping_word": "###", "stopped_eos": False}, "stop", "###"),
    ],
)
def test_why_it_stopped_in_either_dialect(final, reason, stop):
    data = events({"content": "ok", "stop": False}, {"content": "", "stop": True, **final})
    fake = FakeServer(body_reply(data, "text/event-stream"))
    info = make(fake).generate(["x"]).generations[0][0].generation_info
    assert (info["finish_reason"], info["stop_sequence"]) == (reason, stop)


def test_error_events_mid_stream_raise_in_both_dialects():
    with pytest.raises(ServerError, match="slot unavailable"):
        make(FakeServer(sse("llamafile_fork_error.sse"))).invoke("x")
    data = events(
        {"content": "a", "stop": False}, {"error": {"code": 500, "message": "context shift failed"}}
    )
    with pytest.raises(ServerError, match="context shift failed"):
        make(FakeServer(body_reply(data, "text/event-stream"))).invoke("x")


def test_probabilities_and_a_truncated_prompt_are_reported():
    probs = [{"content": "a", "probs": [{"tok_str": "a", "prob": 0.9}]}]
    data = events(
        {"content": "a", "stop": False, "completion_probabilities": probs},
        {**FINAL, "truncated": True, "completion_probabilities": []},
    )
    info = (
        make(FakeServer(body_reply(data, "text/event-stream")), n_probs=1)
        .generate(["x"])
        .generations[0][0]
        .generation_info
    )
    assert info["completion_probabilities"] == probs
    assert info["prompt_truncated"] is True


# ------------------------------------------------------------------ grammars
def test_gbnf_goes_as_grammar_and_a_schema_as_json_schema():
    fake = FakeServer(sse("llamacpp_stream_json_schema.sse"))
    llm = make(fake)
    llm.invoke("x", grammar='root ::= "yes" | "no"')
    assert fake.body["grammar"] == 'root ::= "yes" | "no"'
    assert "json_schema" not in fake.body
    llm.invoke("x", grammar=Grammar.builtin("json"))
    assert fake.body["grammar"] == Grammar.builtin("json").gbnf
    llm.invoke("x", grammar=Person)
    assert fake.body["json_schema"] == Person.model_json_schema()
    assert "grammar" not in fake.body
    llm.invoke("x", json_schema={"type": "object"})
    assert fake.body["json_schema"] == {"type": "object"}
    out = make(fake, json_schema=Person).invoke("A person in JSON:")
    assert fake.body["json_schema"] == Person.model_json_schema()
    assert json.loads(out) == {"name": "John Doe"}


def test_grammar_mistakes_fail_before_any_request():
    fake = FakeServer(sse("llamacpp_stream_json_schema.sse"))
    with pytest.raises(ValueError, match="line 1"):
        make(fake, grammar='root ::= "unclosed')
    with pytest.raises(ValueError, match="not both"):
        make(fake, grammar=Grammar.builtin("json"), json_schema={"type": "object"})
    with pytest.raises(ValueError, match="grammar"):
        make(fake).invoke("x", grammar="root ::= oops")
    with pytest.raises(ValueError, match="json_schema"):
        make(fake).invoke("x", json_schema=Grammar.builtin("json"))
    assert fake.requests == []


# --------------------------------------------------------------------- async
async def test_async_is_native_and_gives_what_sync_gives(monkeypatch):
    import langchain_localllms.llms._base as base

    def no_threads(*a, **k):
        raise AssertionError("async ran the sync client in a worker thread")

    monkeypatch.setattr(base, "iterate_in_thread", no_threads)
    fake = FakeServer(sse("llamacpp_stream_stop_word.sse", chunk=50))
    llm = make(fake)
    sync = llm.generate(["p"]).generations[0][0]
    result = await llm.agenerate(["p"])
    agen = result.generations[0][0]
    assert agen.text == sync.text == " a man named Apollo 11."
    assert agen.generation_info["stop_sequence"] == sync.generation_info["stop_sequence"] == " He"
    assert "".join([c async for c in llm.astream("p")]) == sync.text


class Slots(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """A server with unlimited slots that counts requests in progress and answers each
    prompt with itself in upper case. ``GET /props`` reports ``total`` slots (None:
    the route is missing, as on servers that have no /props)."""

    def __init__(self, delay: float = 0.05, total: int | None = None) -> None:
        self.delay = delay
        self.total = total
        self.now = self.peak = 0
        self.probes = 0
        self.lock = threading.Lock()

    def _props(self) -> httpx.Response:
        self.probes += 1
        if self.total is None:
            return httpx.Response(404, json={"error": {"code": 404, "message": "File Not Found"}})
        return httpx.Response(200, json={"total_slots": self.total})

    def _enter(self) -> None:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)

    def _reply(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            self.now -= 1
        prompt = json.loads(request.content)["prompt"]
        data = events({"content": prompt.upper(), "stop": False}, FINAL)
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=data)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/props":
            return self._props()
        self._enter()
        time.sleep(self.delay)
        return self._reply(request)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/props":
            return self._props()
        self._enter()
        await asyncio.sleep(self.delay)
        return self._reply(request)


PROMPTS = [f"prompt {i}" for i in range(8)]


async def test_abatch_keeps_max_concurrency_requests_in_flight():
    slots = Slots()
    outs = await Llamafile(client_kwargs={"transport": slots}).abatch(PROMPTS)
    assert outs == [p.upper() for p in PROMPTS]
    assert slots.peak == 4  # the server has no /props: 4 at once
    slots2 = Slots(total=8)
    await Llamafile(client_kwargs={"transport": slots2}, max_concurrency=2).abatch(PROMPTS)
    assert (slots2.peak, slots2.probes) == (2, 0)  # set by the user: the server is not asked


@pytest.mark.parametrize("total", [3, 6])
async def test_abatch_uses_as_many_requests_as_the_server_has_slots(total):
    slots = Slots(total=total)
    llm = Llamafile(client_kwargs={"transport": slots})
    outs = await llm.abatch(PROMPTS)
    assert outs == [p.upper() for p in PROMPTS]
    assert slots.peak == total
    await llm.abatch(PROMPTS)
    assert slots.probes == 1  # asked once per instance


async def test_a_server_without_props_is_asked_once_and_never_from_the_event_loop():
    slots = Slots()  # /props answers 404
    llm = Llamafile(client_kwargs={"transport": slots})
    sync_probes = []
    real = slots.handle_request
    slots.handle_request = lambda request: (sync_probes.append(request.url.path), real(request))[1]
    await llm.abatch(PROMPTS)
    await llm.abatch(PROMPTS)
    assert slots.probes == 1  # the failure is remembered
    assert "/props" not in sync_probes  # no blocking request on the loop
    assert slots.peak == 4


def test_batch_uses_as_many_requests_as_the_server_has_slots_and_invoke_does_not_ask():
    slots = Slots(delay=0.1, total=6)
    llm = Llamafile(client_kwargs={"transport": slots})
    assert llm.invoke("a") == "A"
    assert slots.probes == 0  # one prompt needs no slot count
    assert llm.batch(PROMPTS) == [p.upper() for p in PROMPTS]
    assert (slots.peak, slots.probes) == (6, 1)


def test_batch_and_generate_keep_max_concurrency_requests_in_flight():
    slots = Slots(delay=0.1)
    llm = Llamafile(client_kwargs={"transport": slots})
    assert llm.batch(PROMPTS) == [p.upper() for p in PROMPTS]
    assert slots.peak == 4
    slots.peak = 0
    result = llm.generate(PROMPTS)
    assert [g[0].text for g in result.generations] == [p.upper() for p in PROMPTS]
    assert slots.peak == 4
    assert result.llm_output["token_usage"] == {
        "prompt_tokens": 16,
        "completion_tokens": 8,
        "total_tokens": 24,
    }


# -------------------------------------------------------------------- errors
def test_server_not_running_names_url_and_how_to_start_a_llamafile():
    fake = FakeServer(httpx.ConnectError("[Errno 111] Connection refused"))
    with pytest.raises(
        ConnectionError, match=r"llamafile server at http://localhost:8080 .*--server"
    ):
        make(fake).invoke("x")


def test_http_errors_carry_the_servers_message():
    with pytest.raises(BadRequestError, match="failed to parse grammar"):
        make(FakeServer(http_reply("llamacpp_bad_grammar_400.http"))).invoke("x")
    not_found = json_reply({"error": {"code": 404, "message": "File Not Found"}}, 404)
    with pytest.raises(NotFoundError, match=r"no /completion route.*File Not Found.*Ollama"):
        make(FakeServer(not_found)).invoke("x")
    loading = json_reply({"error": {"code": 503, "message": "Loading model"}}, 503)
    with pytest.raises(ServerError, match="still loading"):
        make(FakeServer(loading)).invoke("x")
    with pytest.raises(ServerError, match=r"HTTP 502.*Bad Gateway"):
        make(FakeServer(text_reply("Bad Gateway", 502))).invoke("x")


async def test_a_cut_connection_raises_instead_of_returning_a_partial_answer():
    data = read("llamacpp_stream_stop_word.sse")[:400]
    fake = FakeServer(body_reply(data, "text/event-stream", chunk=64, cut=True))
    with pytest.raises(IncompleteResponseError):
        make(fake).invoke("x")
    with pytest.raises(IncompleteResponseError):
        await make(fake).ainvoke("x")
    ended = FakeServer(body_reply(data, "text/event-stream"))  # closed cleanly, but no final event
    with pytest.raises(IncompleteResponseError):
        make(ended).invoke("x")


def test_timeout_error_names_request_timeout():
    fake = FakeServer(httpx.ReadTimeout("timed out"))
    with pytest.raises(TimeoutError, match="request_timeout=3"):
        make(fake, request_timeout=3).invoke("x")


def test_bad_settings_are_refused_at_construction():
    with pytest.raises(ValueError, match="http"):
        Llamafile(base_url="localhost:8080")
    with pytest.raises(ValueError, match="model_kwargs may not set prompt, temperature"):
        Llamafile(model_kwargs={"temperature": 1, "prompt": "x"})
    with pytest.raises(Exception, match="n_predict"):
        Llamafile(n_predict=-5)
    with pytest.raises(Exception, match="nonsense"):
        Llamafile(nonsense=1)
    with pytest.raises(TypeError, match=r"unknown option.*max_tokens"):
        Llamafile().invoke("x", max_tokens=3)


# ---------------------------------------------------- identity and credentials
def test_credentials_are_sent_but_never_shown():
    fake = FakeServer(sse("llamacpp_stream_stop_word.sse"))
    llm = make(fake, base_url="http://ann:pa55word@127.0.0.1:8080", headers={"X-Api-Key": "k3y"})
    llm.invoke("x")
    assert fake.requests[0].headers["Authorization"].startswith("Basic ")
    assert fake.requests[0].headers["X-Api-Key"] == "k3y"
    shown = (
        repr(llm) + str(llm) + json.dumps(llm._identifying_params, default=str) + str(llm.asdict())
    )
    assert "pa55word" not in shown
    assert "k3y" not in shown
    assert "ann:" not in shown
    failing = Llamafile(
        base_url="http://ann:pa55word@127.0.0.1:8080",
        client_kwargs=FakeServer(httpx.ConnectError("no")).kwargs(),
    )
    with pytest.raises(ConnectionError) as e:
        failing.invoke("x")
    assert "pa55word" not in str(e.value)


def test_a_proxy_password_reaches_no_repr_trace_or_cache_key():
    llm = Llamafile(client_kwargs={"proxy": "http://user:hunter2@proxy:3128"})
    # invocation_params (what every callback and tracer gets) and the cache key come
    # from dict(); repr and str are what logs show.
    for text in (repr(llm), str(llm), repr(llm.dict()), repr(llm._dict_for_compat())):
        assert "hunter2" not in text
    assert "proxy:3128" in repr(llm)  # redacted, not dropped


def test_identity_tells_servers_sampling_and_grammars_apart():
    a = Llamafile(temperature=0)
    assert a._identifying_params != Llamafile(temperature=0.7)._identifying_params
    assert (
        a._identifying_params
        != Llamafile(temperature=0, base_url="http://other:8080")._identifying_params
    )
    assert a._identifying_params != Llamafile(temperature=0, grammar=Person)._identifying_params
    assert (
        Llamafile(grammar=Person)._identifying_params
        == Llamafile(json_schema=None, grammar=Grammar.from_pydantic(Person))._identifying_params
    )


def test_cache_key_includes_per_call_options():
    fake = FakeServer(sse("llamacpp_stream_stop_word.sse"))
    llm = make(fake)
    set_llm_cache(InMemoryCache())
    try:
        llm.invoke("x", n_predict=2)
        llm.invoke("x", n_predict=2)
        llm.invoke("x", n_predict=3)
    finally:
        set_llm_cache(None)
    assert [b["n_predict"] for b in fake.bodies] == [2, 3]


def test_langsmith_params_and_token_counting():
    llm = make(FakeServer(json_reply({"tokens": [9259, 1902]})), temperature=0.5, n_predict=9)
    params = llm._get_ls_params()
    assert (params["ls_provider"], params["ls_temperature"], params["ls_max_tokens"]) == (
        "llamafile",
        0.5,
        9,
    )
    assert llm.get_num_tokens("Hello world") == 2
