"""LlamaCpp on real GGUF models: the contract, grammars, errors, threads."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from pathlib import Path

import pydantic
import pytest
from langchain_core.callbacks import CallbackManager, StreamingStdOutCallbackHandler

import langchain_localllms.core.requests as requests
from langchain_localllms import Grammar, LlamaCpp
from langchain_localllms.core.threads import native_thread
from langchain_localllms.errors import ContextOverflowError
from tests.integration_tests.contract import PROMPT, LLMContract, Recorder

GREEDY = {"temperature": 0.0, "repeat_penalty": 1.0, "max_tokens": 16}


@pytest.fixture(scope="module")
def gemma(model_path):
    return LlamaCpp(model_path=str(model_path("gemma-gguf")), **GREEDY)


@pytest.fixture(scope="module")
def tiny(model_path):
    # f32 KV cache: the random tiny model has near-ties that f16 rounding can flip.
    return LlamaCpp(model_path=str(model_path("tiny-gguf")), f16_kv=False, n_ctx=1024, **GREEDY)


class TestGemmaContract(LLMContract):
    @pytest.fixture
    def llm(self, gemma):
        return gemma

    @pytest.fixture
    def other_llm(self, model_path):
        return LlamaCpp(model_path=str(model_path("gemma-gguf")), **{**GREEDY, "temperature": 0.7})


class TestTinyContract(LLMContract):
    prompts = ["The first man on the moon was", "My favourite colour is", "Red cat and blue dog"]

    @pytest.fixture
    def llm(self, tiny):
        return tiny

    @pytest.fixture
    def other_llm(self, model_path):
        return LlamaCpp(model_path=str(model_path("gemma-gguf")), **GREEDY)


def test_known_greedy_answer(gemma):
    # Gemma-3-270M's greedy continuation, as llama.cpp gives it with no penalties.
    assert gemma.invoke("The first man on the moon was").startswith(" a man named Apollo 11.")


def test_defaults_are_fast_ones(model_path):
    llm = LlamaCpp(model_path=str(model_path("tiny-gguf")))
    assert llm.n_batch == 512
    assert llm.client.n_batch == 512
    from langchain_localllms.core.files import cpu_count

    assert llm.client.context_params.n_threads == cpu_count()
    assert llm.verbose is False


def test_seed_makes_sampling_repeatable(gemma):
    a = gemma.invoke(PROMPT, temperature=1.0, seed=7)
    b = gemma.invoke(PROMPT, temperature=1.0, seed=7)
    assert a == b


def test_json_grammar_gives_json(gemma):
    # A base model rambles inside free-form JSON; one example shows it where to end.
    prompt = 'A person in JSON: {"name": "Ada", "age": 36}\nDescribe a person in JSON format:'
    gen = gemma.generate([prompt], grammar=Grammar.builtin("json"), max_tokens=96).generations[0][0]
    assert gen.generation_info["finish_reason"] == "stop"
    assert isinstance(json.loads(gen.text), dict)


class Person(pydantic.BaseModel):
    name: str
    age: int


def test_schema_grammar_per_call_and_bound(gemma):
    out = gemma.invoke("Describe a person in JSON format:", grammar=Person, max_tokens=64)
    person = Person.model_validate_json(out)
    assert person.name
    bound = gemma.bind(grammar=Grammar.from_pydantic(Person))
    assert Person.model_validate_json(
        bound.invoke("Describe a person in JSON format:", max_tokens=64)
    )


def test_list_grammar_from_file_gives_a_list_of_strings(model_path, tmp_path):
    f = tmp_path / "list.gbnf"
    f.write_text(Grammar.builtin("list").gbnf)
    llm = LlamaCpp(
        model_path=str(model_path("gemma-gguf")),
        grammar_path=str(f),
        **{**GREEDY, "max_tokens": 256},
    )
    value = json.loads(llm.invoke("List of top-3 my favourite books:"))
    assert isinstance(value, list)
    assert value
    assert all(isinstance(v, str) and v for v in value)


def test_grammar_streams(gemma):
    pieces = list(gemma.stream("A JSON object:", grammar=Grammar.builtin("json"), max_tokens=96))
    assert len(pieces) > 2
    json.loads("".join(pieces))


def test_bad_grammar_is_a_value_error_before_native_code(model_path):
    with pytest.raises(ValueError, match="line 1:"):
        LlamaCpp(model_path=str(model_path("gemma-gguf")), grammar='root ::= "unclosed')


def test_missing_and_wrong_model_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.gguf"):
        LlamaCpp(model_path=str(tmp_path / "nowhere.gguf"))
    with pytest.raises(IsADirectoryError, match="directory"):
        LlamaCpp(model_path=str(tmp_path))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(ValueError, match="not a GGUF model"):
        LlamaCpp(model_path=str(junk))


def test_truncated_gguf_is_an_error_not_a_crash(model_path, tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(model_path("gemma-gguf"), "rb") as f:
        cut.write_bytes(f.read(4_000_000))
    code = (
        "from langchain_localllms import LlamaCpp\n"
        f"try:\n    LlamaCpp(model_path={str(cut)!r})\n"
        "except ValueError as e:\n    print('ERR', e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ERR llama.cpp could not load" in proc.stdout
    assert str(cut) in proc.stdout


def test_prompt_longer_than_context(model_path):
    llm = LlamaCpp(model_path=str(model_path("gemma-gguf")), n_ctx=64, **GREEDY)
    with pytest.raises(ValueError, match="larger n_ctx"):
        llm.invoke("word " * 200)


def test_unsupported_and_unknown_parameters(model_path):
    path = str(model_path("gemma-gguf"))
    with pytest.raises(ValueError, match="suffix"):
        LlamaCpp(model_path=path, suffix="x")
    with pytest.raises(ValueError, match="n_ctxx"):
        LlamaCpp(model_path=path, model_kwargs={"n_ctxx": 5})
    with pytest.raises(ValueError, match="temperature"):
        LlamaCpp(model_path=path, temperature=-1)


def _in_threads(call, prompts):
    """``call(prompt)`` for each prompt from a thread of its own, all at once."""
    results = {}
    start = threading.Barrier(len(prompts))

    def work(p):
        start.wait()
        results[p] = call(p)

    threads = [threading.Thread(target=work, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [results.get(p) for p in prompts]


MOON = [f"Fact number {i} about the moon is that" for i in range(8)]


@pytest.fixture(scope="module")
def gemma_exact(model_path):
    # Weights as in the file and at most 4 sequences per llama_decode: every sequence
    # of a batch is computed exactly as a single call (see test_exact_batches_...).
    llm = LlamaCpp(model_path=str(model_path("gemma-gguf")), exact_batches=True, **GREEDY)
    yield llm
    llm.close()


def test_calls_from_threads_join_one_batch_and_answer_as_single_calls(gemma_exact):
    def generate(prompt, **kwargs):
        gen = gemma_exact.generate([prompt], **kwargs).generations[0][0]
        return gen.text, _without_timings(gen.generation_info)

    expected = [generate(p) for p in MOON]
    batcher = gemma_exact.engine.batcher
    batcher.widest = 0
    assert _in_threads(generate, MOON) == expected  # texts, usage, finish reasons
    assert batcher.widest > 1  # they ran in one batch, not one after another
    # Capped calls: the one that started alone and led the batch ends as "length" too.
    capped = [generate(p, max_tokens=5) for p in MOON[:4]]
    assert {info["finish_reason"] for _, info in capped} == {"length"}
    assert _in_threads(lambda p: generate(p, max_tokens=5), MOON[:4]) == capped


def test_threads_share_one_instance_with_repacked_weights(gemma):
    # Repacked weights round rows of a wide batch otherwise than a single call, so
    # an answer may differ from its single call's where two tokens nearly tie; every
    # thread still gets its own prompt's answer, decoded in one batch.
    batcher = gemma.engine.batcher
    batcher.widest = 0
    singles = [gemma.invoke(p) for p in MOON]
    answers = _in_threads(gemma.invoke, MOON)
    assert batcher.widest > 4
    for single, answer in zip(singles, answers, strict=True):
        assert answer
        assert answer.split()[:3] == single.split()[:3]


def test_concurrent_async_calls_join_one_batch(gemma_exact):
    expected = [gemma_exact.invoke(p) for p in MOON[:4]]
    batcher = gemma_exact.engine.batcher
    batcher.widest = 0

    async def main():
        return await asyncio.gather(*(gemma_exact.ainvoke(p) for p in MOON[:4]))

    assert asyncio.run(main()) == expected
    assert batcher.widest > 1


def test_streams_read_in_turn_decode_together_and_one_closed_early_frees_its_place(gemma_exact):
    a, b = MOON[0], MOON[1]
    want_a, want_b = gemma_exact.invoke(a), gemma_exact.invoke(b)
    batcher = gemma_exact.engine.batcher
    batcher.widest = 0
    first = gemma_exact.stream(a)
    second = gemma_exact.stream(b)
    got_b = []
    for i, (_, piece) in enumerate(zip(first, second, strict=False)):
        got_b.append(piece)
        if i == 1:
            break
    first.close()  # the first stream's sequence ends here; the second goes on
    got_b += list(second)
    assert "".join(got_b) == want_b
    assert batcher.widest == 2  # the second joined the first: both ran in the batch
    assert gemma_exact.invoke(a) == want_a
    assert not batcher.waiting


def test_a_batch_and_a_call_from_another_thread_share_the_batch(gemma_exact):
    expected = [gemma_exact.invoke(p) for p in MOON]
    out = {}
    thread = threading.Thread(target=lambda: out.update(single=gemma_exact.invoke(MOON[7])))
    batcher = gemma_exact.engine.batcher
    batcher.widest = 0
    thread.start()
    got = gemma_exact.batch(MOON[:7])
    thread.join()
    assert got == expected[:7]
    assert out["single"] == expected[7]
    assert batcher.widest == 8  # the call from the other thread ran in the batch too


def test_seed_flow_callback_manager_streams_to_stdout(model_path, capsys):
    llm = LlamaCpp(
        model_path=str(model_path("gemma-gguf")),
        temperature=0.75,
        max_tokens=12,
        top_p=1,
        n_gpu_layers=-1,
        n_batch=512,
        f16_kv=True,
        callback_manager=CallbackManager([StreamingStdOutCallbackHandler()]),
        verbose=False,
    )
    out = llm.invoke("Question: A rap battle between Stephen Colbert and John Oliver")
    assert out
    assert out in capsys.readouterr().out


def test_repeated_prompt_decodes_the_same_on_a_sliding_window_model(gemma):
    # Gemma 3 uses sliding-window attention; llama-cpp-python's KV prefix reuse
    # changed the 4th answer of this sequence until LlamaCpp started each call clean.
    q = (
        "<<SYS>> \n You are an assistant. \n <</SYS>> \n\n [INST] What NFL team won the "
        "Super Bowl in the year that Justin Bieber was born? [/INST]"
    )
    first = gemma.invoke(q)
    gemma.invoke("<start_of_turn>user\nQuestion: What is the capital of France?<end_of_turn>\n")
    assert gemma.invoke(q) == first
    assert gemma.invoke(q) == first


def test_echo_is_never_cut_by_a_stop_in_the_prompt(gemma):
    # "France" is in the prompt: the stop applies to the answer only.
    answer = gemma.invoke(PROMPT, stop=["France"])
    assert gemma.invoke(PROMPT, echo=True, stop=["France"]) == PROMPT + answer
    assert "".join(gemma.stream(PROMPT, echo=True, stop=["France"])) == PROMPT + answer


def test_community_parameters_are_taken_and_model_kwargs_cannot_disagree(model_path, monkeypatch):
    path = str(model_path("tiny-gguf"))
    monkeypatch.setattr(requests, "_WARNED", set())
    # langchain_community's own defaults pass as they are
    LlamaCpp(model_path=path, n_ctx=256, n_parts=-1, vocab_only=False, client=None)
    with pytest.warns(UserWarning, match="LlamaCpp ignores n_parts=2"):
        LlamaCpp(model_path=path, n_ctx=256, n_parts=2)
    with pytest.raises(ValueError, match="vocab_only=True"):
        LlamaCpp(model_path=path, vocab_only=True)
    # a field given in model_kwargs is that field: the cache key says what runs
    llm = LlamaCpp(model_path=path, model_kwargs={"n_ctx": 512})
    assert llm.n_ctx == 512 == llm.client.n_ctx()
    assert llm.model_kwargs == {}
    with pytest.raises(ValueError, match="n_ctx is given twice"):
        LlamaCpp(model_path=path, n_ctx=256, model_kwargs={"n_ctx": 512})
    flash = LlamaCpp(model_path=path, n_ctx=256, model_kwargs={"flash_attn": True})
    plain = LlamaCpp(model_path=path, n_ctx=256)
    assert flash._identifying_params != plain._identifying_params


def test_streaming_false_sends_the_answer_at_its_end(model_path):
    llm = LlamaCpp(model_path=str(model_path("tiny-gguf")), n_ctx=256, streaming=False, **GREEDY)
    rec = Recorder()
    answer = llm.invoke(PROMPT, config={"callbacks": [rec]})
    assert rec.tokens == []
    assert len(rec.ends) == 1
    assert "".join(llm.stream(PROMPT)) == answer


async def test_a_cancelled_call_stops_within_one_step_and_frees_the_model(model_path):
    llm = LlamaCpp(model_path=str(model_path("gemma-gguf")), n_ctx=2048, n_batch=64, **GREEDY)
    expected = llm.invoke(PROMPT)
    evaluated: list[int] = []
    real = llm.client.eval
    llm.client.eval = lambda tokens: (evaluated.append(len(tokens)), real(tokens))[1]
    prompt = "one two three four " * 450  # ~1,800 tokens: a few seconds of prefill here
    total = llm.get_num_tokens(prompt)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(llm.ainvoke(prompt), 0.2)
    # the prompt was left part-way, and the model is free again at once
    assert sum(evaluated) < total
    assert not native_thread("llamacpp").busy
    assert await llm.ainvoke(PROMPT) == expected  # nothing of the cut prompt is reused


# ----------------------------------------------------------- context that fits the model
LONG = "The quick brown fox jumps over the lazy dog. " * 300  # ~3,000 tokens


def test_n_ctx_auto_takes_the_trained_context_and_fits_a_long_prompt(model_path):
    path = str(model_path("gemma-gguf"))
    small = LlamaCpp(model_path=path, max_tokens=4, temperature=0)
    with pytest.raises(ContextOverflowError, match="n_ctx") as overflow:
        small.invoke(LONG)
    assert overflow.value.context == 2048
    assert overflow.value.prompt_tokens > 2048
    small.close()
    with LlamaCpp(model_path=path, n_ctx="auto", max_tokens=4, temperature=0) as auto:
        assert auto.model_info().context_length == 32_768  # gemma3.context_length
        assert auto.invoke(LONG)


def test_n_ctx_auto_is_capped_by_the_memory_available(model_path, monkeypatch):
    from langchain_localllms.engines import gguf as runtime

    # Gemma-3-270M's KV cache: 18 layers x 1 KV head x (256 + 256) x 2 bytes = 18 KiB a token.
    monkeypatch.setattr(runtime, "available_memory", lambda: 200 * 2**20)
    n_ctx, why = runtime.auto_context(Path(model_path("gemma-gguf")), kv_bytes=2)
    assert n_ctx == (100 * 2**20 // (18 * 1024)) // 256 * 256  # half of it, in steps of 256
    assert "32768" in why
    assert "200 MB" in why
    with LlamaCpp(model_path=str(model_path("gemma-gguf")), n_ctx="auto", max_tokens=2) as llm:
        assert llm.model_info().context_length == n_ctx


def test_n_ctx_auto_needs_the_trained_context_in_the_file(model_path, monkeypatch):
    from langchain_localllms.engines import gguf as runtime

    monkeypatch.setattr(runtime, "gguf_metadata", lambda path: {"general.architecture": "x"})
    with pytest.raises(ValueError, match=r"x\.context_length; give n_ctx as a number"):
        LlamaCpp(model_path=str(model_path("gemma-gguf")), n_ctx="auto")


# ------------------------------------------- batches in one context, exact prefix reuse
TINY_PROMPTS = [
    "The first man on the moon was",
    "My favourite colour is",
    "Red cat and blue dog",
    "Once upon a time",
    "The capital of France is",
    "One, two, three, four,",
    "A list of fruits:",
]


def _without_timings(info):
    return {k: v for k, v in info.items() if k not in ("timings", "cached_tokens")}


@pytest.fixture(scope="module")
def tiny_batch(model_path):
    # 2 sequences at a time: a batch of 7 prompts runs through them in turn.
    return LlamaCpp(
        model_path=str(model_path("tiny-gguf")), f16_kv=False, n_ctx=1024, n_parallel=2, **GREEDY
    )


def test_a_batch_decodes_its_prompts_together_and_answers_as_single_calls(tiny_batch):
    expected = [tiny_batch.invoke(p) for p in TINY_PROMPTS]
    before = tiny_batch.engine.prefilled
    assert tiny_batch.batch(TINY_PROMPTS) == expected
    assert asyncio.run(tiny_batch.abatch(TINY_PROMPTS)) == expected
    slots = tiny_batch.engine.batch_slots  # the batch context: 2 KV streams
    assert slots.n_seq == 2
    assert tiny_batch.engine.prefilled > before  # the batch evaluated its prompts itself


def test_batch_usage_and_finish_reasons_are_those_of_single_calls(tiny_batch):
    singles = [tiny_batch.generate([p]).generations[0][0] for p in TINY_PROMPTS[:4]]
    result = tiny_batch.generate(TINY_PROMPTS[:4], max_tokens=5)
    capped = [tiny_batch.generate([p], max_tokens=5).generations[0][0] for p in TINY_PROMPTS[:4]]
    for got, want in zip(result.generations, capped, strict=True):
        assert got[0].text == want.text
        assert _without_timings(got[0].generation_info) == _without_timings(want.generation_info)
        assert got[0].generation_info["timings"]["completion_ms"] > 0
    usage = result.llm_output["token_usage"]
    assert usage["completion_tokens"] == sum(g.generation_info["completion_tokens"] for g in capped)
    full = tiny_batch.generate(TINY_PROMPTS[:4])
    assert [g[0].text for g in full.generations] == [g.text for g in singles]


def test_batch_stops_each_sequence_at_its_own_stop(tiny_batch):
    answers = [tiny_batch.invoke(p) for p in TINY_PROMPTS[:4]]
    stop = answers[0].split()[1]  # a word of the first answer; others may not hold it
    expected = [tiny_batch.generate([p], stop=[stop]).generations[0][0] for p in TINY_PROMPTS[:4]]
    got = tiny_batch.generate(TINY_PROMPTS[:4], stop=[stop]).generations
    assert [g[0].text for g in got] == [g.text for g in expected]
    assert [_without_timings(g[0].generation_info) for g in got] == [
        _without_timings(g.generation_info) for g in expected
    ]
    assert got[0][0].generation_info["stop_sequence"] == stop


def test_batch_seeds_sample_as_single_calls(tiny_batch):
    options = {"temperature": 1.0, "seed": 11, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
    expected = [tiny_batch.invoke(p, **options) for p in TINY_PROMPTS]
    assert tiny_batch.batch(TINY_PROMPTS, **options) == expected


def test_batch_grammar_constrains_every_sequence(gemma):
    # Three sequences: Gemma's decode steps then compute each row as a single call does.
    prompts = [
        'A person in JSON: {"name": "Ada", "age": 36}\nDescribe a person in JSON format:',
        "Describe a person in JSON format:",
        "A JSON object:",
    ]
    singles = [gemma.invoke(p, grammar=Person, max_tokens=48) for p in prompts]
    outs = gemma.batch(prompts, grammar=Person, max_tokens=48)
    assert outs == singles
    assert all(Person.model_validate_json(o) for o in outs)


def test_batch_gives_an_over_long_prompt_its_own_error(model_path):
    llm = LlamaCpp(model_path=str(model_path("tiny-gguf")), f16_kv=False, n_ctx=256, **GREEDY)
    long = "word " * 400
    good = TINY_PROMPTS[:3]
    outs = llm.batch([good[0], long, good[1], good[2]], return_exceptions=True)
    assert isinstance(outs[1], ContextOverflowError)
    assert outs[1].context == 256
    assert [outs[0], *outs[2:]] == [llm.invoke(p) for p in good]
    with pytest.raises(ContextOverflowError, match="larger n_ctx"):
        llm.batch([good[0], long])


def test_n_parallel_1_generates_one_prompt_at_a_time(model_path):
    llm = LlamaCpp(model_path=str(model_path("tiny-gguf")), n_ctx=256, n_parallel=1, **GREEDY)
    assert llm.batch(TINY_PROMPTS[:3]) == [llm.invoke(p) for p in TINY_PROMPTS[:3]]
    assert llm.engine.batch_slots is None  # no batch context was made


FEW_SHOT = "".join(f"Q: What is {i} plus {i + 1}? A: {2 * i + 1}.\n" for i in range(50))
QUESTIONS = [f"Q: What is {a} plus {b}? A:" for a, b in [(7, 5), (12, 30), (3, 3)]]


def test_a_shared_prefix_is_prefilled_once_and_answers_as_a_cold_call(model_path, gemma):
    # Gemma 3 has sliding-window attention: its shared prefix (~930 tokens) is longer
    # than the window (512), and is reused all the same: the prompts (~940 tokens) end
    # in the same 64 tokens of their last chunk, so their cold prefills both cut there.
    cold = LlamaCpp(model_path=str(model_path("gemma-gguf")), cache_prompt=False, **GREEDY)
    prefix_tokens = len(gemma.get_token_ids(FEW_SHOT))
    assert prefix_tokens > 768
    gemma.invoke(FEW_SHOT + QUESTIONS[0])
    for q in QUESTIONS[1:]:
        before = gemma.engine.prefilled
        gen = gemma.generate([FEW_SHOT + q]).generations[0][0]
        evaluated = gemma.engine.prefilled - before
        info = gen.generation_info
        assert info["cached_tokens"] >= prefix_tokens // 256 * 256
        assert evaluated == info["prompt_tokens"] - info["cached_tokens"]
        assert evaluated < 64 + 32  # the prefix after the cut at a multiple of 64, the question
        assert gen.text == cold.invoke(FEW_SHOT + q)
    # The same prompt again, and a conversation that grows by its own answer.
    first = gemma.invoke(FEW_SHOT + QUESTIONS[0])
    assert gemma.invoke(FEW_SHOT + QUESTIONS[0]) == first == cold.invoke(FEW_SHOT + QUESTIONS[0])
    longer = FEW_SHOT + QUESTIONS[0] + first + "\nQ: What is 8 plus 9? A:"
    gen = gemma.generate([longer]).generations[0][0]
    assert gen.generation_info["cached_tokens"] >= prefix_tokens // 256 * 256
    assert gen.text == cold.invoke(longer)
    cold.close()


def test_cache_prompt_false_prefills_every_prompt_whole(model_path):
    llm = LlamaCpp(
        model_path=str(model_path("tiny-gguf")), n_ctx=1024, cache_prompt=False, **GREEDY
    )
    few_shot = FEW_SHOT[: len(FEW_SHOT) // 2]  # ~600 tokens of the tiny model's
    llm.invoke(few_shot + QUESTIONS[0])
    before = llm.engine.prefilled
    gen = llm.generate([few_shot + QUESTIONS[1]]).generations[0][0]
    assert gen.generation_info["cached_tokens"] == 0
    assert llm.engine.prefilled - before == gen.generation_info["prompt_tokens"]


def test_a_batch_shares_its_prompts_prefix_between_sequences(tiny_batch):
    few_shot = FEW_SHOT[: len(FEW_SHOT) // 2]  # ~600 tokens of the tiny model's
    prompts = [few_shot + q for q in QUESTIONS] + [few_shot + "Q: What is 1 plus 1? A:"]
    expected = [tiny_batch.invoke(p) for p in prompts]
    result = tiny_batch.generate(prompts)
    assert [g[0].text for g in result.generations] == expected
    cached = [g[0].generation_info["cached_tokens"] for g in result.generations]
    shared = len(tiny_batch.get_token_ids(few_shot)) // 256 * 256
    assert shared >= 512
    assert all(c >= shared for c in cached[1:])  # copied or kept from another sequence


def test_exact_batches_give_each_prompt_its_single_call_answer(model_path):
    # 8 prompts, 6 sequences: two llama_decode calls a step (4 + 2), then 2 sequences.
    llm = LlamaCpp(
        model_path=str(model_path("gemma-gguf")), n_parallel=6, exact_batches=True, **GREEDY
    )
    prompts = [f"Fact number {i} about the moon is that" for i in range(8)]
    assert llm.batch(prompts) == [llm.invoke(p) for p in prompts]
    assert llm.client.model_params.use_extra_bufts is False  # weights not repacked
    assert llm._identifying_params["exact_batches"] is True  # in the cache key
    llm.close()
