"""Our own logic of the chat base class over a scripted runtime (no model, no network).

Reasoning kept out of the answer, answers started for runtimes without grammars,
batches that reach the runtime as one, the template read once.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import pytest
from langchain_core.caches import InMemoryCache
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import HumanMessage
from langchain_core.tools import tool
from pydantic import BaseModel

from langchain_localllms.chat_models._base import LocalChatModel
from langchain_localllms.llms._base import LocalLLM
from langchain_localllms.prompts import ModelInfo
from tests.unit_tests.fake import BatchingLLM, ScriptedLLM

PLAIN = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant] "
SWITCH = (
    PLAIN + "{% if enable_thinking is defined and not enable_thinking %}(no thinking){% endif %}"
)
ALWAYS = PLAIN + "<think>\n"


class Scripted(ScriptedLLM):
    infos: ClassVar[list[int]] = []

    def model_info(self) -> ModelInfo:
        self.infos.append(1)
        return ModelInfo(runtime="scripted", model="scripted")


class Grammarless(Scripted):
    call_only: ClassVar[tuple[str, ...]] = ()


class Batching(BatchingLLM):
    def model_info(self) -> ModelInfo:
        return ModelInfo(runtime="scripted", model="scripted")


class Chat(LocalChatModel):
    _llm_class: ClassVar[type[LocalLLM]] = Scripted


class GrammarlessChat(LocalChatModel):
    _llm_class: ClassVar[type[LocalLLM]] = Grammarless


class BatchingChat(LocalChatModel):
    _llm_class: ClassVar[type[LocalLLM]] = Batching


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


class Person(BaseModel):
    name: str
    age: int


# ------------------------------------------------------------------ reasoning
@pytest.mark.parametrize(
    "pieces",
    [
        ["<think>", "let me", " think", "</think>", "\n\n", "Paris."],
        ["<th", "ink>let me think</", "thi", "nk>\n", "\nParis", "."],  # tags split
        ["  <think>let me think</think>Paris."],
    ],
)
def test_reasoning_never_lands_in_the_answer(pieces):
    chat = Chat(pieces=pieces, chat_template=PLAIN)
    chunks = list(chat.stream("Capital of France?"))
    assert all("<" not in c.content and "think>" not in c.content for c in chunks)
    message = chat.invoke("Capital of France?")
    assert message.content == "Paris."
    assert message.additional_kwargs["reasoning_content"] == "let me think"
    assert [b["type"] for b in message.content_blocks] == ["reasoning", "text"]


def test_a_thought_the_template_opened_is_reasoning_too():
    chat = Chat(pieces=["weighing", " it", "</think>", "Yes"], chat_template=ALWAYS)
    message = chat.invoke("Ok?")
    assert (message.content, message.additional_kwargs["reasoning_content"]) == (
        "Yes",
        "weighing it",
    )


@pytest.mark.parametrize("pieces", [["<th", "at is all"], ["<", "b>bold</b>"], ["<thin"]])
def test_text_that_only_looks_like_a_tag_stays_the_answer(pieces):
    message = Chat(pieces=pieces, chat_template=PLAIN).invoke("Hi")
    assert message.content == "".join(pieces)
    assert "reasoning_content" not in message.additional_kwargs


def test_reasoning_false_turns_thinking_off_in_the_prompt():
    on = Chat(chat_template=SWITCH, reasoning=True).prepare([HumanMessage("Hi")]).prompt
    off = Chat(chat_template=SWITCH, reasoning=False).prepare([HumanMessage("Hi")]).prompt
    assert off == on + "(no thinking)"
    # A template that always thinks: the thought is closed before it starts.
    closed = Chat(chat_template=ALWAYS, reasoning=False).prepare([HumanMessage("Hi")])
    assert closed.prompt.endswith("[assistant] <think>\n\n</think>\n\n")
    assert not closed.thinking
    tagless = Chat(chat_template=PLAIN + "{# <think> #}", reasoning=False).prepare(
        [HumanMessage("Hi")]
    )
    assert tagless.prompt.endswith("[assistant] <think>\n\n</think>\n\n")
    with pytest.raises(ValueError, match="no thinking switch"):
        Chat(chat_template=PLAIN, reasoning=True).invoke("Hi")


# ------------------------------------------------------ runtimes without grammars
def test_a_forced_call_is_started_in_the_prompt_and_ends_with_its_json():
    Scripted.streams_closed.clear()
    Scripted.produced.clear()
    chat = GrammarlessChat(pieces=["2", ', "b": 40', "}}", "\nThat is all.", " More."])
    chat = chat.model_copy(update={"chat_template": PLAIN})
    turn = chat.prepare([HumanMessage("2+40?")], tools=[add], tool_choice="any")
    assert turn.prompt.endswith('[assistant] {"name": "add", "arguments": {"a": ')
    assert "grammar" not in turn.options
    message = chat.bind_tools([add], tool_choice="any").invoke("2+40?")
    assert message.tool_calls[0]["args"] == {"a": 2, "b": 40}
    assert message.usage_metadata["output_tokens"] == 3  # decoding stopped at the end of the call
    assert Scripted.produced[-1] == "}}"
    assert Scripted.streams_closed


def test_structured_output_without_a_grammar_asks_and_parses():
    chat = GrammarlessChat(pieces=['Anna", "age": 31}', " and more"], chat_template=PLAIN)
    person = chat.with_structured_output(Person).invoke("Anna is 31.")
    assert person == Person(name="Anna", age=31)
    prompt = chat.prepare(
        [HumanMessage("x")], response_format={"schema": Person.model_json_schema()}
    ).prompt
    assert "- name (string)\n- age (integer)" in prompt
    assert prompt.endswith('{"name": "')


def test_once_every_field_is_written_the_answer_ends_before_a_field_of_its_own():
    # A small model goes on past the schema ({"name": ..., "age": 31, "city": ...}):
    # the comma after the last field ends the answer, and the object is closed there.
    Scripted.produced.clear()
    chat = GrammarlessChat(
        pieces=['Anna", "age": 31', ', "city": "Rome"', "}"], chat_template=PLAIN
    )
    raw = chat.with_structured_output(Person, include_raw=True).invoke("Anna is 31.")
    assert raw["parsed"] == Person(name="Anna", age=31)
    assert raw["parsing_error"] is None
    assert raw["raw"].content == '{"name": "Anna", "age": 31}'
    assert Scripted.produced[-1] == ', "city": "Rome"'  # decoding stopped there


def test_a_call_ends_once_every_argument_is_written():
    chat = GrammarlessChat(pieces=["2", ', "b": 40, "c"', ": 1}}"], chat_template=PLAIN)
    message = chat.bind_tools([add], tool_choice="any").invoke("2+40?")
    assert message.tool_calls[0]["args"] == {"a": 2, "b": 40}


def test_a_comma_inside_a_string_or_a_nested_value_does_not_end_the_answer():
    class Note(BaseModel):
        text: str
        tags: list[str]

    chat = GrammarlessChat(
        pieces=['a, b", "tags": ["x", ', '"y"]', ', "more": 1}'], chat_template=PLAIN
    )
    assert chat.with_structured_output(Note).invoke("x") == Note(text="a, b", tags=["x", "y"])


def test_with_a_grammar_the_schema_constrains_decoding():
    chat = Chat(chat_template=PLAIN)
    turn = chat.prepare([HumanMessage("x")], response_format={"schema": Person.model_json_schema()})
    assert turn.options["grammar"].gbnf
    assert turn.prefix == ""


# -------------------------------------------------------------------- batches
class Runs(BaseCallbackHandler):
    def __init__(self) -> None:
        self.started = 0
        self.ended = 0

    def on_chat_model_start(self, *args: Any, **kwargs: Any) -> None:
        self.started += 1

    def on_llm_end(self, *args: Any, **kwargs: Any) -> None:
        self.ended += 1


QUESTIONS = ["one", "two", "three"]
ANSWERS = {f"[user] {q}\n[assistant] ": [q.upper(), "!"] for q in QUESTIONS}


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_batch_reaches_the_runtime_as_one_batch(asynchronous):
    Batching.batches.clear()
    chat = BatchingChat(answers=ANSWERS, chat_template=PLAIN)
    runs = Runs()
    config = {"callbacks": [runs]}
    if asynchronous:
        messages = asyncio.run(chat.abatch(QUESTIONS, config))
    else:
        messages = chat.batch(QUESTIONS, config)
    assert Batching.batches == [3]
    assert [m.content for m in messages] == ["ONE!", "TWO!", "THREE!"]
    assert [m.usage_metadata["output_tokens"] for m in messages] == [2, 2, 2]
    assert (runs.started, runs.ended) == (3, 3)  # one run per conversation


def test_a_batch_with_a_cache_goes_conversation_by_conversation():
    Batching.batches.clear()
    chat = BatchingChat(answers=ANSWERS, chat_template=PLAIN, cache=InMemoryCache())
    assert [m.content for m in chat.batch(QUESTIONS)] == ["ONE!", "TWO!", "THREE!"]
    assert Batching.batches == []  # each asked the cache first
    assert [m.content for m in chat.batch(QUESTIONS)] == ["ONE!", "TWO!", "THREE!"]


def test_the_template_is_read_once_per_instance():
    Scripted.infos.clear()
    chat = Chat()
    with pytest.raises(ValueError, match="no chat template"):
        chat.invoke("Hi")
    chat = Chat(chat_template=PLAIN)
    for _ in range(3):
        chat.invoke("Hi")
    assert len(Scripted.infos) == 2  # the failed instance's and this one's
