"""GPT4All on a real GGUF file: the contract on the tiny Llama model, and honest errors."""

from __future__ import annotations

import pytest

import langchain_localllms.core.requests as requests
from langchain_localllms import GPT4All, LlamaCpp
from tests.integration_tests.contract import LLMContract, Recorder

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
    assert tiny.invoke("The first man on the moon was", max_tokens=6) == ref.invoke(
        "The first man on the moon was"
    )


def test_gemma3_is_refused_with_the_reason(model_path):
    path = str(model_path("gemma-gguf"))
    with pytest.raises(ValueError, match="Unsupported model architecture: gemma3") as e:
        GPT4All(model=path)
    assert path in str(e.value)
    assert "LlamaCpp" in str(e.value)


def test_missing_file_and_community_parameters(tmp_path, model_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"missing\.gguf"):
        GPT4All(model=str(tmp_path / "missing.gguf"))
    path = str(model_path("tiny-gguf"))
    monkeypatch.setattr(requests, "_WARNED", set())
    # langchain_community took these and gpt4all ignores them: taken, with a warning.
    for name, value in (("f16_kv", True), ("seed", 3), ("use_mlock", True), ("n_parts", 2)):
        with pytest.warns(UserWarning, match=f"GPT4All ignores {name}={value}"):
            GPT4All(model=path, **{name: value})
    # ... and these would change what it does: refused.
    for name in ("vocab_only", "embedding"):
        with pytest.raises(ValueError, match=f"does not take {name}=True"):
            GPT4All(model=path, **{name: True})
    with pytest.raises(ValueError, match="allow_download"):
        GPT4All(model=str(model_path("tiny-gguf")), allow_download=True)


def test_n_predict_is_max_tokens(model_path):
    llm = GPT4All(model=str(model_path("tiny-gguf")), n_predict=3, temp=0, n_ctx=1024)
    assert llm.max_tokens == 3
    assert (
        llm.generate(["The first man on the moon was"])
        .generations[0][0]
        .generation_info["completion_tokens"]
        == 3
    )


@pytest.fixture
def decoded(tiny, monkeypatch):
    """The bytes of every token the engine decodes (each passes gpt4all's byte decoder)."""
    engine_type = type(tiny.client.model)
    decoder = engine_type._callback_decoder
    seen: list[bytes] = []

    def counting(engine, callback):
        inner = decoder(engine, callback)

        def step(token_id, response):
            seen.append(response)
            return inner(token_id, response)

        return step

    monkeypatch.setattr(engine_type, "_callback_decoder", counting)
    return seen


def test_every_token_is_counted_also_one_without_text_of_its_own(tiny, decoded):
    # The random tiny model writes lone UTF-8 bytes: gpt4all holds them back until a
    # character is whole, so some tokens stream no text. Usage counts them all.
    prompt = "The first man on the moon was"
    pieces = [p for p in tiny.stream(prompt, max_tokens=60) if p]
    assert len(pieces) < len(decoded) == 60  # some tokens had no text of their own
    decoded.clear()
    info = tiny.generate([prompt], max_tokens=60).generations[0][0].generation_info
    assert info["completion_tokens"] == len(decoded) == 60
    assert info["finish_reason"] == "length"


def test_early_stop_ends_generation(tiny, decoded):
    stream = tiny.stream("The first man on the moon was", max_tokens=200)
    next(stream)
    stream.close()  # the engine thread is told to stop and joined
    after_close = len(decoded)
    assert after_close < 10, f"the engine decoded {after_close} tokens for one piece"
    # the instance is free again at once, and the abandoned answer decodes no more
    assert tiny.invoke("Red cat and blue dog", max_tokens=2) is not None
    assert after_close < len(decoded) <= after_close + 2


def test_tokens_are_counted_offline_with_the_models_own_vocabulary(model_path):
    path = str(model_path("tiny-gguf"))
    llm = GPT4All(model=path, n_ctx=256)
    text = "The first man on the moon was"
    assert llm.get_num_tokens(text) == LlamaCpp(model_path=path, n_ctx=64).get_num_tokens(text) > 3


def test_echo_and_streaming_false_work(model_path):
    path = str(model_path("tiny-gguf"))
    llm = GPT4All(model=path, temp=0, max_tokens=6, n_ctx=256)
    p = "The first man on the moon was"
    answer = llm.invoke(p)
    assert GPT4All(model=path, temp=0, max_tokens=6, n_ctx=256, echo=True).invoke(p) == p + answer
    quiet = GPT4All(model=path, temp=0, max_tokens=6, n_ctx=256, streaming=False)
    rec = Recorder()
    assert quiet.invoke(p, config={"callbacks": [rec]}) == answer
    assert rec.tokens == []
    assert len(rec.ends) == 1  # the answer arrives at its end only
    assert "".join(quiet.stream(p)) == answer  # stream() always streams
