"""ChatOllama against replies written from Ollama's API reference (no sockets)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from langchain_core.tools import tool
from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_localllms import ChatOllama, Grammar
from langchain_localllms.chat_models._tools import ToolCallError
from tests.unit_tests.wire import FakeServer

STANDARD = {"temperature": 0, "num_predict": 100, "timeout": 60, "stop": []}


class TestChatOllamaUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatOllama]:
        return ChatOllama

    @property
    def standard_chat_model_params(self) -> dict[str, Any]:
        return dict(STANDARD)  # Ollama takes no api_key, and retries nothing

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model": "llama3.2"}


def ollama(*messages: dict[str, Any], capabilities: list[str] | None = None) -> FakeServer:
    """A server whose ``/api/chat`` streams ``messages`` and whose ``/api/show`` lists
    ``capabilities``."""
    body = "".join(json.dumps(m) + "\n" for m in messages).encode()

    def reply(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/show":
            return httpx.Response(200, json={"capabilities": capabilities or ["completion"]})
        return httpx.Response(200, headers={"content-type": "application/x-ndjson"}, content=body)

    return FakeServer(reply)


def said(content: str = "", **fields: Any) -> dict[str, Any]:
    return {
        "model": "m",
        "message": {"role": "assistant", "content": content, **fields},
        "done": False,
    }


DONE = {"model": "m", "message": {"role": "assistant", "content": ""}, "done": True,
        "done_reason": "stop", "prompt_eval_count": 7, "eval_count": 3,
        "prompt_eval_duration": 1_000_000, "eval_duration": 2_000_000}  # fmt: skip


def make(fake: FakeServer, **kwargs: Any) -> ChatOllama:
    return ChatOllama(model="m", client_kwargs=fake.kwargs(), **kwargs)


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def test_thinking_streams_as_reasoning_content_and_never_into_content():
    fake = ollama(said(thinking="Sky "), said(thinking="scatters."), said("Rayleigh."), DONE)
    chunks = list(make(fake, reasoning=True).stream("Why is the sky blue?"))
    assert [c.additional_kwargs.get("reasoning_content") for c in chunks[:2]] == [
        "Sky ",
        "scatters.",
    ]
    assert "".join(c.content for c in chunks) == "Rayleigh."
    message = make(fake, reasoning=True).invoke("Why?")
    assert message.additional_kwargs == {"reasoning_content": "Sky scatters."}
    assert message.content == "Rayleigh."
    assert message.usage_metadata == {"input_tokens": 7, "output_tokens": 3, "total_tokens": 10}
    assert fake.body["think"] is True


def test_native_tool_calls_are_validated_and_keep_the_servers_id():
    call = {
        "id": "call_abc12345",
        "function": {"index": 0, "name": "add", "arguments": {"a": 1, "b": 2}},
    }
    fake = ollama(said(tool_calls=[call]), DONE, capabilities=["completion", "tools"])
    message = make(fake).bind_tools([add]).invoke("1 plus 2?")
    assert message.tool_calls == [
        {"name": "add", "args": {"a": 1, "b": 2}, "id": "call_abc12345", "type": "tool_call"}
    ]
    assert message.response_metadata["finish_reason"] == "tool_calls"
    assert fake.body["tools"][0]["function"]["name"] == "add"
    assert "format" not in fake.body  # auto: Ollama's own tool calling


def test_arguments_sent_as_json_text_are_read_too():
    call = {"function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
    fake = ollama(said(tool_calls=[call]), DONE, capabilities=["completion", "tools"])
    (parsed,) = make(fake).bind_tools([add]).invoke("1 plus 2?").tool_calls
    assert parsed["args"] == {"a": 1, "b": 2}
    assert parsed["id"].startswith("call_")


def test_a_native_call_that_does_not_fit_its_schema_is_an_error():
    call = {"function": {"name": "add", "arguments": {"a": "one"}}}
    fake = ollama(said(tool_calls=[call]), DONE, capabilities=["completion", "tools"])
    why = "'b' is a required property; /a: 'one' is not of type 'integer'"
    with pytest.raises(ToolCallError, match=why):
        make(fake).bind_tools([add]).invoke("1 plus 2?")


def test_auto_text_that_is_no_call_stays_text():
    fake = ollama(said('{"joke": "a"}'), DONE)  # JSON, but no call of a bound tool
    assert make(fake).bind_tools([add]).invoke("A joke in JSON?").content == '{"joke": "a"}'
    fake = ollama(said('{"name": "add", "arguments": {"a": 1, "b": 2}}'), DONE)
    assert make(fake).bind_tools([add]).invoke("1 plus 2?").tool_calls[0]["args"] == {
        "a": 1,
        "b": 2,
    }


def test_formats_of_structured_output_bindings():
    fake = ollama(said("{}"), DONE)
    make(fake).invoke("Hi", grammar=Grammar.builtin("json"))
    assert fake.body["format"] == "json"
    make(fake).invoke("Hi", response_format={"schema": None})
    assert fake.body["format"] == "json"
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    make(fake).invoke("Hi", grammar=Grammar.from_json_schema(schema))
    assert fake.body["format"] == schema
    with pytest.raises(ValueError, match="no GBNF"):
        make(fake).invoke("Hi", grammar='root ::= "a"')


def test_nothing_is_asked_at_construction_and_client_kwargs_merge():
    fake = ollama(DONE)
    chat = ChatOllama(
        model="m", sync_client_kwargs=fake.kwargs(), async_client_kwargs=fake.kwargs()
    )
    assert fake.requests == []
    assert chat.client_kwargs == fake.kwargs()
    with pytest.raises(ValueError, match="one client_kwargs"):
        ChatOllama(
            model="m", sync_client_kwargs={"verify": False}, async_client_kwargs={"verify": True}
        )
