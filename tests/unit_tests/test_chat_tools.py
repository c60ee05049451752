"""Our own logic of chat tool calls: choices, grammars, parsing and validation (no model)."""

from __future__ import annotations

import json
import sys

import pytest
from langchain_core.tools import tool

from langchain_localllms.chat_models._tools import (
    HERMES,
    PLAIN,
    CallSyntax,
    ToolCallError,
    ToolSpec,
    call_grammar,
    parse_call,
    resolve_choice,
)
from tests.unit_tests.matching import accepts, guide


@tool
def get_weather(location: str, days: int = 1) -> str:
    """Get the weather at a location."""
    return "sunny"


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


SPECS = [ToolSpec.of(get_weather), ToolSpec.of(add)]


@pytest.mark.parametrize(
    ("choice", "mode", "names"),
    [
        (None, "auto", ["get_weather", "add"]),
        ("auto", "auto", ["get_weather", "add"]),
        ("any", "forced", ["get_weather", "add"]),
        ("required", "forced", ["get_weather", "add"]),
        ("none", "none", []),
        ("add", "forced", ["add"]),
        ({"type": "function", "function": {"name": "add"}}, "forced", ["add"]),
    ],
)
def test_tool_choice_resolves_to_a_mode_and_the_callable_tools(choice, mode, names):
    got_mode, allowed = resolve_choice(SPECS, choice)
    assert got_mode == mode
    assert [t.name for t in allowed] == names


def test_an_unknown_tool_choice_names_what_is_bound():
    with pytest.raises(ValueError, match="bound: get_weather, add"):
        resolve_choice(SPECS, "multiply")


def test_a_valid_call_is_parsed_with_an_id():
    call = parse_call('{"name": "add", "arguments": {"a": 2, "b": 3}}', SPECS, forced=True)
    assert call["name"] == "add"
    assert call["args"] == {"a": 2, "b": 3}
    assert call["id"].startswith("call_")
    assert call["type"] == "tool_call"


def test_text_is_no_call_unless_one_was_forced():
    assert parse_call("It is sunny.", SPECS, forced=False) is None
    with pytest.raises(ToolCallError, match="required"):
        parse_call("It is sunny.", SPECS, forced=True)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"name": "add", "arguments": {"a": 2', "not valid JSON"),
        ('{"arguments": {}}', "no tool name"),
        ('{"name": "multiply", "arguments": {}}', "not a bound tool"),
        ('{"name": "add", "arguments": [1, 2]}', "not an object"),
        ('{"name": "add", "arguments": {"a": 2}}', "'b' is a required property"),
        ('{"name": "add", "arguments": {"a": "2", "b": 3}}', "/a: '2' is not of type 'integer'"),
        ('{"name": "add", "arguments": {"a": true, "b": 3}}', "/a: True is not of type 'integer'"),
    ],
)
def test_an_invalid_call_is_a_typed_error_that_says_why(text, problem):
    # What a runtime without grammars (or a call cut by a stop) can produce.
    with pytest.raises(ToolCallError, match=problem):
        parse_call(text, SPECS, forced=False)


def test_the_grammars_are_gbnf_that_allow_a_call_or_text():
    forced = call_grammar(SPECS[1:], forced=True)
    either = call_grammar(SPECS, forced=False)
    assert "root ::=" in forced.gbnf
    # A forced call without tags is the call's JSON: a schema a server takes as it is.
    assert forced.schema == SPECS[1].call_schema()
    assert either.gbnf.startswith("root ::= json-call | text")
    assert "add" in forced.gbnf
    assert "get_weather" not in forced.gbnf  # only the chosen tool can be called
    assert "add" in either.gbnf
    assert "get_weather" in either.gbnf


def test_a_template_with_hermes_tags_gets_calls_between_them():
    template = "{% for t in tools %}{{ t }}{% endfor %} <tool_call></tool_call>"
    syntax = CallSyntax.of(template)
    assert syntax is HERMES
    assert CallSyntax.of("{{ messages }}") is PLAIN
    forced = call_grammar(SPECS[1:], forced=True, syntax=syntax)
    assert forced.gbnf.startswith('root ::= "<tool_call>\\n" json-call "\\n</tool_call>"')
    text = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 40}}\n</tool_call>'
    assert parse_call(text, SPECS, forced=True, syntax=syntax)["args"] == {"a": 2, "b": 40}
    # Text that could still become the opening tag is not decided yet; other text is text.
    assert [syntax.starts(t) for t in ("<tool", "<b>", "Hi", "  ")] == [None, False, False, None]


def test_llguidance_compiles_a_call_grammar_without_llama_cpp(monkeypatch):
    # The in-process runtimes (llama.cpp, torch, OpenVINO) constrain calls with
    # llguidance alone: the call's rules never come from llama-cpp-python's converter.
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp fails
    monkeypatch.setitem(sys.modules, "llama_cpp.llama_grammar", None)
    for syntax in (PLAIN, HERMES):
        forced = guide(call_grammar(SPECS[1:], forced=True, syntax=syntax))
        call = '{"name": "add", "arguments": {"a": 2, "b": 40}}'
        if syntax is HERMES:
            call = f"<tool_call>\n{call}\n</tool_call>"
        assert accepts(forced, call)
        assert not accepts(forced, call.replace("40", '"40"'))  # b is an integer
        assert not accepts(forced, call.replace("add", "get_weather"))  # not bound
    either = guide(call_grammar(SPECS, forced=False))
    assert accepts(either, "Sunny, I think.")
    assert accepts(either, '{"name": "get_weather", "arguments": {"location": "Rome"}}')
    assert not accepts(either, '{"name": "get_weather", "arguments": {}}')  # location
    with pytest.raises(ImportError, match=r"llama-cpp-python.*\[llamacpp\]"):
        call_grammar(SPECS, forced=True).gbnf  # noqa: B018  (GBNF for a server)


def test_bounded_arguments_are_enforced_in_calls():
    # A tool argument with ge/le: llama-cpp-python's converter ignored the bounds.
    spec = ToolSpec("rate", "", {"type": "object", "properties": {"stars": {
        "type": "integer", "minimum": 1, "maximum": 5}}, "required": ["stars"]})  # fmt: skip
    forced = guide(call_grammar([spec], forced=True))
    assert accepts(forced, '{"name": "rate", "arguments": {"stars": 5}}')
    assert not accepts(forced, '{"name": "rate", "arguments": {"stars": 0}}')
    assert not accepts(forced, '{"name": "rate", "arguments": {"stars": 6}}')
    with pytest.raises(ToolCallError, match="stars"):
        parse_call('{"name": "rate", "arguments": {"stars": 9}}', [spec], forced=True)


def test_specs_keep_the_schema_a_template_and_a_grammar_need():
    spec = ToolSpec.of(get_weather)
    assert spec.openai()["function"]["name"] == "get_weather"
    assert spec.parameters["required"] == ["location"]
    schema = spec.call_schema()
    assert schema["properties"]["name"] == {"const": "get_weather"}
    json.dumps(schema)  # plain JSON
