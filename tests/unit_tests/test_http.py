"""The shared HTTP layer: reply framings, errors, pooling, credentials (no sockets)."""

from __future__ import annotations

import asyncio
import base64
import logging

import httpx
import pytest

from langchain_localllms.core.http import (
    Endpoint,
    read_messages,
    server_message,
    sse_events,
)
from langchain_localllms.core.redact import is_secret, redact, redact_headers, redact_url
from langchain_localllms.errors import (
    BadRequestError,
    IncompleteResponseError,
    NotFoundError,
    ServerError,
)
from tests.unit_tests.wire import (
    Chunks,
    FakeServer,
    body_reply,
    http_reply,
    json_reply,
    read,
    sse,
    text_reply,
)


def is_stop(message):
    return message.get("stop") is True


def is_done(message):
    return message.get("done") is True


def endpoint(fake, url="http://127.0.0.1:8080", **kw):
    return Endpoint(
        url,
        server="the test server",
        start_hint="Start it with `serve-it`.",
        client_kwargs=fake.kwargs(),
        **kw,
    )


def completion(fake, **kw):
    return list(
        endpoint(fake, **kw).stream("/completion", {"prompt": "x"}, framing="sse", is_final=is_stop)
    )


# ---------------------------------------------------------------------- SSE
def test_sse_fields_comments_multiline_and_blank_line_framing():
    lines = [
        ": keep-alive comment",
        'data: {"a": 1}',
        "",
        "data: first",
        "data: second",
        "",
        "event: custom",
        "data: z",
        "",
        "data:no-space",
        "",
        "data:  two spaces",
        "",
        "id: 7",
        "retry: 10",
        "data: data: ata",
        "",
        "",
        "data: never finished",
    ]
    assert list(sse_events(lines)) == [
        ("message", '{"a": 1}'),
        ("message", "first\nsecond"),
        ("custom", "z"),
        ("message", "no-space"),
        ("message", " two spaces"),
        ("message", "data: ata"),  # only the prefix goes: no character-set stripping
    ]


def test_sse_llamafile_fork_error_line_is_an_error_event():
    assert list(sse_events(['error: {"code": 500, "message": "boom"}', ""])) == [
        ("error", '{"code": 500, "message": "boom"}')
    ]


def test_recorded_llama_server_stream_parses_to_pieces_and_a_final_message():
    lines = read("llamacpp_stream_stop_word.sse").decode().splitlines()
    messages = list(read_messages(lines, "sse", is_final=is_stop))
    assert "".join(m["content"] for m in messages) == " a man named Apollo 11."
    assert [m["stop"] for m in messages] == [False] * (len(messages) - 1) + [True]
    assert messages[-1]["stopping_word"] == " He"


def test_reply_without_final_message_raises_instead_of_returning_a_partial_answer():
    lines = read("llamacpp_stream_stop_word.sse").decode().splitlines()
    cut = lines[: len(lines) // 2]
    got = []
    with pytest.raises(IncompleteResponseError, match="ended before its final message"):
        got.extend(read_messages(cut, "sse", where="X at u", is_final=is_stop))
    assert got  # the pieces before the cut were read, but the call fails


def test_error_event_mid_stream_raises_with_the_servers_message():
    lines = [
        'data: {"content": "a", "stop": false}',
        "",
        'data: {"error": {"code": 500, "message": "KV cache full"}}',
        "",
    ]
    with pytest.raises(ServerError, match="KV cache full") as e:
        list(read_messages(lines, "sse", where="S", is_final=is_stop))
    assert e.value.server_message == "KV cache full"
    fork = read("llamafile_fork_error.sse").decode().splitlines()
    with pytest.raises(ServerError, match="slot unavailable"):
        list(read_messages(fork, "sse", is_final=is_stop))


def test_ndjson_lines_blank_lines_errors_and_non_json():
    lines = read("ollama_generate_stream.ndjson").decode().splitlines()
    messages = list(read_messages(["", *lines, ""], "ndjson", is_final=is_done))
    assert "".join(m["response"] for m in messages) == " Neil Armstrong."
    with pytest.raises(ServerError, match="unexpected EOF"):
        list(
            read_messages(
                read("ollama_generate_error.ndjson").decode().splitlines(),
                "ndjson",
                is_final=is_done,
            )
        )
    with pytest.raises(ServerError, match="not JSON: '<html>"):
        list(read_messages(["<html>proxy error</html>"], "ndjson", is_final=is_done))


def test_sse_done_marker_is_not_a_message():
    with pytest.raises(IncompleteResponseError):
        list(read_messages(["data: [DONE]", ""], "sse", is_final=is_stop))


@pytest.mark.parametrize(
    ("body", "text"),
    [
        (
            read("llamacpp_bad_grammar_400.http").partition(b"\r\n\r\n")[2],
            "Failed to initialize samplers: failed to parse grammar",
        ),
        (b'{"error": "model \'llama2\' not found"}', "model 'llama2' not found"),
        (b"404 page not found", "404 page not found"),
        (b"", "(empty reply)"),
    ],
)
def test_server_message_takes_the_servers_own_words(body, text):
    assert server_message(body) == text


# ----------------------------------------------------------- over the transport
def test_stream_in_small_chunks_gives_the_same_messages_sync_and_async():
    data = read("llamacpp_stream_json_schema.sse").replace(b"\n", b"\r\n")  # CRLF framing too
    fake = FakeServer(body_reply(data, "text/event-stream", chunk=5))
    sync = completion(fake)
    expected = list(
        read_messages(
            read("llamacpp_stream_json_schema.sse").decode().splitlines(), "sse", is_final=is_stop
        )
    )
    assert sync == expected

    async def collect():
        ep = endpoint(fake)
        return [
            m
            async for m in ep.astream(
                "/completion", {"prompt": "x"}, framing="sse", is_final=is_stop
            )
        ]

    assert asyncio.run(collect()) == expected


def test_multibyte_characters_split_across_chunks_survive():
    text = "Ünïcødé ✓ 日本語"
    data = (
        f'data: {{"content": "{text}", "stop": false}}\n\ndata: {{"content": "", "stop": true}}\n\n'
    ).encode()
    fake = FakeServer(body_reply(data, "text/event-stream", chunk=3))
    assert completion(fake)[0]["content"] == text


def test_http_error_status_carries_the_servers_message_and_is_typed():
    fake = FakeServer(http_reply("llamacpp_bad_grammar_400.http"))
    with pytest.raises(BadRequestError, match=r"HTTP 400.*failed to parse grammar") as e:
        completion(fake)
    assert isinstance(e.value, ValueError)
    assert e.value.status_code == 400
    with pytest.raises(NotFoundError, match="404 page not found"):
        completion(FakeServer(text_reply("404 page not found", 404)))
    with pytest.raises(ServerError, match=r"HTTP 500.*out of memory"):
        completion(FakeServer(json_reply({"error": "out of memory"}, 500)))


def test_describe_hook_words_an_http_error():
    ep = endpoint(FakeServer(json_reply({"error": "model 'x' not found"}, 404)))
    messages = ep.stream(
        "/p", {}, framing="ndjson", is_final=is_done, describe=lambda s, t: f"custom {s}: {t}"
    )
    with pytest.raises(NotFoundError, match=r"^custom 404: model 'x' not found$"):
        list(messages)


def test_server_not_running_is_a_connection_error_naming_url_and_fix():
    fake = FakeServer(httpx.ConnectError("[Errno 111] Connection refused"))
    with pytest.raises(
        ConnectionError,
        match=r"cannot connect to the test server at http://127\.0\.0\.1:8080 .*`serve-it`",
    ):
        completion(fake)


def test_read_timeout_names_the_configured_timeout():
    fake = FakeServer(httpx.ReadTimeout("timed out"))
    with pytest.raises(TimeoutError, match=r"sent nothing for 2\.5 s \(request_timeout=2\.5\)"):
        completion(fake, timeout=2.5, timeout_name="request_timeout")


def test_connect_timeout_names_the_timeout_too():
    fake = FakeServer(httpx.ConnectTimeout("timed out"))
    with pytest.raises(TimeoutError, match=r"no connection to .* within 2 s \(timeout=2\)"):
        completion(fake, timeout=2)


def test_connection_cut_mid_stream_raises_after_the_pieces_already_read():
    data = read("llamacpp_stream_stop_word.sse")
    fake = FakeServer(body_reply(data[: len(data) // 3], "text/event-stream", chunk=40, cut=True))
    seen = []
    messages = endpoint(fake).stream("/completion", {}, framing="sse", is_final=is_stop)
    with pytest.raises(IncompleteResponseError, match="cut before the answer ended"):
        seen.extend(messages)
    assert seen
    assert not any(m["stop"] for m in seen)


def test_a_cut_after_the_final_message_loses_nothing():
    fake = FakeServer(sse("llamacpp_stream_stop_word.sse", chunk=40, cut=True))
    assert completion(fake)[-1]["stop"] is True


async def test_async_errors_match_the_sync_ones():
    ep = endpoint(FakeServer(httpx.ConnectError("refused")))
    with pytest.raises(ConnectionError, match="serve-it"):
        [m async for m in ep.astream("/completion", {}, framing="sse", is_final=is_stop)]
    data = read("llamacpp_stream_stop_word.sse")
    ep = endpoint(FakeServer(body_reply(data[:300], "text/event-stream", chunk=40, cut=True)))
    with pytest.raises(IncompleteResponseError):
        [m async for m in ep.astream("/completion", {}, framing="sse", is_final=is_stop)]
    ep = endpoint(FakeServer(http_reply("llamacpp_bad_grammar_400.http")))
    with pytest.raises(BadRequestError, match="failed to parse grammar"):
        [m async for m in ep.astream("/completion", {}, framing="sse", is_final=is_stop)]


def test_a_pooled_connection_the_server_closed_is_retried_once_on_a_new_one():
    fake = FakeServer(
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
        sse("llamacpp_stream_stop_word.sse"),
    )
    assert completion(fake)[-1]["stop"] is True
    assert len(fake.requests) == 2


def test_closing_the_iterator_early_closes_the_reply():
    stream = Chunks(read("llamacpp_stream_stop_word.sse"), 30)
    fake = FakeServer(lambda request: httpx.Response(200, stream=stream))
    messages = endpoint(fake).stream("/completion", {}, framing="sse", is_final=is_stop)
    next(messages)
    messages.close()
    assert stream.closed


def test_single_json_reply():
    fake = FakeServer(json_reply({"tokens": [1, 2, 3]}))
    assert endpoint(fake).request_json("/tokenize", {"content": "x"}) == {"tokens": [1, 2, 3]}


# ------------------------------------------------------------------ pooling
def test_one_pooled_client_per_configuration():
    fake = FakeServer(json_reply({}))
    a, b = endpoint(fake), endpoint(fake)
    assert a.client() is b.client()
    assert endpoint(fake, timeout=3).client() is not a.client()
    assert Endpoint("http://127.0.0.1:9", server="s", start_hint="").client() is not a.client()


def test_async_clients_are_pooled_per_event_loop():
    ep = endpoint(FakeServer(json_reply({})))

    async def two():
        return ep.aclient(), ep.aclient()

    first, again = asyncio.run(two())
    assert first is again
    other, _ = asyncio.run(two())
    assert other is not first  # a client bound to a closed loop is never reused


# -------------------------------------------------------------- credentials
def test_credentials_in_the_url_become_basic_auth_and_never_show(caplog):
    fake = FakeServer(json_reply({"tokens": []}))
    ep = endpoint(fake, url="http://alice:s3cr%40t@127.0.0.1:8080/")
    assert ep.url == "http://127.0.0.1:8080"
    with caplog.at_level(logging.DEBUG):
        ep.request_json("/tokenize", {})
    request = fake.requests[-1]
    assert request.headers["Authorization"] == "Basic " + base64.b64encode(b"alice:s3cr@t").decode()
    assert "s3cr" not in str(request.url)
    assert "s3cr" not in caplog.text
    assert "s3cr" not in repr(ep)
    failing = endpoint(
        FakeServer(httpx.ConnectError("refused")), url="http://alice:s3cret@127.0.0.1:8080"
    )
    with pytest.raises(ConnectionError) as e:
        failing.request_json("/tokenize", {})
    assert "s3cret" not in str(e.value)
    assert "alice" not in str(e.value)


def test_bad_urls_are_refused_without_showing_the_password():
    for url in (
        "ftp://bob:hunter2@host",
        "bob:hunter2@host:8080",
        "http://bob:hunter2@host:99999999",
        "http://host/?q=1",
    ):
        with pytest.raises(ValueError, match="base_url") as e:
            Endpoint(url, server="s", start_hint="")
        assert "hunter2" not in str(e.value)
    with pytest.raises(ValueError, match="both in base_url"):
        Endpoint("http://a:b@host", server="s", start_hint="", auth=("a", "b"))
    with pytest.raises(ValueError, match="client_kwargs may not set headers"):
        Endpoint("http://host", server="s", start_hint="", client_kwargs={"headers": {}})


def test_redaction_helpers():
    assert redact_url("https://u:p@example.com:1/x") == "https://***@example.com:1/x"
    assert redact_url("http://example.com") == "http://example.com"
    assert redact_headers({"Authorization": "Bearer t", "X-Api-Key": "k", "Accept": "a"}) == {
        "Authorization": "***",
        "X-Api-Key": "***",
        "Accept": "a",
    }

    nested = {
        "proxy": "http://u:pw@proxy:3128",
        "token": "hf_x",
        "max_tokens": 5,
        "l": ["s://a:b@c"],
    }
    assert redact(nested) == {
        "proxy": "http://***@proxy:3128", "token": "***", "max_tokens": 5, "l": ["s://***@c"]
    }  # fmt: skip
    assert not is_secret("tokenizer")
    assert not is_secret("max_new_tokens")
    assert is_secret("hf_token")
