"""Prompts chosen for the loaded model, on real GGUF models, and the seed's selector flow."""

from __future__ import annotations

import pytest
from langchain_classic.chains import LLMChain
from langchain_classic.chains.prompt_selector import ConditionalPromptSelector
from langchain_core.prompts import PromptTemplate

from langchain_localllms import LlamaCpp
from langchain_localllms.prompts import (
    ModelPromptSelector,
    chat_prompt,
    has_chat_template,
    is_family,
)

DEFAULT = PromptTemplate.from_template("Question: {question}\nAnswer:")


@pytest.fixture(scope="module")
def gemma(model_path):
    return LlamaCpp(
        model_path=str(model_path("gemma-gguf")), temperature=0, repeat_penalty=1.0, max_tokens=12
    )


@pytest.fixture(scope="module")
def tiny_chat(model_path):
    return LlamaCpp(
        model_path=str(model_path("tiny-chat-gguf")), n_ctx=1024, temperature=0, max_tokens=8
    )


def test_template_from_the_model_file_is_used_with_one_bos(tiny_chat):
    assert has_chat_template(tiny_chat)
    prompt = chat_prompt(tiny_chat, "{question}", system="Be brief.")
    text = prompt.format(question="Hi")
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi")
    tokens = tiny_chat.client.tokenize(text.encode(), add_bos=True, special=True)
    bos = tiny_chat.client.token_bos()
    assert tokens[0] == bos
    assert bos not in tokens[1:]  # the template's {{ bos_token }} was not doubled
    assert isinstance((prompt | tiny_chat).invoke({"question": "Hi"}), str)


def test_model_without_template_gets_its_family_format(gemma):
    assert not has_chat_template(gemma)
    assert is_family("gemma")(gemma)
    prompt = ModelPromptSelector(DEFAULT).get_prompt(gemma)
    assert prompt.format(question="Why?").startswith("<start_of_turn>user\nQuestion: Why?")
    answer = (prompt | gemma.bind(stop=["<end_of_turn>"])).invoke(
        {"question": "What is the capital of France?"}
    )
    assert isinstance(answer, str)
    assert "<end_of_turn>" not in answer


def test_seed_flow_conditional_prompt_selector_and_llmchain(gemma):
    llama_prompt = PromptTemplate(
        input_variables=["question"],
        template="<<SYS>> \n You are an assistant. \n <</SYS>> \n\n [INST] {question} [/INST]",
    )
    selector = ConditionalPromptSelector(
        default_prompt=DEFAULT,
        conditionals=[(lambda llm: isinstance(llm, LlamaCpp), llama_prompt)],
    )
    prompt = selector.get_prompt(gemma)
    assert prompt is llama_prompt
    chain = LLMChain(prompt=prompt, llm=gemma)
    question = "What NFL team won the Super Bowl in the year that Justin Bieber was born?"
    ran = chain.run({"question": question})
    invoked = chain.invoke({"question": question})
    assert ran == invoked["text"] == (prompt | gemma).invoke({"question": question})
    # The model-aware predicate is the robust form of the same selection.
    by_model = ConditionalPromptSelector(
        default_prompt=DEFAULT, conditionals=[(is_family("gemma"), llama_prompt)]
    )
    assert by_model.get_prompt(gemma) is llama_prompt


def test_servers_report_their_models():
    from langchain_localllms import Llamafile, Ollama
    from tests.integration_tests.servers import llama_server, ollama_server

    served = Llamafile(base_url=llama_server().url, temperature=0, n_predict=8)
    info = served.model_info()
    assert info.model.endswith(".gguf")
    assert info.chat_template
    assert info.bos_token == "<bos>"
    prompt = chat_prompt(served, "{question}")
    assert "{question}" in prompt.template
    assert "<bos>" not in prompt.template
    assert isinstance((prompt | served).invoke({"question": "Hi"}), str)
    ollama = Ollama(model="gemma3:270m", base_url=ollama_server().url)
    assert is_family("gemma")(ollama)
    assert not has_chat_template(ollama)
