"""ChatCTranslate2 judged by LangChain's standard chat-model tests, on Gemma-3-270M.

CTranslate2 has no hook into decoding, so no grammar constrains tool calls or
structured output: the prompt ends with the answer's opening (a call up to its first
argument, or a JSON object up to its first value), decoding stops where the JSON
value ends, and the answer is parsed and validated. What that cannot guarantee on a
270M base model is marked xfail beside its measured reason.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_core.tools import tool
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests
from pydantic import BaseModel

import modelkit
from langchain_localllms import ChatCTranslate2
from langchain_localllms.chat_models._tools import ToolCallError
from tests.integration_tests.chat_suite import NO_CALL, Expected, OneLoad, in_process

pytest.importorskip("ctranslate2")

PARAMS = in_process("sampling_temperature", "max_length")


class _ChatCTranslate2:
    @property
    def chat_model_class(self) -> type[ChatCTranslate2]:
        return ChatCTranslate2

    @property
    def standard_chat_model_params(self) -> dict[str, Any]:
        return dict(PARAMS)


class TestChatCTranslate2Standard(_ChatCTranslate2, OneLoad, Expected, ChatModelIntegrationTests):
    # No grammar: the answer's opening is written into the prompt and decoding stops
    # where the JSON ends or every field has a value. Measured on greedy Gemma-3-270M
    # (base): the forced calls (3 written as 3), JSON mode and the unicode argument all
    # pass; with tool_choice="auto" it answers in text. Forced by tool_choice="any",
    # it writes magic_function's input as 1000, past the tool's lt=1000: the call is
    # validated and refused (no grammar could keep it in bounds).
    XFAIL = {
        "test_agent_loop": NO_CALL,
        "test_tool_choice": "270M base model, no grammar: input 1000 breaks lt=1000 (refused)",
    }

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model_path": str(modelkit.prepare("gemma-ct2"))}

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True


class TestChatCTranslate2Unit(_ChatCTranslate2, ChatModelUnitTests):
    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model_path": str(modelkit.prepare("tiny-ct2"))}


# --------------------------------------------------------------- beyond the standard suite
@pytest.fixture(scope="module")
def gemma_chat():
    chat = ChatCTranslate2(
        model_path=str(modelkit.prepare("gemma-ct2")), sampling_temperature=0, max_length=64
    )
    yield chat
    chat.close()


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def test_the_gemma_turn_format_is_used_for_a_model_converted_elsewhere(gemma_chat):
    # ct2-transformers-converter writes no model type; the tokenizer names the family.
    assert gemma_chat.model_info().architecture == "gemma"
    prompt = gemma_chat.prepare([SystemMessage("Be brief."), HumanMessage("Hi")]).prompt
    assert prompt == "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"


def test_a_forced_call_starts_written_and_is_validated(gemma_chat):
    turn = gemma_chat.prepare([HumanMessage("What is 2 plus 40?")], tools=[add], tool_choice="add")
    assert turn.prompt.endswith('<start_of_turn>model\n{"name": "add", "arguments": {"a": ')
    assert "grammar" not in turn.options  # nothing to constrain with
    message = gemma_chat.bind_tools([add], tool_choice="add").invoke("What is 2 plus 40?")
    (call,) = message.tool_calls
    assert call["name"] == "add"
    assert set(call["args"]) == {"a", "b"}
    assert all(isinstance(v, int) for v in call["args"].values())


def test_decoding_stops_where_the_json_ends(gemma_chat):
    class Age(BaseModel):
        age: int

    raw = gemma_chat.with_structured_output(Age, include_raw=True).invoke("Anna is 31.")
    text = raw["raw"].content
    assert raw["parsing_error"] is None
    json.loads(text)  # the whole answer is the one JSON value: nothing after it
    assert raw["raw"].usage_metadata["output_tokens"] < 64  # it stopped before the limit


def test_of_several_tools_the_model_scores_which_to_call(gemma_chat):
    @tool
    def get_weather(location: str) -> str:
        """Get the weather at a location."""
        return "sunny"

    # CTranslate2 scores each tool's name after the prompt (score_batch): the
    # choice is the model's, and always a bound tool.
    chat = gemma_chat.bind_tools([add, get_weather], tool_choice="any")
    names = {
        chat.invoke(q).tool_calls[0]["name"] for q in ("What is 2 plus 40?", "Weather in Paris?")
    }
    assert names <= {"add", "get_weather"}
    # The forced call's opening names the one tool the model scored likeliest.
    turn = gemma_chat.prepare(
        [HumanMessage("Weather in Paris?")], tools=[add, get_weather], tool_choice="any"
    )
    opened = [n for n in ("add", "get_weather") if f'"name": "{n}"' in turn.prefix]
    assert len(opened) == 1


def test_an_invalid_call_is_an_error_that_says_what_is_wrong(gemma_chat):
    # One token is not enough for a call: the answer cannot be valid, and says so.
    with pytest.raises(ToolCallError, match=r"raise max_tokens|not valid JSON"):
        gemma_chat.bind_tools([add], tool_choice="any").invoke("2 plus 40?", max_length=1)


def test_batch_is_one_native_batch_with_single_call_answers(gemma_chat, monkeypatch):
    sizes = []
    native = type(gemma_chat.llm)._generate_batch

    def counting(self, prompts, call):
        sizes.append(len(prompts))
        return native(self, prompts, call)

    monkeypatch.setattr(type(gemma_chat.llm), "_generate_batch", counting)
    questions = ["Name a colour.", "The capital of France is", "Count to three:"]
    batched = gemma_chat.batch(questions, max_length=12)
    assert sizes == [3]
    single = [gemma_chat.invoke(q, max_length=12) for q in questions]
    assert [m.content for m in batched] == [m.content for m in single]
    assert all(m.usage_metadata["output_tokens"] > 0 for m in batched)
