"""ChatHuggingFace on the OpenVINO backend, judged by LangChain's standard chat-model tests.

Runs in .venv-openvino (optimum-intel, transformers 5.0.0; see the Makefile). The suite
and its measured xfails are test_chat_huggingface.py's (OpenVINO float32 decodes the
same greedy tokens as torch float32 here): the integration suite on Gemma-3-270M
exported to OpenVINO (float32), the unit suite on the tiny chat model exported on load.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_core.tools import tool
from langchain_tests.unit_tests import ChatModelUnitTests
from pydantic import BaseModel, Field

pytest.importorskip("optimum.intel")
pytest.importorskip("llguidance")

import modelkit
from langchain_localllms import ChatHuggingFace, HuggingFacePipeline
from tests.integration_tests.test_chat_huggingface import (
    GemmaChatSuite,
    _ChatHuggingFace,
)

OV_CONFIG = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "CACHE_DIR": ""}


@functools.cache
def gemma_ov() -> HuggingFacePipeline:
    """Gemma-3-270M in OpenVINO (float32), loaded once; sampling as in the torch suite."""
    return HuggingFacePipeline.from_model_id(
        model_id=str(modelkit.prepare("gemma-ov")),
        task="text-generation",
        backend="openvino",
        model_kwargs={"device": "CPU", "ov_config": OV_CONFIG},
        pipeline_kwargs={"max_new_tokens": 16, "temperature": 0, "repetition_penalty": 1.1},
    )


@functools.cache
def tiny_chat_ov() -> HuggingFacePipeline:
    """The tiny model with a ChatML template, exported to OpenVINO on load (cached)."""
    return HuggingFacePipeline.from_model_id(
        model_id=str(modelkit.prepare("tiny-chat-hf")),
        task="text-generation",
        backend="openvino",
        model_kwargs={"device": "CPU", "ov_config": OV_CONFIG},
        pipeline_kwargs={"max_new_tokens": 4, "temperature": 0},
    )


class TestChatOpenVINOStandard(GemmaChatSuite):
    def gemma(self) -> HuggingFacePipeline:
        return gemma_ov()


class TestChatOpenVINOUnit(_ChatHuggingFace, ChatModelUnitTests):
    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"llm": tiny_chat_ov()}


# --------------------------------------------------------------- beyond the standard suite
@tool
def get_weather(city: str, days: int = 1) -> str:
    """The weather forecast for a city."""
    return f"sunny in {city}"


def test_openvino_gemma_chats_in_gemmas_format():
    chat = ChatHuggingFace(llm=gemma_ov(), max_tokens=4)
    assert chat.llm.backend == "openvino"
    assert chat.model_info().architecture == "gemma3_text"
    prompt = chat.prepare([SystemMessage("Be brief."), HumanMessage("Hi")]).prompt
    assert prompt == "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    reply = chat.invoke([SystemMessage("Be brief."), HumanMessage("Hi")])
    assert reply.usage_metadata["input_tokens"] == len(chat.get_token_ids(prompt)) + 1


def test_a_forced_call_and_structured_output_always_validate():
    class Person(BaseModel):
        name: str
        age: int

    chat = ChatHuggingFace(llm=gemma_ov(), max_tokens=64)
    (call,) = chat.bind_tools([get_weather], tool_choice="any").invoke("Tell me a joke.").tool_calls
    assert call["name"] == "get_weather"
    assert isinstance(call["args"]["city"], str)
    assert isinstance(chat.with_structured_output(Person).invoke("Anna is 31."), Person)


def test_bounded_fields_validate_on_openvino():
    # pydantic's ge/le, enforced by the llguidance mask (the torch backend's test is in
    # test_structured_output.py).
    class Review(BaseModel):
        rating: int = Field(ge=1, le=5)
        title: str = Field(max_length=40)

    chat = ChatHuggingFace(llm=gemma_ov(), max_tokens=48)
    review = chat.with_structured_output(Review).invoke("Review the film Alien in JSON.")
    assert 1 <= review.rating <= 5


def test_the_tiny_models_template_comes_from_its_tokenizer():
    chat = ChatHuggingFace(llm=tiny_chat_ov())
    prompt = chat.prepare([HumanMessage("Hi")]).prompt
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert chat.invoke("Hi").usage_metadata["output_tokens"] <= 4
