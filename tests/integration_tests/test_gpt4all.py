"""GPT4All on a real GGUF file: the contract on the tiny Llama model, and honest errors."""

from __future__ import annotations

import pytest

from langchain_localllms import GPT4All
from tests.integration_tests.contract import LLMContract

pytest.importorskip("gpt4all")

GREEDY = {"temp": 0.0, "repeat_penalty": 1.0, "max_tokens": 16, "n_ctx": 1024}


@pytest.fixture(scope="module")
def tiny(model_path):
    return GPT4All(model=str(model_path("tiny-gguf")), **GREEDY)


class TestTinyContract(LLMContract):
    prompts = ["The first man on the moon was", "My favourite colour is", "Red cat and blue dog"]

    @pytest.fixture
    def llm(self, tiny):
        return tiny

    @pytest.fixture
    def other_llm(self, tiny):
        return tiny.model_copy(update={"temp": 0.7})


def test_same_greedy_tokens_as_llama_cpp(tiny, model_path):
    # Both engines are llama.cpp: greedy text on the same f32 model must agree.
    from langchain_localllms import LlamaCpp

    ref = LlamaCpp(model_path=str(model_path("tiny-gguf")), n_ctx=1024, f16_kv=False,
                   temperature=0, repeat_penalty=1.0, max_tokens=6)  # fmt: skip
    assert tiny.invoke("The first man on the moon was", max_tokens=6) == ref.invoke("The first man on the moon was")


def test_gemma3_is_refused_with_the_reason(model_path):
    path = str(model_path("gemma-gguf"))
    with pytest.raises(ValueError, match="Unsupported model architecture: gemma3") as e:
        GPT4All(model=path)
    assert path in str(e.value) and "LlamaCpp" in str(e.value)


def test_missing_file_and_dead_parameters(tmp_path, model_path):
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        GPT4All(model=str(tmp_path / "missing.gguf"))
    for name, value in (("f16_kv", True), ("seed", 0), ("use_mlock", True), ("echo", True)):
        with pytest.raises(TypeError, match=f"does not take {name}="):
            GPT4All(model=str(model_path("tiny-gguf")), **{name: value})
    with pytest.raises(ValueError):
        GPT4All(model=str(model_path("tiny-gguf")), allow_download=True)


def test_n_predict_is_max_tokens(model_path):
    llm = GPT4All(model=str(model_path("tiny-gguf")), n_predict=3, temp=0, n_ctx=1024)
    assert llm.max_tokens == 3
    assert llm.generate(["The first man on the moon was"]).generations[0][0].generation_info["completion_tokens"] == 3


def test_early_stop_ends_generation(tiny, monkeypatch):
    # Count every token the engine decodes (each passes gpt4all's byte decoder).
    engine_type = type(tiny.client.model)
    decoder = engine_type._callback_decoder
    decoded = []

    def counting(engine, callback):
        inner = decoder(engine, callback)

        def step(token_id, response):
            decoded.append(token_id)
            return inner(token_id, response)

        return step

    monkeypatch.setattr(engine_type, "_callback_decoder", counting)
    stream = tiny.stream("The first man on the moon was", max_tokens=200)
    next(stream)
    stream.close()  # the engine thread is told to stop and joined
    after_close = len(decoded)
    assert after_close < 10, f"the engine decoded {after_close} tokens for one piece"
    # the instance is free again at once, and the abandoned answer decodes no more
    assert tiny.invoke("Red cat and blue dog", max_tokens=2) is not None
    assert after_close < len(decoded) <= after_close + 2
