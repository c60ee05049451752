"""make bench, measuring LlamaCpp's own columns: in-process batching, threads and prefix
reuse (:func:`llamacpp_columns`), and structured output (:func:`structured_columns`), each
against its counterpart in the same repetition (see scripts/bench.py).
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench_adapters import BATCH_SIZE, llama_vocab
from bench_measure import BATCH_TOKENS, LC_THREADS, batch_prompts, spread

#: A few-shot prefix of about 1,000 Gemma tokens, shared by two prompts in a row.
SHARED_PREFIX = "".join(f"Q: What is {i} plus {i + 1}? A: {2 * i + 1}.\n" for i in range(53))


class LlamaCppColumns:
    """The sides :func:`llamacpp_columns` measures, on our LlamaCpp ``llm``, with prompts
    numbered from ``serial``."""

    def __init__(self, llm: Any, serial: Iterator[int]) -> None:
        from langchain_localllms import LlamaCpp

        self.llm = llm
        self.serial = serial
        self.greedy = {"temperature": 0.0, "repeat_penalty": 1.0}
        self.cold_llm = LlamaCpp(model_path=llm.model_path, cache_prompt=False, **self.greedy)
        self.batcher = llm.engine.batcher
        self.widest: list[float] = []

    def one(self, prompt: str) -> Any:
        return self.llm.generate([prompt], max_tokens=BATCH_TOKENS).generations[0][0]

    @staticmethod
    def throughput(run: Callable[[], list[Any]]) -> tuple[float, int]:
        """Completion tokens/s of the generations ``run`` returns, and their tokens."""
        t0 = time.perf_counter()
        gens = run()
        elapsed = time.perf_counter() - t0
        tokens = sum(g.generation_info["completion_tokens"] for g in gens)
        return tokens / elapsed, tokens

    def batched(self) -> tuple[float, int]:
        batch = batch_prompts(self.serial)
        return self.throughput(
            lambda: [g[0] for g in self.llm.generate(batch, max_tokens=BATCH_TOKENS).generations]
        )

    def sequential(self) -> tuple[float, int]:
        batch = batch_prompts(self.serial)
        return self.throughput(lambda: [self.one(p) for p in batch])

    def threaded(self) -> tuple[float, int]:
        batch = batch_prompts(self.serial)
        parts = [batch[i::LC_THREADS] for i in range(LC_THREADS)]
        one, batcher = self.one, self.batcher
        with ThreadPoolExecutor(LC_THREADS) as pool:
            batcher.widest = 0
            result = self.throughput(
                lambda: [
                    g for gens in pool.map(lambda part: [one(p) for p in part], parts) for g in gens
                ]
            )
        self.widest.append(batcher.widest)
        return result

    def kernels(self, rep: int, steps: int = 8) -> float:
        """llama.cpp's own gain at LC_THREADS sequences: the time of ``steps`` decode
        steps of one row per sequence, one ``llama_decode`` each / that of ``steps``
        steps of all rows in one ``llama_decode``, on the batch context (no sampling,
        no wrapper): the ceiling for what threads joining one batch can gain."""
        engine = self.llm.engine
        seqs = range(LC_THREADS)

        def run() -> float:
            slots = engine.batch_slots

            def timed_steps(together: bool) -> float:
                for q in seqs:
                    slots.clear(q, 0)
                    slots.cached[q] = []
                t0 = time.perf_counter()
                for pos in range(steps):
                    rows = [(1000, pos, q, True) for q in seqs]
                    for part in [rows] if together else [[row] for row in rows]:
                        slots.decode(part)
                return time.perf_counter() - t0

            if rep % 2 == 0:
                one, together = timed_steps(False), timed_steps(True)
            else:
                together, one = timed_steps(True), timed_steps(False)
            for q in seqs:
                slots.clear(q, 0)
            return one / together

        return engine.shared.run(run)

    def repetition(self, rep: int, out: dict[str, list[float]]) -> bool:
        """One repetition of every side, into ``out``; whether the warm prefix's answer
        equals the cold instance's."""
        batched, sequential, threaded = self.batched, self.sequential, self.threaded
        llm, serial = self.llm, self.serial
        if rep % 2 == 0:
            (b, _), (s, _) = batched(), sequential()
        else:
            (s, _), (b, _) = sequential(), batched()
        out["lc_batch"].append(b / s)
        if rep % 2 == 0:
            (t, t_tokens), (s, s_tokens) = threaded(), sequential()
        else:
            (s, s_tokens), (t, t_tokens) = sequential(), threaded()
        out["lc_threads"].append(t / s)
        out["lc_kernel"].append(self.kernels(rep))
        out["lc_threads_tokens"].append(t_tokens)
        out["lc_serial_tokens"].append(s_tokens)
        prefix = f"{next(serial)} is my number.\n{SHARED_PREFIX}"
        question = prefix + "Q: What is 12 plus 30? A:"
        cold = llm.generate([prefix + "Q: What is 7 plus 5? A:"], max_tokens=8).generations[0][0]
        warm = llm.generate([question], max_tokens=8).generations[0][0]
        info = warm.generation_info
        out["lc_prefix"].append(
            info["timings"]["prompt_ms"] / cold.generation_info["timings"]["prompt_ms"]
        )
        out["lc_prefix_cached"].append(info["cached_tokens"] / info["prompt_tokens"])
        return bool(warm.text == self.cold_llm.invoke(question, max_tokens=8))

    def agreement(self) -> dict[str, int]:
        """How many greedy answers of one batch equal each prompt's single call."""
        from langchain_localllms import LlamaCpp

        # Agreement (not timed): the greedy answers of one batch of 16 against each
        # prompt's single call, on repacked weights (the default) and with exact_batches.
        agree = {}
        exact_llm = LlamaCpp(model_path=self.llm.model_path, exact_batches=True, **self.greedy)
        for key, model in (("repacked", self.llm), ("exact", exact_llm)):
            batch = batch_prompts(self.serial)
            together = model.batch(batch, max_tokens=BATCH_TOKENS)
            agree[key] = sum(
                a == model.invoke(p, max_tokens=BATCH_TOKENS)
                for a, p in zip(together, batch, strict=True)
            )
        exact_llm.close()
        return agree


def llamacpp_columns(llm: Any, reps: int, serial: Iterator[int] | None = None) -> dict[str, Any]:
    """LlamaCpp's in-process batching, threads and prefix reuse, each against its counterpart.

    Per repetition, with prompts no cache has seen (a number of their own first), each
    side with prompts of its own:
    ``lc_batch``: tokens/s of one ``generate`` of 16 prompts / 16 ``generate`` calls
    one after another (which goes first alternates); ``lc_threads``: tokens/s of 16
    ``generate`` calls from ``LC_THREADS`` threads at once on the one instance (each
    thread making its calls one after another) / the same number of calls one after
    another from one thread (which goes first alternates), with the completion tokens
    of each side (``lc_threads_tokens``, ``lc_serial_tokens``) and the most sequences
    that ran in the batch at once during the threaded run (``lc_threads_widest``);
    ``lc_prefix``: the prefill time (to the first token) of a prompt whose ~1,000-token
    prefix the previous call had / that previous, cold call's; ``lc_prefix_cached``: the
    share of the warm prompt's tokens that came from the cache; ``lc_prefix_same``: how
    many warm answers equal the answer of an instance that reuses nothing. ``serial``:
    the numbers to put in front of the prompts (``measure``'s, so none repeats).
    """
    serial = serial if serial is not None else itertools.count(10_000)
    sides = LlamaCppColumns(llm, serial)
    out: dict[str, list[float]] = {k: [] for k in ("lc_batch", "lc_threads", "lc_threads_tokens",
                                                   "lc_serial_tokens", "lc_kernel", "lc_prefix",
                                                   "lc_prefix_cached")}  # fmt: skip
    same = 0
    for rep in range(reps):
        same += sides.repetition(rep, out)
    agree = sides.agreement()
    sides.cold_llm.close()
    out["lc_threads_widest"] = sides.widest
    return {**{k: spread(v) for k, v in out.items()}, "lc_prefix_same": {"same": same, "n": reps},
            "lc_agree": {**agree, "n": BATCH_SIZE}}  # fmt: skip


#: A structured answer with long fixed keys: the grammar writes most of its bytes.
LONG_KEYS = {
    "type": "object",
    "properties": {
        "customer_full_name_as_written_on_the_order": {"type": "string", "maxLength": 24},
        "customer_shipping_address_first_line": {"type": "string", "maxLength": 24},
        "customer_preferred_delivery_time_window": {"enum": ["morning", "afternoon"]},
        "number_of_items_in_the_shopping_basket": {"type": "integer", "minimum": 1,
                                                   "maximum": 9},
        "customer_accepted_the_terms_of_service": {"type": "boolean"},
    },
    "required": ["customer_full_name_as_written_on_the_order",
                 "customer_shipping_address_first_line",
                 "customer_preferred_delivery_time_window",
                 "number_of_items_in_the_shopping_basket",
                 "customer_accepted_the_terms_of_service"],
    "additionalProperties": False,
}  # fmt: skip


def structured_columns(llm: Any, reps: int, serial: Iterator[int]) -> dict[str, Any]:
    """Structured output on LlamaCpp against free decoding and raw llama-cpp-python.

    ``so_decode``: completion tokens/s of an answer constrained by :data:`LONG_KEYS`
    (llguidance's mask) / that of a free answer of the same prompt, both ours;
    ``so_raw``: ours constrained / raw llama-cpp-python constrained by its own
    converter's grammar (``LlamaGrammar.from_json_schema``), same prompt and settings;
    ``so_compile_ms`` / ``so_raw_compile_ms``: the time to compile one schema of the
    JSON Schema Test Suite's enforced ones for Gemma's vocabulary (llguidance), and
    llama-cpp-python's converter plus llama.cpp's grammar parser on the same schemas.
    """
    return {**structured_decode(llm, reps, serial), **schema_compile(llm)}


def structured_decode(llm: Any, reps: int, serial: Iterator[int]) -> dict[str, Any]:
    """``so_decode``, ``so_raw``, and the rates they come from (``so_free``, ``so_ours``)."""
    import llama_cpp
    import llama_cpp.llama_grammar as llama_grammar

    raw = llama_cpp.Llama(model_path=llm.model_path, n_ctx=2048, n_batch=512,
                          n_threads=llm.n_threads, verbose=False)  # fmt: skip
    raw_grammar = llama_grammar.LlamaGrammar.from_json_schema(json.dumps(LONG_KEYS), verbose=False)
    limit = 160

    def ours(prompt: str, grammar: Any) -> float:
        info = llm.generate([prompt], max_tokens=limit, grammar=grammar).generations[0][0]
        timings = info.generation_info["timings"]
        return float(timings["completion_tokens_per_second"])

    def raw_rate(prompt: str) -> float:
        count, first = 0, None
        for _ in raw.create_completion(
            prompt,
            max_tokens=limit,
            temperature=0.0,
            repeat_penalty=1.0,
            grammar=raw_grammar,
            stream=True,
        ):
            first = first or time.perf_counter()
            count += 1
        return (count - 1) / (time.perf_counter() - first) if first and count > 1 else 0.0

    out: dict[str, list[float]] = {"so_decode": [], "so_raw": [], "so_free": [], "so_ours": []}
    for rep in range(reps):
        prompt = f"Order {next(serial)}: write the order as JSON.\n"
        sides = [("free", ours, None), ("ours", ours, LONG_KEYS), ("raw", raw_rate, None)]
        order = sides if rep % 2 == 0 else sides[::-1]
        rates = {k: f(prompt, *([g] if f is ours else [])) for k, f, g in order}
        out["so_decode"].append(rates["ours"] / rates["free"])
        out["so_raw"].append(rates["ours"] / rates["raw"])
        out["so_free"].append(rates["free"])
        out["so_ours"].append(rates["ours"])
    raw.close()
    return {k: spread(v) for k, v in out.items()}


def schema_compile(llm: Any) -> dict[str, Any]:
    """``so_compile_ms`` and ``so_raw_compile_ms``: see :func:`structured_columns`."""
    import llama_cpp
    import llama_cpp.llama_grammar as llama_grammar

    from langchain_localllms.errors import SchemaNotSupported
    from langchain_localllms.grammars import Grammar
    from langchain_localllms.grammars.guidance import Guide
    from langchain_localllms.grammars.schemas import prepare

    tokenizer = llm.engine.lltokenizer()
    # The JSON Schema Test Suite (make exports its folder), else the bench's own schema.
    suite = os.environ.get("LOCALLLMS_SCHEMA_SUITE")
    files = sorted(Path(suite).glob("*.json")) if suite and Path(suite).is_dir() else []
    schemas = [c["schema"] for f in files for c in json.loads(f.read_text())] or [LONG_KEYS]
    compile_ms, raw_ms = [], []
    vocab = llama_vocab(llm.engine.llm)
    for schema in schemas:
        try:
            prepared = prepare(schema, "llguidance", warn=False)
        except SchemaNotSupported:
            continue
        t0 = time.perf_counter()
        try:
            Guide(tokenizer, Grammar.from_json_schema(prepared))
        except SchemaNotSupported:
            continue
        compile_ms.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        try:
            gbnf = llama_grammar.json_schema_to_gbnf(json.dumps(schema))
            sampler = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
            if sampler:
                llama_cpp.llama_sampler_free(sampler)
                raw_ms.append((time.perf_counter() - t0) * 1e3)
        except Exception:
            continue
    return {"so_compile_ms": spread(compile_ms), "so_raw_compile_ms": spread(raw_ms)}
