"""Structured output on real runtimes and Gemma-3-270M: schemas users write.

The schemas that crashed the interpreter through llama-cpp-python's converter run in a
child process, so a crash fails the test instead of ending the run. Each runtime that
constrains decoding gets a pydantic model with ``ge`` / ``le`` bounds (ignored by that
converter) and a schema without a title; what a runtime cannot enforce is refused when
bound.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pydantic
import pytest
from pydantic import Field

import modelkit
from langchain_localllms import ChatHuggingFace, ChatLlamaCpp, ChatLlamafile
from langchain_localllms.errors import SchemaNotSupported
from tests.integration_tests.servers import llama_server
from tests.integration_tests.test_chat_huggingface import gemma_llm

MONGO_ID = {
    "title": "Answer",
    "type": "object",
    "properties": {"id": {"type": "string", "pattern": "^[A-Fa-f\\d]{24}$"}},
    "required": ["id"],
    "additionalProperties": False,
}
#: A Snowplow-style event: ~20 bounded strings (llama.cpp refused its converted GBNF).
EVENT = {
    "type": "object",
    "properties": {f"field_{i}": {"type": "string", "maxLength": 100} for i in range(20)},
    "required": ["field_0", "field_1"],
    "additionalProperties": False,
}


class Review(pydantic.BaseModel):
    """A film review."""

    rating: int = Field(ge=1, le=5)
    title: str = Field(max_length=40)


def test_schemas_that_crashed_the_interpreter_answer_or_refuse_in_process():
    code = textwrap.dedent(
        f"""
        import json, modelkit
        from langchain_localllms import ChatLlamaCpp, LlamaCpp
        from langchain_localllms.errors import GrammarSyntaxError
        path = str(modelkit.path("gemma-gguf"))
        chat = ChatLlamaCpp(model_path=path, temperature=0, max_tokens=48)
        print(json.dumps(chat.with_structured_output({MONGO_ID!r}).invoke("Give an id.")))
        event = chat.with_structured_output({EVENT!r}, include_raw=True).invoke("An event:")
        print(json.dumps({{"parsed": event["parsed"], "error": repr(event["parsing_error"])}}))
        llm = LlamaCpp(model_path=path, temperature=0, max_tokens=8)
        try:
            llm.invoke("x", grammar="root ::= " + " ".join(['("a"{{0,100}}){{0,100}}'] * 30))
        except GrammarSyntaxError as e:
            print(json.dumps({{"refused": str(e)}}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    answer, event, refused = lines
    assert len(answer["id"]) == 24
    assert all(c in "0123456789abcdefABCDEF" for c in answer["id"])
    # Either a whole event (validated), or the typed error of an answer cut at max_tokens.
    if event["parsed"] is None:
        assert "not complete JSON" in event["error"]
    else:
        assert set(event["parsed"]) <= set(EVENT["properties"])
    assert "llama.cpp cannot parse this grammar" in refused["refused"]


@pytest.fixture(scope="module")
def llamacpp_chat():
    chat = ChatLlamaCpp(model_path=str(modelkit.path("gemma-gguf")), temperature=0, max_tokens=48)
    yield chat
    chat.close()


@pytest.fixture(scope="module")
def chats(llamacpp_chat):
    return {
        "llamacpp": llamacpp_chat,
        "huggingface": ChatHuggingFace(llm=gemma_llm(), max_tokens=48),
        "llamafile": ChatLlamafile(base_url=llama_server().url, temperature=0, max_tokens=48),
    }


@pytest.mark.parametrize("runtime", ["llamacpp", "huggingface", "llamafile"])
@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_bounded_fields_validate(chats, runtime, method):
    # pydantic's ge/le: Gemma wrote "rating": 0 through llama-cpp-python's converter.
    review = (
        chats[runtime]
        .with_structured_output(Review, method=method)
        .invoke("Review the film Alien in JSON.")
    )
    assert isinstance(review, Review)
    assert 1 <= review.rating <= 5


@pytest.mark.parametrize("runtime", ["llamacpp", "huggingface", "llamafile"])
def test_untitled_and_non_object_schemas_are_taken(chats, runtime):
    chat = chats[runtime]
    colour = {"enum": ["red", "green", "blue"]}
    assert chat.with_structured_output(colour).invoke("The colour of grass:") in colour["enum"]
    numbers = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
               "minItems": 2, "maxItems": 3}  # fmt: skip
    got = chat.with_structured_output(numbers).invoke("Three small numbers:")
    assert 2 <= len(got) <= 3
    assert all(0 <= n <= 9 for n in got)


def test_a_bounded_tool_in_auto_mode_on_llamafile_is_refused_when_bound(chats):
    # With tool_choice="auto" the answer is text or a call: a GBNF grammar made on
    # the client by llama-cpp-python's converter, which enforces no numeric bounds.
    # (A forced call goes to the server as a JSON schema, bounds included.)
    with pytest.raises(SchemaNotSupported, match=r"minimum|maximum"):
        chats["llamafile"].bind_tools([Review])
    assert chats["llamafile"].bind_tools([Review], tool_choice="any") is not None


@pytest.mark.parametrize(
    ("runtime", "schema", "keyword"),
    [
        ("llamacpp", {"type": "array", "uniqueItems": True}, "uniqueItems"),
        ("huggingface", {"type": "object", "not": {"required": ["a"]}}, "not"),
        ("llamafile", {"type": "number", "maximum": 2.5}, "maximum"),
    ],
)
def test_what_a_runtime_cannot_enforce_is_refused_when_bound(chats, runtime, schema, keyword):
    with pytest.raises(SchemaNotSupported) as e:
        chats[runtime].with_structured_output(schema)
    assert e.value.keyword == keyword
