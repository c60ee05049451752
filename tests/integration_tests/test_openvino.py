"""HuggingFacePipeline(backend="openvino") on real exported models.

Runs in the OpenVINO environment (.venv-openvino: optimum-intel needs its own
transformers); `make test` runs this module there.
"""

from __future__ import annotations

import json
import os

import pydantic
import pytest
from langchain_core.prompts import PromptTemplate

from langchain_localllms import Grammar, HuggingFacePipeline
from langchain_localllms.errors import ClosedError
from tests.integration_tests.contract import LLMContract, rss_mb

pytest.importorskip("optimum.intel", reason="run in .venv-openvino (make test does)")

GREEDY = {"temperature": 0, "max_new_tokens": 16}
OV_CONFIG = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "CACHE_DIR": ""}
TINY_PROMPTS = ["The big tree gives", "The cat sees a dog and", "Two old dogs run to the house"]


def ov(path, **kw):
    return HuggingFacePipeline.from_model_id(
        model_id=str(path), task="text-generation", backend="openvino",
        model_kwargs={"device": "CPU", "ov_config": OV_CONFIG, **kw.pop("model_kwargs", {})},
        pipeline_kwargs={**GREEDY, **kw.pop("pipeline_kwargs", {})}, **kw,
    )  # fmt: skip


@pytest.fixture(scope="module")
def gemma(model_path):
    return ov(model_path("gemma-ov"))


@pytest.fixture(scope="module")
def tiny(model_path):
    return ov(model_path("tiny-ov"))


class TestGemmaOpenVINOContract(LLMContract):
    max_tokens_option = "max_new_tokens"

    @pytest.fixture
    def llm(self, gemma):
        return gemma


class TestTinyOpenVINOContract(LLMContract):
    max_tokens_option = "max_new_tokens"
    prompts = TINY_PROMPTS

    @pytest.fixture
    def llm(self, tiny):
        return tiny


def test_same_greedy_tokens_as_torch(gemma, model_path):
    # The same float32 weights through OpenVINO and through torch: same greedy tokens.
    torch_llm = HuggingFacePipeline.from_model_id(
        model_id=str(model_path("gemma-hf")),
        task="text-generation",
        pipeline_kwargs={**GREEDY, "max_new_tokens": 32},
    )
    for prompt in (
        "The first man on the moon was",
        "My favourite colour is",
        "One, two, three, four,",
    ):
        ov_ids = gemma.generate([prompt], max_new_tokens=32).generations[0][0].text
        assert ov_ids == torch_llm.invoke(prompt)


def int8_weights(model_dir) -> bool:
    """Whether an exported model keeps weights as 8-bit integers (NNCF's int8 compression)."""
    return 'element_type="u8"' in (model_dir / "openvino_model.xml").read_text()


def test_int8_weights_load_and_answer(model_path, gemma, capsys):
    assert int8_weights(model_path("gemma-ov-int8"))
    assert not int8_weights(model_path("gemma-ov"))
    int8 = ov(model_path("gemma-ov-int8"))
    prompt = "The first man on the moon was"
    a, b = int8.invoke(prompt, max_new_tokens=32), gemma.invoke(prompt, max_new_tokens=32)
    assert a.strip()
    with capsys.disabled():
        same = len(os.path.commonprefix([a, b]))  # noqa: RUF071 - of two strings, not paths
        print(
            f"\n[openvino] int8 vs float32, first {same} of {len(b)} characters equal: "
            f"{a!r} / {b!r}"
        )


def test_export_once_then_reuse(model_path, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LOCALLLMS_CACHE", str(tmp_path))
    caplog.set_level("INFO", logger="langchain_localllms")
    first = ov(model_path("tiny-hf"), model_kwargs={"weight_format": "int8"})
    assert "exporting" in caplog.text  # logged; the bar shows on a terminal only
    caplog.clear()
    exported = list((tmp_path / "openvino").iterdir())
    assert len(exported) == 1
    assert int8_weights(exported[0])  # weight_format reached the export
    again = ov(model_path("tiny-hf"), model_kwargs={"weight_format": "int8"})
    assert "exporting" not in caplog.text
    assert again.invoke(TINY_PROMPTS[0]) == first.invoke(TINY_PROMPTS[0])


def test_seed_flows_chain_and_kv_cache_precision(model_path):
    ov_config = {"KV_CACHE_PRECISION": "u8", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "32",
                 "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "CACHE_DIR": ""}  # fmt: skip
    ov_llm = HuggingFacePipeline.from_model_id(
        model_id=str(model_path("gemma-ov")), task="text-generation", backend="openvino",
        model_kwargs={"device": "CPU", "ov_config": ov_config},
        pipeline_kwargs={"max_new_tokens": 10},
    )  # fmt: skip
    prompt = PromptTemplate.from_template(
        "Question: {question}\n\nAnswer: Let's think step by step."
    )
    out = (prompt | ov_llm).invoke({"question": "What is electroencephalography?"})
    assert isinstance(out, str)
    assert out.strip()


class Person(pydantic.BaseModel):
    name: str
    age: int


def test_grammars_constrain_openvino_decoding(gemma):
    person = Person.model_validate_json(
        gemma.invoke("Describe a person in JSON format:", grammar=Person, max_new_tokens=48)
    )
    assert person.name
    books = json.loads(
        gemma.invoke(
            "List of top-3 my favourite books:", grammar=Grammar.builtin("list"), max_new_tokens=200
        )
    )
    assert isinstance(books, list)
    assert books
    assert all(isinstance(b, str) for b in books)
    with pytest.raises(ValueError, match="line 1"):
        gemma.invoke("x", grammar='root ::= "unclosed')


def test_bad_openvino_settings(model_path):
    with pytest.raises(ValueError, match="weight_format"):
        ov(model_path("tiny-hf"), model_kwargs={"weight_format": "int3"})
    with pytest.raises(ValueError, match="already exported"):
        ov(model_path("tiny-ov"), model_kwargs={"weight_format": "int8"})
    with pytest.raises(ValueError, match="device"):
        ov(model_path("tiny-ov"), model_kwargs={"device": "NPU9"})


def test_close_gives_the_memory_back(model_path):
    ov(model_path("gemma-ov")).close()  # OpenVINO's code is imported: not counted
    before = rss_mb()
    llm = ov(model_path("gemma-ov"))
    assert llm.invoke("The capital of France is")
    loaded = rss_mb()
    llm.close()
    after = rss_mb()
    assert loaded - before > 100
    assert loaded - after >= 0.6 * (loaded - before), (before, loaded, after)
    with pytest.raises(ClosedError):
        llm.invoke("The capital of France is")
