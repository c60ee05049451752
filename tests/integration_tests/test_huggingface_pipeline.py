"""HuggingFacePipeline (torch) on real models: the contract, the seed's flows, grammars,
threads, batching and errors."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading

import pydantic
import pytest
import torch
from langchain_core.caches import InMemoryCache
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.prompts import PromptTemplate
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessor,
    T5Config,
    T5ForConditionalGeneration,
    pipeline,
)

from langchain_localllms import Grammar, HuggingFacePipeline
from langchain_localllms.core.files import cpu_count
from langchain_localllms.core.threads import native_thread
from tests.integration_tests.contract import PROMPT, LLMContract

GREEDY = {"temperature": 0, "max_new_tokens": 16}
#: Prompts the random tiny model answers with a few clean words.
TINY_PROMPTS = ["The big tree gives", "The cat sees a dog and", "Two old dogs run to the house"]
SEED_TEMPLATE = """Question: {question}

Answer: Let's think step by step."""


@pytest.fixture(scope="module", autouse=True)
def torch_threads():
    """Half the CPUs: with all of them (torch's default), decoding slows several-fold
    when other processes share the machine, as they do on CI runners."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, cpu_count() // 2))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def gemma(model_path):
    return HuggingFacePipeline.from_model_id(
        model_id=str(model_path("gemma-hf")), task="text-generation", pipeline_kwargs=GREEDY
    )


@pytest.fixture(scope="module")
def tiny(model_path):
    return HuggingFacePipeline.from_model_id(
        model_id=str(model_path("tiny-hf")), task="text-generation", pipeline_kwargs=GREEDY
    )


def generating() -> bool:
    """Whether a generation runs (or waits) on the Hugging Face thread."""
    return native_thread("huggingface").busy


class TestGemmaContract(LLMContract):
    max_tokens_option = "max_new_tokens"

    @pytest.fixture
    def llm(self, gemma):
        return gemma


class TestTinyContract(LLMContract):
    max_tokens_option = "max_new_tokens"
    prompts = TINY_PROMPTS

    @pytest.fixture
    def llm(self, tiny):
        return tiny


# ------------------------------------------------------------ the seed's flows
def test_known_greedy_answer(gemma):
    # transformers float32 gives the same greedy tokens as llama.cpp here (docs/models.md).
    assert gemma.invoke("The first man on the moon was").startswith(" a man named Apollo 11.")


def test_seed_from_model_id_with_pipeline_kwargs(model_path):
    hf = HuggingFacePipeline.from_model_id(
        model_id=str(model_path("tiny-hf")),
        task="text-generation",
        pipeline_kwargs={"max_new_tokens": 10},
    )
    gen = hf.generate([TINY_PROMPTS[0]]).generations[0][0]
    assert gen.generation_info["completion_tokens"] <= 10
    assert hf.pipeline.task == "text-generation"
    assert hf.pipeline.model is hf.model
    assert hf.pipeline.tokenizer is hf.tokenizer


def test_seed_existing_pipeline(gemma):
    pipe = pipeline(
        "text-generation", model=gemma.model, tokenizer=gemma.tokenizer, max_new_tokens=10
    )
    hf = HuggingFacePipeline(pipeline=pipe)
    assert hf.model_id == gemma.model.name_or_path
    gen = hf.generate([PROMPT], temperature=0).generations[0][0]
    assert gen.generation_info["completion_tokens"] == 10
    assert gen.generation_info["finish_reason"] == "length"
    assert gen.text == gemma.invoke(PROMPT, max_new_tokens=10)
    assert PROMPT not in gen.text


def test_existing_pipeline_loaded_by_hand(model_path):
    path = str(model_path("tiny-hf"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer, max_new_tokens=10)
    hf = HuggingFacePipeline(pipeline=pipe, temperature=0)
    out = hf.invoke(TINY_PROMPTS[0])
    assert out
    assert (
        hf.generate([TINY_PROMPTS[0]]).generations[0][0].generation_info["completion_tokens"] == 10
    )


def test_seed_chain_never_echoes_the_prompt(gemma):
    chain = PromptTemplate.from_template(SEED_TEMPLATE) | gemma
    question = "What is electroencephalography?"
    out = chain.invoke({"question": question})
    assert out.strip()
    assert question not in out
    assert "Answer:" not in out
    streamed = "".join(chain.stream({"question": question}))
    assert streamed == out


def test_return_full_text_is_honoured(tiny):
    p = TINY_PROMPTS[0]
    answer = tiny.invoke(p)
    assert tiny.invoke(p, pipeline_kwargs={"return_full_text": True}) == p + answer
    assert "".join(tiny.stream(p, skip_prompt=False)) == p + answer
    pipe = pipeline(
        "text-generation", model=tiny.model, tokenizer=tiny.tokenizer, return_full_text=True
    )
    echoing = HuggingFacePipeline(pipeline=pipe, **GREEDY)
    assert echoing.invoke(p) == p + answer
    assert echoing.batch([p, TINY_PROMPTS[1]])[0] == p + answer
    # A stop applies to the answer only, also when the echoed prompt holds it.
    word = p.split()[1]
    assert echoing.invoke(p, stop=[word]) == p + tiny.invoke(p, stop=[word])
    assert echoing.batch([p, p], stop=[word])[0] == p + tiny.invoke(p, stop=[word])


def test_gpu_style_device_arguments_on_this_machine(model_path):
    path = str(model_path("tiny-hf"))
    expected = HuggingFacePipeline.from_model_id(model_id=path, task="text-generation", **GREEDY)
    answer = expected.invoke(TINY_PROMPTS[0])
    for device in (-1, "cpu"):
        hf = HuggingFacePipeline.from_model_id(
            model_id=path, task="text-generation", device=device, **GREEDY
        )
        assert hf.invoke(TINY_PROMPTS[0]) == answer
    auto = HuggingFacePipeline.from_model_id(
        model_id=path, task="text-generation", device_map="auto", **GREEDY
    )
    assert auto.invoke(TINY_PROMPTS[0]) == answer
    if torch.cuda.device_count() == 0:
        with pytest.raises(ValueError, match=r"CUDA GPU 0.*device=-1"):
            HuggingFacePipeline.from_model_id(model_id=path, task="text-generation", device=0)
    else:
        gpu = HuggingFacePipeline.from_model_id(
            model_id=path, task="text-generation", device=0, **GREEDY
        )
        assert gpu.model.device.type == "cuda"
        assert gpu.invoke(TINY_PROMPTS[0])
    with pytest.raises(ValueError, match="not both"):
        HuggingFacePipeline.from_model_id(
            model_id=path, task="text-generation", device="cpu", device_map="auto"
        )
    with pytest.raises(ValueError, match="device=-2"):
        HuggingFacePipeline.from_model_id(model_id=path, task="text-generation", device=-2)


def test_seed_batch_with_bound_stop(gemma):
    # The seed's flow: model_kwargs={"temperature": 0, "max_length": 64}, batch_size=2,
    # prompt | llm.bind(stop=["\n\n"]), .batch(4 questions). The model is shared.
    pipe = pipeline("text-generation", model=gemma.model, tokenizer=gemma.tokenizer)
    llm = HuggingFacePipeline(
        pipeline=pipe, batch_size=2, model_kwargs={"temperature": 0, "max_length": 64}
    )
    questions = [{"question": f"What is the number {i} in french?"} for i in range(4)]
    # This base model opens every answer to the seed's template with a blank line, so
    # the stop ends it at once; ending the template with that blank line gives answers.
    prompts = [SEED_TEMPLATE.format(**q) for q in questions]
    for gens in llm.generate(prompts, stop=["\n\n"]).generations:
        assert gens[0].text == ""
        assert gens[0].generation_info["stop_sequence"] == "\n\n"
    chain = PromptTemplate.from_template(SEED_TEMPLATE + "\n\n") | llm.bind(stop=["\n\n"])
    answers = chain.batch(questions)
    assert len(answers) == 4
    assert all(a.strip() and "\n\n" not in a for a in answers)
    assert answers == [chain.invoke(q) for q in questions]


def test_max_length_counts_the_prompt_per_row_in_a_batch(model_path):
    hf = HuggingFacePipeline.from_model_id(
        model_id=str(model_path("tiny-hf")),
        task="text-generation",
        batch_size=2,
        model_kwargs={"temperature": 0, "max_length": 24},
    )
    result = hf.generate(TINY_PROMPTS)
    for gens, prompt in zip(result.generations, TINY_PROMPTS, strict=True):
        info = gens[0].generation_info
        if info["finish_reason"] == "length":
            assert info["prompt_tokens"] + info["completion_tokens"] == 24
        assert gens[0].text == hf.invoke(prompt)


def test_batch_size_one_streams_each_prompt_to_callbacks(tiny):
    from tests.integration_tests.contract import Recorder

    one = tiny.model_copy(update={"batch_size": 1})
    rec = Recorder()
    outs = one.batch(TINY_PROMPTS[:2], config={"callbacks": [rec]})
    assert outs == tiny.batch(TINY_PROMPTS[:2])
    assert "".join(rec.tokens) == "".join(outs)


def test_batches_fill_16_rows_per_generate_on_a_cpu_unless_batch_size_says(tiny, monkeypatch):
    rows = []
    generate = type(tiny.model).generate

    def spy(model, *args, **kwargs):
        rows.append(kwargs["input_ids"].shape[0])
        return generate(model, *args, **kwargs)

    monkeypatch.setattr(type(tiny.model), "generate", spy)
    prompts = [TINY_PROMPTS[i % 3] for i in range(20)]
    outs = tiny.batch(prompts, max_new_tokens=4)
    assert rows == [16, 4]
    assert outs[:3] == [tiny.invoke(p, max_new_tokens=4) for p in TINY_PROMPTS]
    rows.clear()
    tiny.model_copy(update={"batch_size": 8}).batch(prompts, max_new_tokens=4)
    assert rows == [8, 8, 4]


# --------------------------------------------------------------- parameters
def test_per_call_generation_parameters(tiny):
    gen = tiny.generate([TINY_PROMPTS[0]], pipeline_kwargs={"max_new_tokens": 3})
    assert gen.generations[0][0].generation_info["completion_tokens"] == 3
    a = tiny.invoke(TINY_PROMPTS[0], temperature=1.0, seed=7, max_new_tokens=12)
    b = tiny.invoke(TINY_PROMPTS[0], temperature=1.0, seed=7, max_new_tokens=12)
    assert a == b
    assert tiny.invoke(TINY_PROMPTS[0], do_sample=False, temperature=0.7) == tiny.invoke(
        TINY_PROMPTS[0]
    )
    with pytest.raises(ValueError, match="top_p"):
        tiny.invoke(TINY_PROMPTS[0], top_p=2)


def test_unknown_and_refused_options_are_errors(tiny, model_path):
    pipe = tiny.pipeline
    with pytest.raises(ValueError, match="max_new_token"):
        HuggingFacePipeline(pipeline=pipe, pipeline_kwargs={"max_new_token": 5})
    with pytest.raises(ValueError, match="stop="):
        HuggingFacePipeline(pipeline=pipe, pipeline_kwargs={"stop_sequence": "."})
    with pytest.raises(ValueError, match="beam search"):
        HuggingFacePipeline(pipeline=pipe, pipeline_kwargs={"num_beams": 4})
    with pytest.raises(ValueError, match="one place"):
        HuggingFacePipeline(pipeline=pipe, pipeline_kwargs={"max_new_tokens": 5}, max_new_tokens=6)
    with pytest.raises(ValueError, match="from_model_id"):
        HuggingFacePipeline(pipeline=pipe, model_kwargs={"dtype": "float16"})
    with pytest.raises(ValueError, match="max_new_token"):
        tiny.invoke(TINY_PROMPTS[0], pipeline_kwargs={"max_new_token": 5})
    with pytest.raises(ValueError, match="no_such_kwarg"):
        HuggingFacePipeline.from_model_id(
            model_id=str(model_path("tiny-hf")),
            task="text-generation",
            model_kwargs={"no_such_kwarg": 1},
        )
    with pytest.raises(ValueError, match="ipex"):
        HuggingFacePipeline(pipeline=pipe, backend="ipex")
    with pytest.raises(ValueError, match="task"):
        HuggingFacePipeline(pipeline=pipe, task="fill-mask")


def test_openvino_backend_without_optimum_names_the_extra(model_path):
    # This environment has no optimum-intel (it needs its own transformers, see
    # test_openvino.py, which runs in .venv-openvino).
    pytest.importorskip("transformers")
    try:
        import optimum.intel  # noqa: F401
    except ImportError:
        pass
    else:
        return
    with pytest.raises(ImportError, match=r"langchain-localllms\[openvino\]"):
        HuggingFacePipeline.from_model_id(
            model_id=str(model_path("tiny-hf")), task="text-generation", backend="openvino"
        )


def test_missing_models_fail_fast_and_clearly(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        HuggingFacePipeline.from_model_id(
            model_id=str(tmp_path / "nowhere"), task="text-generation"
        )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        HuggingFacePipeline.from_model_id(
            model_id="gpt2", task="text-generation", model_kwargs={"cache_dir": str(tmp_path)}
        )


def test_remote_code_stays_off_unless_asked(model_path, tmp_path):
    src = model_path("tiny-hf")
    for f in src.iterdir():
        shutil.copy(f, tmp_path / f.name)
    marker = tmp_path / "remote-code-ran"
    (tmp_path / "modeling_custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((tmp_path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.Custom"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    hf = HuggingFacePipeline.from_model_id(model_id=str(tmp_path), task="text-generation", **GREEDY)
    assert type(hf.model).__name__ == "LlamaForCausalLM"
    assert not marker.exists()


# ------------------------------------------------------ threads and streams
class Boom(LogitsProcessor):
    def __init__(self, after: int) -> None:
        self.calls = 0
        self.after = after

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls > self.after:
            raise RuntimeError("boom in the generation thread")
        return scores


def test_generation_thread_error_surfaces_as_itself(tiny):
    with pytest.raises(RuntimeError, match="boom in the generation thread"):
        tiny.invoke(TINY_PROMPTS[0], pipeline_kwargs={"logits_processor": [Boom(after=3)]})
    stream = tiny.stream(TINY_PROMPTS[0], pipeline_kwargs={"logits_processor": [Boom(after=0)]})
    with pytest.raises(RuntimeError, match="boom in the generation thread"):
        list(stream)
    assert not generating()


def test_a_consumer_that_stops_early_stops_generation(gemma):
    counter = Boom(after=10_000)
    stream = gemma.stream(
        "Count: one, two, three,",
        max_new_tokens=400,
        pipeline_kwargs={"logits_processor": [counter]},
    )
    first = next(stream)
    assert first
    stream.close()
    assert not generating()
    assert counter.calls < 40, f"generation went on after the consumer stopped ({counter.calls})"


async def test_an_async_consumer_that_stops_early_stops_generation(tiny):
    counter = Boom(after=10_000)
    stream = tiny.astream(
        TINY_PROMPTS[0], max_new_tokens=900, pipeline_kwargs={"logits_processor": [counter]}
    )
    async for _ in stream:
        break
    await stream.aclose()
    for _ in range(500):  # the inner generators close on the loop, soon after
        if not generating():
            break
        await asyncio.sleep(0.01)
    assert not generating()
    assert counter.calls < 900, "generation ran to the end after the consumer stopped"


def test_threads_share_one_instance(tiny):
    expected = {p: tiny.invoke(p) for p in TINY_PROMPTS}
    results: list[tuple[str, str]] = []

    def work(p):
        results.append((p, tiny.invoke(p)))

    threads = [threading.Thread(target=work, args=(TINY_PROMPTS[i % 3],)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == sorted(
        (TINY_PROMPTS[i % 3], expected[TINY_PROMPTS[i % 3]]) for i in range(6)
    )


def test_stop_strings_end_generation_early(tiny):
    full = tiny.invoke(TINY_PROMPTS[0], max_new_tokens=64)
    stop = full.split()[2]
    for batch in (1, 2):
        counter = Boom(after=10_000)
        llm = tiny.model_copy(update={"batch_size": batch})
        result = llm.generate(
            [TINY_PROMPTS[0]] * batch,  # a batch runs until every prompt has ended
            stop=[stop],
            max_new_tokens=64,
            pipeline_kwargs={"logits_processor": [counter]},
        )
        info = result.generations[0][0].generation_info
        assert result.generations[0][0].text == full[: full.index(stop)]
        assert info["stop_sequence"] == stop
        # Generation ended a token or so after the stop, not at max_new_tokens.
        assert counter.calls <= len(tiny.tokenizer(full[: full.index(stop) + len(stop)]).input_ids)
        assert info["completion_tokens"] < 64


def test_multibyte_characters_stream_whole(tiny):
    # The tiny tokenizer spells emoji with byte tokens; pieces never split a character.
    tokens = [f"<0x{b:02X}>" for b in "😀🎉".encode()]
    ids = tiny.tokenizer.convert_tokens_to_ids(tokens)
    assert tiny.tokenizer.unk_token_id not in ids

    class Force(LogitsProcessor):
        def __init__(self) -> None:
            self.i = 0

        def __call__(self, input_ids, scores):
            token = ids[self.i] if self.i < len(ids) else tiny.tokenizer.eos_token_id
            self.i += 1
            forced = torch.full_like(scores, float("-inf"))
            forced[:, token] = 0
            return forced

    pieces = list(tiny.stream("Where is", pipeline_kwargs={"logits_processor": [Force()]}))
    assert "".join(pieces) == "😀🎉"
    assert all("\ufffd" not in p for p in pieces)
    gen = tiny.generate(["Where is"], pipeline_kwargs={"logits_processor": [Force()]})
    assert gen.generations[0][0].generation_info["finish_reason"] == "stop"
    assert gen.generations[0][0].generation_info["completion_tokens"] == len(ids)


# ------------------------------------------------------------------ grammars
class Person(pydantic.BaseModel):
    name: str
    age: int


def test_seed_person_in_json_from_a_pydantic_schema(gemma):
    gen = gemma.generate(
        ["Describe a person in JSON format:"], grammar=Person, max_new_tokens=48
    ).generations[0][0]
    person = Person.model_validate_json(gen.text)
    assert person.name
    assert gen.generation_info["finish_reason"] == "stop"
    bound = gemma.bind(grammar=Grammar.from_pydantic(Person), max_new_tokens=48)
    assert Person.model_validate_json(bound.invoke("Describe a person in JSON format:")) == person


def test_seed_list_of_books(gemma):
    out = gemma.invoke(
        "List of top-3 my favourite books:", grammar=Grammar.builtin("list"), max_new_tokens=96
    )
    books = json.loads(out)
    assert isinstance(books, list)
    assert books
    assert all(isinstance(b, str) and b for b in books)


def test_json_grammar_per_instance_streams(gemma):
    llm = HuggingFacePipeline(
        pipeline=gemma.pipeline, grammar=Grammar.builtin("json"), **{**GREEDY, "max_new_tokens": 64}
    )
    prompt = 'A person in JSON: {"name": "Ada", "age": 36}\nDescribe a person in JSON format:'
    pieces = list(llm.stream(prompt))
    assert len([p for p in pieces if p]) > 2
    assert isinstance(json.loads("".join(pieces)), dict)
    assert llm._identifying_params != gemma._identifying_params


def test_grammar_in_a_batch(gemma):
    llm = HuggingFacePipeline(
        pipeline=gemma.pipeline, batch_size=2, **{**GREEDY, "max_new_tokens": 48}
    )
    prompts = ["Describe a person in JSON format:", "Describe your best friend in JSON:"]
    outs = llm.batch(prompts, grammar=Person)
    assert all(Person.model_validate_json(o) for o in outs)
    assert outs == [llm.invoke(p, grammar=Person) for p in prompts]


def test_malformed_grammars_are_value_errors(gemma):
    with pytest.raises(ValueError, match="line 1:"):
        gemma.invoke("x", grammar='root ::= "unclosed')
    with pytest.raises(ValueError, match="line 1:"):
        HuggingFacePipeline(pipeline=gemma.pipeline, grammar='root ::= "unclosed')
    # Token references are llama.cpp syntax that llguidance does not read.
    with pytest.raises(ValueError, match="llguidance cannot"):
        gemma.invoke("x", grammar="root ::= <[1]>")


# ---------------------------------------------------------- encoder-decoder
@pytest.fixture(scope="module")
def tiny_t5(model_path, tmp_path_factory):
    """A random T5 that shares the tiny model's tokenizer (built in a second)."""
    out = tmp_path_factory.mktemp("tiny-t5")
    for f in model_path("tiny-hf").iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, out / f.name)
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=512, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        pad_token_id=0, eos_token_id=2, decoder_start_token_id=0,
    )  # fmt: skip
    T5ForConditionalGeneration(config).save_pretrained(out)
    return out


@pytest.mark.parametrize("task", ["text2text-generation", "summarization"])
def test_text2text_generation(tiny_t5, task):
    hf = HuggingFacePipeline.from_model_id(
        model_id=str(tiny_t5), task=task, pipeline_kwargs={"temperature": 0, "max_new_tokens": 12}
    )
    prompts = ["Red cat and blue dog", "The big tree gives"]
    out = hf.invoke(prompts[0])
    assert out
    assert prompts[0] not in out
    assert "".join(hf.stream(prompts[0])) == out
    assert hf.batch(prompts) == [hf.invoke(p) for p in prompts]
    info = hf.generate([prompts[0]]).generations[0][0].generation_info
    assert info["completion_tokens"] == 12
    assert info["finish_reason"] == "length"


def test_a_token_in_model_kwargs_reaches_no_repr_trace_or_cache_key(model_path):
    secret = "hf_SECRET_1234"
    llm = HuggingFacePipeline.from_model_id(
        model_id=str(model_path("tiny-hf")), task="text-generation",
        model_kwargs={"token": secret}, pipeline_kwargs={**GREEDY, "max_new_tokens": 3},
    )  # fmt: skip
    seen = []

    class Spy(BaseCallbackHandler):
        def on_llm_start(self, serialized, prompts, **kwargs):
            seen.append(repr(kwargs.get("invocation_params")) + repr(kwargs.get("metadata")))

    cache = InMemoryCache()
    llm.cache = cache
    llm.invoke(TINY_PROMPTS[0], config={"callbacks": [Spy()]})
    # a run was traced and an answer cached
    assert seen
    assert cache._cache
    for text in (repr(llm), str(llm), *seen, repr(list(cache._cache))):
        assert secret not in text
