"""ChatLlamafile judged by LangChain's standard chat-model tests, against a real server.

llama.cpp's own server (``llama-server``: what a llamafile embeds, 4 slots) serves
Gemma-3-270M (base, Q4_K_M GGUF). What the grammars guarantee (tool calls and
structured output that validate) passes on it; tests that need judgement a 270M base
model lacks are marked xfail beside their measured reason. The unit suite
(construction, binding) needs no server: nothing listens at its base_url.
"""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests
from pydantic import BaseModel

from langchain_localllms import ChatLlamafile, Llamafile
from langchain_localllms.chat_models.llamafile import (
    LLAMA_CPP_FALLBACK,
    served_template,
    squeezed,
)
from langchain_localllms.prompts import FORMATS, ModelInfo
from tests.integration_tests.chat_suite import CUT_JSON, JUDGEMENT, Expected
from tests.integration_tests.servers import llama_server

#: LangChain's standard parameters; a server has a request timeout (``timeout``, an
#: alias of ``request_timeout``) but nothing here retries (no ``max_retries``).
SERVED = {"temperature": 0, "max_tokens": 100, "stop": [], "timeout": 60}
#: Nothing listens here: building a chat model never contacts its server.
NO_SERVER = "http://127.0.0.1:9"


class _ChatLlamafile:
    @property
    def chat_model_class(self) -> type[ChatLlamafile]:
        return ChatLlamafile

    @property
    def standard_chat_model_params(self) -> dict[str, Any]:
        return dict(SERVED)


class TestChatLlamafileStandard(_ChatLlamafile, Expected, ChatModelIntegrationTests):
    # The grammar forces calls that validate; which values, and whether to call at
    # all with tool_choice="auto", is the model's judgement (chat_suite.JUDGEMENT):
    # greedy Gemma-3-270M (base) writes the question's 3 as 3000000000000000 and
    # answers the weather question in text (measured).
    XFAIL = {**JUDGEMENT, "test_json_mode": CUT_JSON}

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"base_url": llama_server().url}

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True


class TestChatLlamafileUnit(_ChatLlamafile, ChatModelUnitTests):
    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"base_url": NO_SERVER}


# --------------------------------------------------------------- beyond the standard suite
@pytest.fixture(scope="module")
def gemma_chat():
    return ChatLlamafile(base_url=llama_server().url, temperature=0, max_tokens=64)


@tool
def get_weather(city: str, days: int = 1) -> str:
    """The weather forecast for a city."""
    return f"sunny in {city}"


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@pytest.mark.parametrize(
    "question", ["What is 2 plus 40?", "Weather in Rome for 3 days?", "Tell me a joke."]
)
def test_a_forced_call_always_validates_against_its_tool(gemma_chat, question):
    # What the server's grammar guarantees, whatever the question: one call of a bound
    # tool whose arguments have the schema's names and types.
    message = gemma_chat.bind_tools([get_weather, add], tool_choice="any").invoke(question)
    (call,) = message.tool_calls
    schema = {"get_weather": get_weather, "add": add}[call["name"]].args
    assert set(call["args"]) <= set(schema)
    assert all(k in call["args"] for k, v in schema.items() if "default" not in v)
    for name, value in call["args"].items():
        assert isinstance(value, {"string": str, "integer": int}[schema[name]["type"]])
    assert message.response_metadata["finish_reason"] == "tool_calls"


def test_structured_output_always_validates(gemma_chat):
    class Person(BaseModel):
        name: str
        age: int

    person = gemma_chat.with_structured_output(Person).invoke("Anna is 31 years old.")
    assert isinstance(person, Person)


def test_a_gguf_without_template_gets_its_familys_format_not_the_servers_chatml(gemma_chat):
    # The Gemma GGUF carries no template: the server reports (and would chat with)
    # llama.cpp's ChatML fallback; the chat model reads the architecture from the GGUF
    # header and uses Gemma's turn format, as ChatLlamaCpp does on the same file.
    info = gemma_chat.model_info()
    assert squeezed(info.chat_template) == squeezed(LLAMA_CPP_FALLBACK)
    assert info.architecture == "gemma3"
    call = {"name": "get_weather", "args": {"city": "Rome"}, "id": "call_1", "type": "tool_call"}
    turns = [
        SystemMessage("Be brief."),
        HumanMessage("Weather in Rome?"),
        AIMessage("", tool_calls=[call]),
        ToolMessage("sunny", tool_call_id="call_1", name="get_weather"),
    ]
    prompt = gemma_chat.prepare(turns).prompt
    assert prompt.startswith("<start_of_turn>user\nBe brief.\n\nWeather in Rome?<end_of_turn>\n")
    assert '<start_of_turn>model\n{"name": "get_weather", "arguments": {"city": "Rome"}}' in prompt
    assert "<start_of_turn>user\nResult of get_weather: sunny<end_of_turn>" in prompt
    assert prompt.endswith("<start_of_turn>model\n")
    assert "<|im_start|>" not in prompt
    reply = gemma_chat.invoke(turns, n_predict=4)
    # The server adds <bos> itself: the prompt's tokens and that one.
    assert reply.usage_metadata["input_tokens"] == len(gemma_chat.get_token_ids(prompt)) + 1


def test_the_servers_template_is_asked_once_per_instance():
    paths: list[str] = []
    hooks = {"request": [lambda request: paths.append(request.url.path)]}
    chat = ChatLlamafile(
        base_url=llama_server().url, max_tokens=2, client_kwargs={"event_hooks": hooks}
    )
    chat.invoke("Hi")
    chat.invoke([SystemMessage("S"), HumanMessage("Hi")])
    list(chat.stream("Hi"))
    assert paths.count("/props") == 1
    assert paths.count("/completion") == 3


def test_what_the_server_reports_picks_the_template():
    info = ModelInfo(runtime="llamafile", model="m.gguf", architecture="gemma3")
    own = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    # The file's own template is used as it is.
    assert served_template(ModelInfo(**{**vars(info), "chat_template": own})) is None
    # llama.cpp's fallback: the family's format where there is one, else the fallback.
    fallback = ModelInfo(**{**vars(info), "chat_template": LLAMA_CPP_FALLBACK})
    assert served_template(fallback) == FORMATS["gemma"]
    unknown = ModelInfo(**{**vars(fallback), "architecture": None})
    assert served_template(unknown) is None
    # `llama-server --chat-template gemma` reports the bare name.
    assert (
        served_template(ModelInfo(**{**vars(info), "chat_template": "gemma"})) == FORMATS["gemma"]
    )
    with pytest.raises(ValueError, match="--chat-template"):
        served_template(ModelInfo(**{**vars(info), "chat_template": "deepseek3"}))


def test_chat_template_replaces_the_servers():
    own = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "
    chat = ChatLlamafile(base_url=llama_server().url, chat_template=own, max_tokens=2)
    assert chat.prepare([HumanMessage("Hi")]).prompt == "[user] Hi\n[assistant] "
    assert chat.invoke("Hi").usage_metadata["output_tokens"] <= 2


def test_standard_names_are_llamafiles_settings():
    chat = ChatLlamafile(base_url=NO_SERVER, max_tokens=3, timeout=5)
    assert (chat.llm.n_predict, chat.llm.request_timeout) == (3, 5)
    assert chat._get_ls_params()["ls_max_tokens"] == 3
    with pytest.raises(ValueError, match="not both"):
        ChatLlamafile(base_url=NO_SERVER, max_tokens=3, n_predict=4)
    with pytest.raises(ValueError, match="give n_predict= to the Llamafile"):
        ChatLlamafile(llm=Llamafile(base_url=NO_SERVER), max_tokens=3)
    with pytest.raises(TypeError, match=r"must be a langchain_localllms\.Llamafile"):
        ChatLlamafile(llm=object())


def test_a_server_that_is_not_there_is_a_connection_error_naming_it():
    with pytest.raises(ConnectionError, match=r"127\.0\.0\.1:9") as caught:
        ChatLlamafile(base_url=NO_SERVER).invoke("Hi")
    assert caught.value.__cause__ is not None  # the transport's error is kept
