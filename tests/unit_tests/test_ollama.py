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

import langchain_localllms.core.requests as requests
import langchain_localllms.engines.ollama.context as ollama_context
import langchain_localllms.engines.ollama.pull as ollama_pull
import langchain_localllms.llms._base as base
from langchain_localllms import Grammar, Ollama
from langchain_localllms.core.http import Endpoint
from langchain_localllms.errors import (
    BadRequestError,
    ContextOverflowError,
    IncompleteResponseError,
    NotFoundError,
    ServerError,
)
from langchain_localllms.llms.ollama import PullProgress
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
    monkeypatch.setattr(requests, "_WARNED", set())
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


# ----------------------------------------------------------- pull, context, unload
SHOW = {
    "modelfile": "FROM /nowhere/llama2.gguf\n",
    "parameters": 'stop                           "</s>"',
    "template": "{{ .Prompt }}",
    "details": {"family": "llama"},
    "model_info": {"general.architecture": "llama", "llama.context_length": 8192},
}
NOT_FOUND = json_reply({"error": "model 'llama2' not found"}, 404)


def route(**replies):
    """A reply for each route (``show`` for /api/show, ...); a list is played in order,
    its last reply repeating."""

    def reply(request: httpx.Request) -> httpx.Response:
        chosen = replies[request.url.path.rsplit("/", 1)[-1]]
        if isinstance(chosen, list):
            chosen = chosen.pop(0) if len(chosen) > 1 else chosen[0]
        return chosen(request)

    return reply


def paths(fake):
    return [(r.method, r.url.path) for r in fake.requests]


def final(prompt_eval_count, **more):
    return body_reply(
        lines(
            {"response": "Hi", "done": False},
            {**DONE, "prompt_eval_count": prompt_eval_count, **more},
        ),
        "application/x-ndjson",
    )


class Bar:
    """Records what a tqdm bar is told."""

    made: list[Bar] = []

    def __init__(self, desc, *, total=None, unit="it"):
        self.desc, self.total, self.unit, self.n, self.closed = desc, total, unit, 0, False
        Bar.made.append(self)

    def update(self, n):
        self.n += n

    def close(self):
        self.closed = True


@pytest.fixture
def bars(monkeypatch):
    Bar.made = []
    monkeypatch.setattr(ollama_pull, "progress_bar", Bar)
    return Bar.made


def test_pull_streams_each_status_line_to_the_callback_and_a_bar_per_layer(bars):
    fake = FakeServer(ndjson("ollama_pull_stream.ndjson", chunk=23))
    events = []
    make(fake).pull(on_progress=events.append)
    assert paths(fake) == [("POST", "/api/pull")]
    assert fake.body == {"model": "llama2", "stream": True}
    assert events == [PullProgress.from_message(json.loads(line)) for line in read(
        "ollama_pull_stream.ndjson").splitlines()]  # fmt: skip
    assert (events[1].total, events[1].completed) == (841114235, None)  # none arrived yet
    assert events[4].completed == 838860800  # the server's numbers, as they came
    assert events[-1].done
    assert not events[-2].done
    assert [(b.desc, b.total, b.unit) for b in bars] == [
        ("pulling 8d32a80bb199", 841114235, "B"),
        ("pulling 2409643934fa", 318, "B"),
    ]
    assert all(b.closed and b.n == b.total for b in bars)  # complete once the next step began


def test_pull_takes_the_callback_field_and_can_hide_its_bars(bars):
    events = []
    fake = FakeServer(ndjson("ollama_pull_stream.ndjson"))
    llm = make(fake, on_progress=events.append, timeout=5)
    llm.pull(progress_bar=False)
    assert len(events) == 9
    assert bars == []
    # Ollama is silent while it verifies a large model: a pull has no read timeout
    assert fake.requests[0].extensions["timeout"]["read"] is None


def test_a_pull_that_fails_says_why_and_closes_its_bars(bars):
    fake = FakeServer(ndjson("ollama_pull_error.ndjson"))
    with pytest.raises(
        NotFoundError,
        match=r"could not pull 'llama2': pull model manifest: file does not exist.*"
        r"ollama\.com/library",
    ):
        make(fake).pull()
    cut = FakeServer(
        body_reply(read("ollama_pull_stream.ndjson")[:400], "application/x-ndjson", cut=True)
    )
    with pytest.raises(IncompleteResponseError, match="pull again: Ollama resumes"):
        make(cut).pull()
    assert bars
    assert all(b.closed for b in bars)
    assert bars[0].n < bars[0].total  # an unfinished layer is not shown as complete
    with pytest.raises(BadRequestError, match="invalid model name"):
        make(FakeServer(json_reply({"error": "invalid model name"}, 400))).pull()
    with pytest.raises(
        ServerError, match=r"pulling 'llama2' into Ollama .* failed: write: no space"
    ):
        make(
            FakeServer(
                body_reply(
                    lines(
                        {"status": "pulling manifest"}, {"error": "write: no space left on device"}
                    ),
                    "application/x-ndjson",
                )
            )
        ).pull()


async def test_apull_is_the_async_form(bars):
    events = []
    await make(FakeServer(ndjson("ollama_pull_stream.ndjson", chunk=31))).apull(
        on_progress=events.append
    )
    assert [e.status for e in events][-3:] == [
        "verifying sha256 digest",
        "writing manifest",
        "success",
    ]
    assert len(bars) == 2
    with pytest.raises(NotFoundError, match="file does not exist"):
        await make(FakeServer(ndjson("ollama_pull_error.ndjson"))).apull()


def test_pull_true_pulls_at_construction_only_what_is_missing(bars):
    fake = FakeServer(
        route(show=[NOT_FOUND, json_reply(SHOW)], pull=ndjson("ollama_pull_stream.ndjson"))
    )
    events = []
    make(fake, pull=True, on_progress=events.append)
    assert paths(fake) == [("POST", "/api/show"), ("POST", "/api/pull")]
    assert events[-1].done
    there = FakeServer(json_reply(SHOW))
    llm = make(there, pull=True)
    assert paths(there) == [("POST", "/api/show")]  # present: nothing pulled
    assert llm.pull_if_missing is True
    nothing = FakeServer(NOT_FOUND)
    make(nothing)
    assert nothing.requests == []  # without pull or validate_model_on_init: no request


def test_validate_model_on_init_names_the_local_models_and_the_fix():
    tags = {"models": [{"name": "mistral:latest"}, {"name": "phi3:mini"}]}
    fake = FakeServer(route(show=NOT_FOUND, tags=json_reply(tags)))
    with pytest.raises(
        NotFoundError,
        match=r"'llama2' is not in Ollama at http://localhost:11434 .*run `ollama pull llama2`, "
        r"or pass pull=True.*Its models: mistral:latest, phi3:mini\.",
    ):
        make(fake, validate_model_on_init=True)
    make(FakeServer(json_reply(SHOW)), validate_model_on_init=True)
    with pytest.raises(NotFoundError, match="no Ollama API"):  # a 404 from another server
        make(FakeServer(text_reply("404 page not found", 404)), validate_model_on_init=True)


# ------------------------------------------------------------------- truncation
def test_overflowed_reads_prompt_eval_count_against_the_context():
    assert ollama_context.overflowed(2048, 2048)  # Ollama's Go runner cuts to num_ctx
    assert ollama_context.overflowed(2047, 2048)  # its llama-server runner, to num_ctx - 1
    assert not ollama_context.overflowed(2046, 2048)
    assert not ollama_context.overflowed(0, 2048)  # no count (a cached prompt, Ollama 0.1)


@pytest.mark.parametrize("counted", [128, 127])
def test_a_prompt_ollama_cut_is_an_error(counted):
    fake = FakeServer(final(counted))
    with pytest.raises(
        ContextOverflowError, match=rf"kept {counted} tokens of a context of 128 \(num_ctx\)"
    ) as e:
        make(fake, num_ctx=128).invoke("x")
    assert (e.value.context, e.value.prompt_tokens) == (128, counted)
    assert "truncate=True" in str(e.value)
    assert "Raise num_ctx" in str(e.value)
    assert paths(fake)[0] == ("POST", "/api/generate")


async def test_the_check_runs_streamed_and_async_too():
    llm = make(FakeServer(final(64)), num_ctx=64)
    with pytest.raises(ContextOverflowError):
        list(llm.stream("x"))
    with pytest.raises(ContextOverflowError):
        await llm.ainvoke("x")
    with pytest.raises(ContextOverflowError):
        make(
            FakeServer(
                body_reply(
                    json.dumps({**DONE, "response": "Hi", "prompt_eval_count": 64}).encode(),
                    "application/json",
                )
            ),
            num_ctx=64,
            streaming=False,
        ).invoke("x")


def test_truncate_true_warns_and_marks_the_answer():
    llm = make(FakeServer(final(128)), num_ctx=128, truncate=True)
    with pytest.warns(UserWarning, match=r"Ollama cut the prompt.*\(truncate=True\)"):
        gen = llm.generate(["x"]).generations[0][0]
    assert gen.text == "Hi"
    assert gen.generation_info["prompt_truncated"] is True
    with pytest.warns(UserWarning, match="Ollama cut the prompt"):
        make(FakeServer(final(128)), num_ctx=128).invoke("x", truncate=True)  # per call
    assert llm._identifying_params != make(FakeServer(final(1)), num_ctx=128)._identifying_params


@pytest.mark.parametrize("counted", [None, 0, 1, 100])
def test_no_alarm_for_a_prompt_that_fits_or_a_count_from_the_cache(counted):
    # Ollama 0.1 counted only the tokens it evaluated anew (or sent no count) for a
    # cached prompt: a low count is never taken for a cut.
    done = {k: v for k, v in DONE.items() if k != "prompt_eval_count"}
    if counted is not None:
        done["prompt_eval_count"] = counted
    fake = FakeServer(
        body_reply(lines({"response": "Hi", "done": False}, done), "application/x-ndjson")
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert make(fake, num_ctx=128).invoke("x") == "Hi"
    assert paths(fake) == [("POST", "/api/generate")]


def test_with_num_ctx_unset_the_context_the_server_runs_is_asked_once():
    ps = {"models": [{"name": "llama2:latest", "model": "llama2:latest", "context_length": 4096}]}
    fake = FakeServer(route(generate=final(4096), ps=json_reply(ps), show=json_reply(SHOW)))
    llm = make(fake)
    with pytest.raises(ContextOverflowError, match="context of 4096") as e:
        llm.invoke("x")
    assert e.value.context == 4096
    with pytest.raises(ContextOverflowError):
        llm.invoke("x")
    assert paths(fake).count(("GET", "/api/ps")) == 1  # asked once per instance
    # a short prompt never costs the question
    short = FakeServer(
        route(generate=final(ollama_context.SERVED_CONTEXT_FLOOR - 1), ps=json_reply(ps))
    )
    make(short).invoke("x")
    assert paths(short) == [("POST", "/api/generate")]


def test_without_api_ps_the_modelfile_num_ctx_or_the_trained_context_is_the_bound():
    old_ps = {"models": [{"name": "llama2:latest"}]}  # Ollama before 0.11: no context_length
    modelfile = {**SHOW, "parameters": 'num_ctx                        2048\nstop "</s>"'}
    fake = FakeServer(
        route(generate=final(2048), ps=json_reply(old_ps), show=json_reply(modelfile))
    )
    with pytest.raises(ContextOverflowError, match="context of 2048"):
        make(fake).invoke("x")
    trained = FakeServer(
        route(generate=final(8192), ps=text_reply("404 page not found", 404), show=json_reply(SHOW))
    )
    with pytest.raises(ContextOverflowError, match="context of 8192"):
        make(trained).invoke("x")
    silent = FakeServer(
        route(generate=final(5000), ps=json_reply({"models": []}), show=json_reply({}))
    )
    assert make(silent).invoke("x") == "Hi"  # the server tells nothing: nothing to check


def test_context_helpers_read_ollamas_replies():
    assert ollama_context.trained_context(SHOW) == 8192
    assert ollama_context.trained_context({"model_info": {"qwen2.context_length": 32768}}) == 32768
    assert ollama_context.trained_context({}) is None
    assert ollama_context.modelfile_context({"parameters": "num_keep 24\nnum_ctx  4096"}) == 4096
    assert ollama_context.modelfile_context(SHOW) is None
    ps = {"models": [{"name": "llama2:latest", "context_length": 4096}, {"name": "x:1"}]}
    assert ollama_context.served_context(ps, "llama2") == 4096  # name:latest
    assert ollama_context.served_context(ps, "llama2:13b") is None
    assert ollama_context.served_context({"models": None}, "llama2") is None


# ----------------------------------------------------------------- num_ctx="auto"
def test_num_ctx_auto_sends_the_trained_context_asked_once():
    fake = FakeServer(
        route(show=json_reply(SHOW), generate=ndjson("ollama_generate_stream.ndjson"))
    )
    llm = make(fake, num_ctx="auto")
    assert fake.requests == []  # asked at the first call, not at construction
    llm.invoke("x")
    llm.invoke("y")
    assert paths(fake) == [
        ("POST", "/api/show"),
        ("POST", "/api/generate"),
        ("POST", "/api/generate"),
    ]
    assert fake.bodies[1]["options"]["num_ctx"] == 8192
    assert llm.model_info().context_length == 8192
    assert llm._identifying_params["num_ctx"] == "auto"


async def test_num_ctx_auto_never_blocks_the_event_loop(monkeypatch):
    fake = FakeServer(
        route(show=json_reply(SHOW), generate=ndjson("ollama_generate_stream.ndjson"))
    )

    def sync_request(*a, **k):
        raise AssertionError("a blocking request on the event loop")

    monkeypatch.setattr(Endpoint, "request_json", sync_request)
    assert await make(fake, num_ctx="auto").ainvoke("x") == " Neil Armstrong."
    assert fake.bodies[-1]["options"]["num_ctx"] == 8192


def test_num_ctx_auto_without_a_trained_context_says_so():
    fake = FakeServer(
        route(show=json_reply({"model_info": {}}), generate=ndjson("ollama_generate_stream.ndjson"))
    )
    with pytest.raises(ValueError, match="num_ctx='auto' needs the context"):
        make(fake, num_ctx="auto").invoke("x")


def test_model_info_context_length():
    ps = {"models": [{"name": "llama2:latest", "context_length": 4096}]}
    fake = FakeServer(route(show=json_reply(SHOW), ps=json_reply(ps)))
    assert make(fake).model_info().context_length == 4096  # what the server runs
    assert make(fake, num_ctx=1024).model_info().context_length == 1024
    llm = make(fake, num_ctx=100_000)
    llm.engine.info()
    assert llm.model_info().context_length == 8192  # Ollama caps num_ctx at the trained one
    nothing = FakeServer(route(show=json_reply(SHOW), ps=json_reply({"models": []})))
    assert make(nothing).model_info().context_length is None


# ------------------------------------------------------------------------- unload
async def test_unload_asks_ollama_to_free_the_model():
    reply = {"model": "llama2", "created_at": "2024-09-12T03:54:03.516566Z", "response": "",
             "done": True, "done_reason": "unload"}  # fmt: skip
    fake = FakeServer(json_reply(reply))
    llm = make(fake)
    llm.unload()
    await llm.aunload()
    assert paths(fake) == [("POST", "/api/generate")] * 2
    assert fake.bodies == [{"model": "llama2", "keep_alive": 0}] * 2
    with pytest.raises(NotFoundError, match="ollama pull llama2"):
        make(FakeServer(NOT_FOUND)).unload()
