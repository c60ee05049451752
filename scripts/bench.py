"""make bench: what the wrapper costs, as ratios measured in the same run.

For each runtime, in its own process (so peak RSS is its own):

* decode and prompt tokens/s through our class (default settings: a user who sets
  nothing but the model) / the raw runtime called directly, configured well;
* time to first streamed token, ours - raw;
* a batch of 16 prompts through ``batch()`` / 16 sequential ``invoke()`` (throughput);
* the same figures for ``langchain_community.llms`` where it runs offline, with the
  class's defaults and tuned like the raw runtime where it has settings for that;
* LlamaCpp: 4 threads calling one instance / the same calls serialized, and prefix reuse;
* peak RSS.

Measurements pair each wrapped run with its raw counterpart in the same repetition,
alternate their order and repeat them, with prompts new to every cache; the report gives
the median, the spread (min..max) and the number of samples of every ratio. Run:
``make bench`` (it writes docs/benchmarks.md, .json and .png) or
``python scripts/bench.py --runtime llamacpp --reps 5``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import modelkit  # noqa: E402

_HISTORY = (
    "The history of the moon landing begins with early rocket research in the twentieth century. "
)
LONG_PROMPT = (_HISTORY * 24).strip()
#: LONG_PROMPT's first half: the tiny model's tokenizer makes about 730 tokens of it.
TINY_LONG_PROMPT = (_HISTORY * 12).strip()
SHORT_PROMPT = "The first man on the moon was"
DECODE_TOKENS = 64
#: transformers decodes Gemma-3-270M (float32) at a few tokens/s here: fewer tokens.
HF_DECODE_TOKENS = 32
BATCH_SIZE = 16
#: Prompt-speed samples per repetition for the runtimes that run few repetitions.
PROMPT_PAIRS = 3
BATCH_TOKENS = 16
#: Threads calling one LlamaCpp instance at once (``lc_threads``), each making
#: ``BATCH_SIZE // LC_THREADS`` calls one after another.
LC_THREADS = 4
#: The shape of docs/benchmarks.json this script writes and ``--report-only`` reads.
REPORT_FORMAT = 2
NOTE = (
    "Peak RSS is that runtime's whole bench process: the raw runtime, our class and the community "
    "class (LlamaCpp: two instances, defaults and tuned) loaded side by side (HuggingFacePipeline: "
    "one model, shared by all). Every prompt is new to the runtime, so no prompt cache (LlamaCpp's "
    "prefix reuse, a server's) answers it: a number of its own in front, drawn anew for every call "
    "of every repetition, batch prompts included (the batched and the sequential side of a "
    "repetition each get 16 prompts of their own, of one shape). The one exception is the decode "
    "prompt, which raw, ours and the community class get alike so that they decode the same "
    "tokens; only its decode, after the first token, is timed. GPT4All keeps no prompt cache and "
    "gets its prompts without the number (the random tiny model ends some numbered prompts at "
    "once). Ours runs LlamaCpp with its defaults, cache_prompt on: it reuses a prefix shared with "
    "the previous prompt only up to a place where a cold prefill cuts the prompt too (every 256 "
    "tokens, and once more inside the last chunk of a prompt of 512 or more), and every measured "
    "prompt differs from the previous one within its first tokens, so nothing is reused outside "
    "the prefix column (a cache that reuses any shared prefix, as llama-cpp-python's Llama in the "
    "community class and in the Ollama loopback does, skips at most those first few tokens). The "
    "tuned community columns differ from the defaults only for LlamaCpp (langchain_community's "
    "LlamaCpp defaults to n_batch=8 and n_threads=None, with which llama.cpp decodes on half the "
    "CPUs; tuned: n_batch=512, n_threads and n_threads_batch = all CPUs, n_ctx=2048, as raw). "
    'Elsewhere they read "= defaults": the Llamafile and Ollama classes are clients and the server '
    "does the work, configured once for every client; CTranslate2's class builds its Generator "
    "with CTranslate2's own defaults, which raw uses too, and HuggingFacePipeline's wraps the very "
    "model raw calls (torch's threads are the process's): raw sets nothing that these classes "
    "could set otherwise. For Llamafile and Ollama, speeds are the server's; the ratios measure "
    "the client's cost per request against httpx reading the stream itself. The Ollama server is "
    "the tests' loopback one (llama-cpp-python behind Ollama's HTTP API, one request at a time, in "
    "a process of its own): no Ollama binary can be installed here. OpenVINO's prefill of one "
    "prompt length takes several times as long now and then, on either side, hence the spread of "
    "its prompt cell. The OpenVINO row runs in .venv-openvino, which has no langchain_community "
    "(its transformers pin differs); GPT4All runs the tiny Llama model (its bundled llama.cpp "
    "cannot load Gemma 3); its raw side is gpt4all's LLModel.prompt_model with every token "
    "counted, as ours counts them."
)


@dataclass
class Stream:
    """One timed generation: when the first and last pieces came, and token counts."""

    first_s: float
    total_s: float
    prompt_tokens: int
    completion_tokens: int

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.first_s

    @property
    def decode_tps(self) -> float:
        return (self.completion_tokens - 1) / (self.total_s - self.first_s)


def timed(
    pieces: Iterator[Any], prompt_tokens: int, count: Callable[[], int] | None = None
) -> Stream:
    t0 = time.perf_counter()
    first = None
    n = 0
    for _ in pieces:
        if first is None:
            first = time.perf_counter() - t0
        n += 1
    total = time.perf_counter() - t0
    return Stream(first or total, total, prompt_tokens, count() if count else n)


@dataclass
class Adapter:
    """How to run one runtime raw, through our class and through langchain_community
    (``community``: the class's defaults; ``community_tuned``: configured like raw, where
    the class has settings for it and they differ from its defaults)."""

    name: str
    raw: Callable[[str, int], Stream]
    ours: Any
    community: Any | None = None
    batch_note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    #: Tokens per decode measurement, and a cap on repetitions (slow runtimes).
    decode_tokens: int = DECODE_TOKENS
    max_reps: int | None = None
    #: The in-process runtime whose one generation thread our class uses (``_native``):
    #: raw and community runs go there too, so all sides share one OpenMP pool (a
    #: second pool in the process slows every side, which would measure the bench).
    thread: str | None = None
    community_tuned: Any | None = None

    def on_thread(self, run: Callable[[], Stream]) -> Stream:
        if self.thread is None:
            return run()
        from langchain_localllms._native import native_thread

        return native_thread(self.thread).call(run)


def ours_stream(llm: Any, prompt: str, n: int, pieces: bool = False, **kw: Any) -> Stream:
    """Time our class's stream; token counts from its own usage report (``pieces``:
    count the pieces instead, where the raw runtime can only be counted so)."""
    info: dict[str, Any] = {}
    t0 = time.perf_counter()
    first = None
    count = 0
    for chunk in llm._stream(prompt, **kw):  # the chunk carries usage
        if first is None and chunk.text:
            first = time.perf_counter() - t0
        count += bool(chunk.text)
        if chunk.generation_info:
            info = chunk.generation_info
    total = time.perf_counter() - t0
    done = count if pieces else info["completion_tokens"]
    return Stream(first or total, total, info["prompt_tokens"], done)


def community_stream(llm: Any, prompt: str, count_tokens: Callable[[str], int]) -> Stream:
    t0 = time.perf_counter()
    first = None
    text = ""
    for piece in llm.stream(prompt):
        if first is None and piece:
            first = time.perf_counter() - t0
        text += piece
    total = time.perf_counter() - t0
    return Stream(first or total, total, count_tokens(prompt), max(count_tokens(text), 2))


# ------------------------------------------------------------------ adapters
def llamacpp() -> Adapter:
    import llama_cpp

    from langchain_localllms import LlamaCpp
    from langchain_localllms._files import cpu_count

    path = str(modelkit.path("gemma-gguf"))
    threads = cpu_count()
    raw = llama_cpp.Llama(model_path=path, n_ctx=2048, n_batch=512, n_threads=threads,
                          n_threads_batch=threads, verbose=False)  # fmt: skip

    def run_raw(prompt: str, n: int) -> Stream:
        tokens = raw.tokenize(prompt.encode(), add_bos=True, special=True)
        raw.reset()
        count = 0

        def gen() -> Iterator[bytes]:
            nonlocal count
            for tok in raw.generate(
                tokens, temp=0.0, repeat_penalty=1.0, top_k=40, top_p=0.95, min_p=0.05
            ):
                if llama_cpp.llama_vocab_is_eog(raw._model.vocab, tok) or count >= n:
                    break
                count += 1
                yield raw.detokenize([tok])

        return timed(gen(), len(tokens), lambda: count)

    ours = LlamaCpp(model_path=path, temperature=0.0, repeat_penalty=1.0)
    community = tuned = None
    try:
        from langchain_community.llms import LlamaCpp as CommunityLlamaCpp

        # defaults: n_batch=8, n_threads=None (llama.cpp then decodes on half the CPUs)
        community = CommunityLlamaCpp(model_path=path, temperature=0.0, repeat_penalty=1.0,
                                      max_tokens=DECODE_TOKENS, verbose=False)  # fmt: skip
        # tuned: the raw Llama's settings
        tuned = CommunityLlamaCpp(model_path=path, temperature=0.0, repeat_penalty=1.0,
                                  max_tokens=DECODE_TOKENS, verbose=False, n_ctx=2048, n_batch=512,
                                  n_threads=threads,
                                  model_kwargs={"n_threads_batch": threads})  # fmt: skip
    except ImportError:
        pass

    def count(text: str) -> int:
        return len(raw.tokenize(text.encode(), add_bos=False, special=True))

    return Adapter("LlamaCpp", run_raw, ours, community,
                   f"the prompts decode as sequences of one llama.cpp context, "
                   f"{ours.n_parallel} at a time",
                   {"count": count, "max_kw": "max_tokens"}, thread="llamacpp",
                   community_tuned=tuned)  # fmt: skip


def gpt4all() -> Adapter:
    from langchain_localllms import GPT4All

    path = modelkit.path("tiny-gguf")
    ours = GPT4All(model=str(path), temp=0.0, n_ctx=1024)
    # The raw runtime: our class's gpt4all.GPT4All itself, loaded with all CPUs' threads
    # as raw would be: one model and one set of llama.cpp threads in the process.
    raw_model = ours.client
    engine = raw_model.model  # gpt4all's LLModel: what GPT4All.generate calls

    def run_raw(prompt: str, n: int) -> Stream:
        """gpt4all's LLModel.prompt_model, every generated token counted (its streams
        yield only complete characters: the random tiny model's bytes make few), and
        every prompt token, through the hook gpt4all calls for each (as ours counts)."""
        count = 0
        prompt_tokens = 0
        first: float | None = None
        t0 = time.perf_counter()

        def on_text(token_id: int, text: str) -> bool:
            nonlocal first
            if first is None and text:
                first = time.perf_counter() - t0
            return True

        def decoder(callback: Any) -> Any:
            decode = type(engine)._callback_decoder(engine, on_text)

            def each_token(token_id: int, response: bytes) -> bool:
                nonlocal count
                count += 1
                return bool(decode(token_id, response)) and count < n

            return each_token

        def count_prompt(token_id: int) -> bool:
            nonlocal prompt_tokens
            prompt_tokens += 1
            return True

        engine._callback_decoder = decoder
        engine._prompt_callback = count_prompt
        try:
            engine.prompt_model(prompt, "%1", on_text, n_predict=n, temp=0.0, top_k=1, n_batch=128,
                                repeat_penalty=1.18, repeat_last_n=64,
                                reset_context=True)  # fmt: skip
        finally:
            del engine._callback_decoder, engine._prompt_callback
        total = time.perf_counter() - t0
        return Stream(first or total, total, prompt_tokens, count)

    # Both sides count every generated token (ours from its usage); gpt4all starts from
    # a clean context at every call (no prompt cache), and the random tiny model ends
    # some numbered prompts at once.
    return Adapter("GPT4All (tiny model)", run_raw, ours, None, "one sequence at a time",
                   {"count": None, "max_kw": "max_tokens", "no_cache": True,
                    "long_prompt": TINY_LONG_PROMPT, "prompt_n": 1,
                    "note": "prompt speed is timed on a prompt of half the length (the tiny "
                    "model's tokenizer makes about 730 tokens of it; the whole one would not fit "
                    "its 1,024-token context), to the end of a one-token answer on each side "
                    "(the random model's first token is often no complete character, so there "
                    "is no first piece of text to time). This model's decode speed flips "
                    "between about 8,000 and 230 tokens/s from one run to the next, raw alone "
                    "too (gpt4all's bundled llama.cpp); at the fast speed a token takes 0.12 ms, "
                    "so the few µs our stream adds per token show"},
                   thread="gpt4all")  # fmt: skip


def ctranslate2() -> Adapter:
    from langchain_localllms import CTranslate2

    path = str(modelkit.path("gemma-ct2"))
    ours = CTranslate2(model_path=path, sampling_topk=1)
    # The raw runtime: our Generator itself (CTranslate2's own defaults are ours). A
    # second Generator would keep a second pool of threads that spin after each use.
    raw, tok = ours.client, ours.tokenizer

    def run_raw(prompt: str, n: int) -> Stream:
        ids = tok(prompt)["input_ids"]
        tokens = tok.convert_ids_to_tokens(ids)
        steps = raw.generate_tokens(tokens, max_length=n, sampling_topk=1, end_token=[])
        return timed(steps, len(ids))

    community = None
    try:
        from langchain_community.llms import CTranslate2 as CommunityCT2

        community = CommunityCT2(
            model_path=path, tokenizer_name=path, max_length=DECODE_TOKENS, sampling_topk=1
        )
    except ImportError:
        pass

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    return Adapter("CTranslate2", run_raw, ours, community,
                   "one generate_batch for the whole batch",
                   {"count": count, "max_kw": "max_length"})  # fmt: skip


def _http_raw(url: str, body: dict[str, Any], framing: str) -> Callable[[str, int], Stream]:
    """A raw streaming client: httpx and the server's own framing, nothing else."""
    import httpx

    client = httpx.Client(timeout=120)

    def run_raw(prompt: str, n: int) -> Stream:
        info: dict[str, Any] = {}

        def pieces() -> Iterator[str]:
            payload = {**body, "prompt": prompt}
            payload["n_predict" if framing == "sse" else "options"] = (
                n if framing == "sse" else {**body.get("options", {}), "num_predict": n}
            )
            with client.stream("POST", url, json=payload) as reply:
                for line in reply.iter_lines():
                    if framing == "sse":
                        if not line.startswith("data: "):
                            continue
                        msg = json.loads(line[6:])
                        if msg.get("stop"):
                            info["prompt"] = msg["timings"]["prompt_n"]
                            info["n"] = msg["timings"]["predicted_n"]
                            break
                        yield msg["content"]
                    elif line:
                        msg = json.loads(line)
                        if msg.get("done"):
                            info["prompt"], info["n"] = msg["prompt_eval_count"], msg["eval_count"]
                            break
                        yield msg["response"]

        stream = timed(pieces(), 0, lambda: info.get("n", 0))
        stream.prompt_tokens = info.get("prompt", 0)
        return stream

    return run_raw


#: Slots of the bench's llama-server: one per prompt of a batch, so that all of a batch
#: can decode together (the raw_batch figure measures what that gains over one request
#: after another).
SERVER_SLOTS = BATCH_SIZE


def llamafile() -> Adapter:
    import atexit

    from langchain_localllms import Llamafile
    from tests.integration_tests.servers import LlamaServer, gemma_gguf

    server = LlamaServer(gemma_gguf(), parallel=SERVER_SLOTS, ctx=512 * SERVER_SLOTS)
    atexit.register(server.stop)
    body = {"temperature": 0, "stream": True, "cache_prompt": False}
    ours = Llamafile(base_url=server.url, temperature=0, cache_prompt=False)
    community = None
    try:
        from langchain_community.llms.llamafile import Llamafile as CommunityLlamafile

        community = CommunityLlamafile(
            base_url=server.url, temperature=0, n_predict=DECODE_TOKENS, streaming=True
        )
    except ImportError:
        pass
    return Adapter(f"Llamafile (llama-server, {SERVER_SLOTS} slots)",
                   _http_raw(server.url + "/completion", body, "sse"), ours, community,
                   "requests run concurrently on the server's slots",
                   {"count": ours.get_num_tokens, "max_kw": "n_predict", "abatch": True,
                    "slots": SERVER_SLOTS})  # fmt: skip


class _Clock:
    """A transformers streamer that notes when the first new token came and counts them."""

    def __init__(self) -> None:
        self.puts = 0
        self.first: float | None = None
        self.n = 0

    def put(self, value: Any) -> None:
        self.puts += 1
        if self.puts == 1:  # generate() hands the streamer the prompt first
            return
        if self.first is None:
            self.first = time.perf_counter()
        self.n += int(value.numel())

    def end(self) -> None:
        pass


def _hf_adapter(name: str, backend: str, model_name: str) -> Adapter:
    """HuggingFacePipeline (torch or OpenVINO) against ``model.generate`` on the same weights."""
    import torch

    from langchain_localllms import HuggingFacePipeline

    path = str(modelkit.path(model_name))
    ours = HuggingFacePipeline.from_model_id(model_id=path, task="text-generation", backend=backend,
                                             pipeline_kwargs={"do_sample": False})  # fmt: skip
    model, tok = ours.model, ours.tokenizer  # the raw runtime: the very same loaded model

    def run_raw(prompt: str, n: int) -> Stream:
        inputs = tok(prompt, return_tensors="pt")
        clock = _Clock()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=n, do_sample=False, streamer=clock)
        total = time.perf_counter() - t0
        return Stream(
            (clock.first or t0 + total) - t0, total, inputs["input_ids"].shape[1], clock.n
        )

    community = None
    try:
        from langchain_community.llms import HuggingFacePipeline as CommunityHF
        from transformers import pipeline

        pipe = pipeline("text-generation", model=model, tokenizer=tok,
                        max_new_tokens=HF_DECODE_TOKENS, do_sample=False,
                        return_full_text=False)  # fmt: skip
        community = CommunityHF(pipeline=pipe)
    except ImportError:
        pass

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    return Adapter(name, run_raw, ours, community,
                   f"{ours._rows_per_generate()} prompts per left-padded generate() call "
                   "(default batch_size)",
                   {"count": count, "max_kw": "max_new_tokens"}, decode_tokens=HF_DECODE_TOKENS,
                   max_reps=3, thread="huggingface")  # fmt: skip


def huggingface() -> Adapter:
    return _hf_adapter("HuggingFacePipeline (torch)", "default", "gemma-hf")


def openvino() -> Adapter:
    adapter = _hf_adapter("HuggingFacePipeline (OpenVINO)", "openvino", "gemma-ov")
    adapter.extra["warm_shapes"] = True
    return adapter


def serve_ollama() -> None:
    """``--serve-ollama``: the tests' loopback Ollama, in its own process, until stdin closes."""
    from tests.integration_tests.servers import GEMMA, OllamaLoopback, gemma_gguf

    server = OllamaLoopback({GEMMA: gemma_gguf()})
    print(server.url, flush=True)
    sys.stdin.read()
    server.stop()


def ollama() -> Adapter:
    import atexit

    from langchain_localllms import Ollama
    from tests.integration_tests.servers import GEMMA

    proc = subprocess.Popen([sys.executable, __file__, "--serve-ollama"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    atexit.register(proc.wait)
    atexit.register(proc.stdin.close)  # type: ignore[union-attr]
    url = proc.stdout.readline().strip()  # type: ignore[union-attr]
    body = {"model": GEMMA, "stream": True, "options": {"temperature": 0}}
    ours = Ollama(model=GEMMA, base_url=url, temperature=0)
    community = None
    try:
        from langchain_community.llms import Ollama as CommunityOllama

        community = CommunityOllama(
            model=GEMMA, base_url=url, temperature=0, num_predict=DECODE_TOKENS
        )
    except ImportError:
        pass
    import llama_cpp

    vocab = llama_cpp.Llama(
        model_path=str(modelkit.path("gemma-gguf")), vocab_only=True, verbose=False
    )

    def count(text: str) -> int:
        return len(vocab.tokenize(text.encode(), add_bos=False, special=True))

    return Adapter("Ollama (loopback server, 1 slot)",
                   _http_raw(url + "/api/generate", body, "ndjson"), ours, community,
                   "the loopback server, like OLLAMA_NUM_PARALLEL=1, decodes one request at a time",
                   {"count": count, "max_kw": "num_predict", "abatch": True})  # fmt: skip


ADAPTERS: dict[str, Callable[[], Adapter]] = {
    "llamafile": llamafile,
    "ollama": ollama,
    "llamacpp": llamacpp,
    "ctranslate2": ctranslate2,
    "huggingface": huggingface,
    "openvino": openvino,
    "gpt4all": gpt4all,
}
#: Runtimes measured with another interpreter than the bench's own.
OV_PYTHON = ROOT / ".venv-openvino" / "bin" / "python"
INTERPRETERS = {"openvino": OV_PYTHON}


# ------------------------------------------------------------------ measure
def spread(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values), "min": min(values), "max": max(values),
        "n": len(values),
    }


def batch_prompts(serial: Iterator[int], numbered: bool = True) -> list[str]:
    """``BATCH_SIZE`` prompts of one shape, new to every cache: a number of its own
    in front of each (``numbered=False``: none, where the runtime keeps no cache)."""
    if not numbered:
        return [f"Fact number {i} about the moon is that" for i in range(BATCH_SIZE)]
    return [
        f"{next(serial)} is my number. Fact {i} about the moon is that" for i in range(BATCH_SIZE)
    ]


def raw_concurrency(a: Adapter, slots: int, rep: int, prompts: Callable[[], list[str]]) -> float:
    """16 fresh prompts sent raw, ``slots`` at a time, against 16 other fresh ones one
    after another (which goes first alternates with ``rep``), as wall time sequential /
    concurrent: the server's own ceiling for what batching can gain."""

    def sequential() -> float:
        batch = prompts()
        t0 = time.perf_counter()
        for p in batch:
            a.raw(p, BATCH_TOKENS)
        return time.perf_counter() - t0

    def concurrent() -> float:
        batch = prompts()
        with ThreadPoolExecutor(slots) as pool:
            t0 = time.perf_counter()
            list(pool.map(lambda p: a.raw(p, BATCH_TOKENS), batch))
            return time.perf_counter() - t0

    if rep % 2 == 0:
        t_seq = sequential()
        t_conc = concurrent()
    else:
        t_conc = concurrent()
        t_seq = sequential()
    return t_seq / t_conc


#: A few-shot prefix of about 1,000 Gemma tokens, shared by two prompts in a row.
SHARED_PREFIX = "".join(f"Q: What is {i} plus {i + 1}? A: {2 * i + 1}.\n" for i in range(53))


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
    from langchain_localllms import LlamaCpp

    serial = serial if serial is not None else itertools.count(10_000)
    greedy = {"temperature": 0.0, "repeat_penalty": 1.0}
    cold_llm = LlamaCpp(model_path=llm.model_path, cache_prompt=False, **greedy)
    batcher = llm._engine._batcher

    def one(prompt: str) -> Any:
        return llm.generate([prompt], max_tokens=BATCH_TOKENS).generations[0][0]

    def throughput(run: Callable[[], list[Any]]) -> tuple[float, int]:
        """Completion tokens/s of the generations ``run`` returns, and their tokens."""
        t0 = time.perf_counter()
        gens = run()
        elapsed = time.perf_counter() - t0
        tokens = sum(g.generation_info["completion_tokens"] for g in gens)
        return tokens / elapsed, tokens

    def batched() -> tuple[float, int]:
        batch = batch_prompts(serial)
        return throughput(
            lambda: [g[0] for g in llm.generate(batch, max_tokens=BATCH_TOKENS).generations]
        )

    def sequential() -> tuple[float, int]:
        batch = batch_prompts(serial)
        return throughput(lambda: [one(p) for p in batch])

    widest: list[float] = []

    def threaded() -> tuple[float, int]:
        batch = batch_prompts(serial)
        parts = [batch[i::LC_THREADS] for i in range(LC_THREADS)]
        with ThreadPoolExecutor(LC_THREADS) as pool:
            batcher.widest = 0
            result = throughput(lambda: [g for gens in pool.map(lambda part: [one(p) for p in part],
                                                                parts)
                                         for g in gens])  # fmt: skip
        widest.append(batcher.widest)
        return result

    def kernels(rep: int, steps: int = 8) -> float:
        """llama.cpp's own gain at LC_THREADS sequences: the time of ``steps`` decode
        steps of one row per sequence, one ``llama_decode`` each / that of ``steps``
        steps of all rows in one ``llama_decode``, on the batch context (no sampling,
        no wrapper): the ceiling for what threads joining one batch can gain."""
        engine = llm._engine
        seqs = range(LC_THREADS)

        def run() -> float:
            slots = engine._slots_box[0]

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

    out: dict[str, list[float]] = {k: [] for k in ("lc_batch", "lc_threads", "lc_threads_tokens",
                                                   "lc_serial_tokens", "lc_kernel", "lc_prefix",
                                                   "lc_prefix_cached")}  # fmt: skip
    same = 0
    for rep in range(reps):
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
        out["lc_kernel"].append(kernels(rep))
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
        same += warm.text == cold_llm.invoke(question, max_tokens=8)
    # Agreement (not timed): the greedy answers of one batch of 16 against each
    # prompt's single call, on repacked weights (the default) and with exact_batches.
    agree = {}
    exact_llm = LlamaCpp(model_path=llm.model_path, exact_batches=True, **greedy)
    for key, model in (("repacked", llm), ("exact", exact_llm)):
        batch = batch_prompts(serial)
        together = model.batch(batch, max_tokens=BATCH_TOKENS)
        agree[key] = sum(
            a == model.invoke(p, max_tokens=BATCH_TOKENS)
            for a, p in zip(together, batch, strict=True)
        )
    exact_llm.close()
    cold_llm.close()
    out["lc_threads_widest"] = widest
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
    import llama_cpp
    import llama_cpp.llama_grammar as llama_grammar

    from langchain_localllms.errors import SchemaNotSupported
    from langchain_localllms.grammars import Grammar
    from langchain_localllms.grammars.guidance import Guide
    from langchain_localllms.grammars.schemas import prepare

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
        for _ in raw.create_completion(prompt, max_tokens=limit, temperature=0.0,
                                       repeat_penalty=1.0, grammar=raw_grammar, stream=True):
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
    tokenizer = llm._engine_or_fail().lltokenizer()
    suite = Path(os.environ.get("LOCALLLMS_SCHEMA_SUITE", ""))
    schemas = [c["schema"] for f in sorted(suite.glob("*.json"))
               for c in json.loads(f.read_text())] if suite.is_dir() else [LONG_KEYS]  # fmt: skip
    compile_ms, raw_ms = [], []
    vocab = llm._engine_or_fail().llm._model.vocab
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
    return {**{k: spread(v) for k, v in out.items()}, "so_compile_ms": spread(compile_ms),
            "so_raw_compile_ms": spread(raw_ms)}  # fmt: skip


def measure(name: str, reps: int) -> dict[str, Any]:
    a = ADAPTERS[name]()
    reps = min(reps, a.max_reps or reps)
    n_dec = a.decode_tokens
    mk = a.extra["max_kw"]
    ratios: dict[str, list[float]] = {
        k: []
        for k in ("decode", "prompt", "ttft_ms", "batch", "abatch", "raw_batch", "c_decode",
                  "c_prompt", "c_total", "t_decode", "t_prompt", "t_total")
    }  # fmt: skip
    abs_vals: dict[str, list[float]] = {
        k: [] for k in ("raw_decode", "raw_prompt", "ours_decode", "ours_prompt")
    }
    serial = itertools.count(100)  # shared by every prompt below: each number is drawn once
    numbered = not a.extra.get("no_cache")

    def fresh(prompt: str) -> str:
        """The prompt behind a number of its own: no server or runtime can answer it from
        a cache of an earlier request's prompt (the Ollama loopback would)."""
        return f"Note {next(serial)}: {prompt}" if numbered else prompt

    def fresh_batch() -> list[str]:
        return batch_prompts(serial, numbered)

    # warm-up: load pages, fill caches, and let each side meet both prompt shapes once
    # (OpenVINO prepares its kernels for a new input length at its first inference)
    pieces = bool(a.extra.get("pieces"))
    long_prompt = a.extra.get("long_prompt", LONG_PROMPT)
    #: Tokens each side generates in a prompt-speed sample (its prefill is timed to the
    #: first piece, or to the end where no piece has text).
    prompt_n = a.extra.get("prompt_n", 4)
    for warm in (SHORT_PROMPT, long_prompt):
        a.on_thread(lambda: a.raw(fresh(warm), 8))  # noqa: B023 - called at once
        ours_stream(a.ours, fresh(warm), 8, **{mk: 8})

    def pair(
        prompts: tuple[str, str], n: int, raw_first: bool, count_pieces: bool = False
    ) -> tuple[Stream, Stream]:
        """One raw and one wrapped run (prompts: raw's, ours), in the order asked."""
        if a.extra.get("warm_shapes"):
            # OpenVINO prepares kernels at the first inference of each input length:
            # an untimed one-token run of each prompt (no prompt cache here) lets
            # neither side pay that for the other.
            for warm in prompts:
                a.on_thread(lambda: a.raw(warm, 1))  # noqa: B023 - called at once
        runs = [
            lambda: a.on_thread(lambda: a.raw(prompts[0], n)),
            lambda: ours_stream(a.ours, prompts[1], n, count_pieces, **{mk: n}),
        ]
        if raw_first:
            return runs[0](), runs[1]()
        o = runs[1]()
        return runs[0](), o

    #: The community classes measured, by the prefix of their ratios' keys.
    communities = [
        (key, llm)
        for key, llm in (("c_", a.community), ("t_", a.community_tuned))
        if llm is not None
    ]

    def community(key: str, llm: Any, same: str, r_long: Stream, r_dec: Stream) -> None:
        """A community class's runs against this repetition's raw ones (as ours is measured)."""
        count = a.extra["count"]
        prompt = fresh(long_prompt)
        c_long = a.on_thread(lambda: community_stream(llm, prompt, count))
        c_dec = a.on_thread(lambda: community_stream(llm, same, count))
        if c_dec.total_s - c_dec.first_s > 1e-3:  # it streamed: phases can be told apart
            ratios[key + "prompt"].append(c_long.prompt_tps / r_long.prompt_tps)
            ratios[key + "decode"].append(c_dec.decode_tps / r_dec.decode_tps)
        else:  # no streaming: compare whole-answer throughput instead
            ratios[key + "total"].append(
                (c_dec.completion_tokens / c_dec.total_s)
                / (r_dec.completion_tokens / r_dec.total_s)
            )

    for rep in range(reps):
        first = rep % 2 == 0  # which side goes first alternates: a drift of the machine cancels
        # prompt speed: a long prompt, new to each side. Runtimes with few repetitions
        # take PROMPT_PAIRS prompt samples in each (a prefill is cheap, and OpenVINO's
        # prefill times spike on either side).
        for k in range(PROMPT_PAIRS if a.max_reps else 1):
            r_long, o_long = pair(
                (fresh(long_prompt), fresh(long_prompt)), prompt_n, first != bool(k % 2)
            )
            ratios["prompt"].append(o_long.prompt_tps / r_long.prompt_tps)
            abs_vals["raw_prompt"].append(r_long.prompt_tps)
            abs_vals["ours_prompt"].append(o_long.prompt_tps)
        # first token: a short prompt, new to each side
        r_first, o_first = pair((fresh(SHORT_PROMPT), fresh(SHORT_PROMPT)), 2, first)
        ratios["ttft_ms"].append((o_first.first_s - r_first.first_s) * 1e3)
        # decode speed: the same prompt on both sides, so both decode the same tokens
        same = fresh(SHORT_PROMPT)
        r_dec, o_dec = pair((same, same), n_dec, first, pieces)
        ratios["decode"].append(o_dec.decode_tps / r_dec.decode_tps)
        abs_vals["raw_decode"].append(r_dec.decode_tps)
        abs_vals["ours_decode"].append(o_dec.decode_tps)
        for key, llm in communities if first else communities[::-1]:
            community(key, llm, same, r_long, r_dec)

    # batch: wall time of 16 sequential invokes / one batch (abatch), each side with 16
    # fresh prompts of its own per repetition; the order rotates between repetitions
    def sequential() -> float:
        batch = fresh_batch()
        t0 = time.perf_counter()
        for p in batch:
            a.ours.invoke(p, **{mk: BATCH_TOKENS})
        return time.perf_counter() - t0

    def batched() -> float:
        batch = fresh_batch()
        t0 = time.perf_counter()
        a.ours.batch(batch, **{mk: BATCH_TOKENS})
        return time.perf_counter() - t0

    def abatched() -> float:
        batch = fresh_batch()
        t0 = time.perf_counter()
        asyncio.run(a.ours.abatch(batch, **{mk: BATCH_TOKENS}))
        return time.perf_counter() - t0

    sides: dict[str, Callable[[], float]] = {"batch": batched, "sequential": sequential}
    if a.extra.get("abatch"):
        sides["abatch"] = abatched
    order = list(sides)
    for rep in range(reps):
        k = rep % len(order)
        took = {side: sides[side]() for side in order[k:] + order[:k]}
        ratios["batch"].append(took["sequential"] / took["batch"])
        if "abatch" in took:
            ratios["abatch"].append(took["sequential"] / took["abatch"])
        if a.extra.get("slots"):
            ratios["raw_batch"].append(raw_concurrency(a, a.extra["slots"], rep, fresh_batch))
    own = (
        {**llamacpp_columns(a.ours, reps, serial), **structured_columns(a.ours, reps, serial)}
        if name == "llamacpp"
        else {}
    )
    return {
        "runtime": a.name,
        "ratios": {k: spread(v) for k, v in ratios.items() if v},
        "own": own,
        "absolute": {k: spread(v) for k, v in abs_vals.items() if v},
        "batch_note": a.batch_note,
        "note": a.extra.get("note", ""),
        "community": a.community is not None,
        "community_tuned": a.community_tuned is not None,
        "reps": reps,
        "decode_tokens": n_dec,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "versions": versions(),
    }


DISTS = ("langchain-core", "llama-cpp-python", "ctranslate2", "transformers", "torch",
         "optimum-intel", "openvino", "gpt4all", "langchain-community")  # fmt: skip


def versions() -> dict[str, str]:
    """Versions of the packages measured, as installed in this process's environment."""
    import importlib.metadata as md

    found = {}
    for dist in DISTS:
        with contextlib.suppress(md.PackageNotFoundError):
            found[dist] = md.version(dist)
    return found


def wrapper_cost(pieces: int = 20_000) -> dict[str, float]:
    """Microseconds our shared streaming loop adds per piece, on a runtime that costs
    nothing: what no machine noise hides (a decode step here takes 10 to 200 ms).

    ``loop``: ``_stream`` (stop handling, usage, chunks); ``stream``: LangChain's
    ``stream()`` around it, with its callback manager.
    """
    from langchain_localllms._base import LocalLLM

    class Instant(LocalLLM):
        @property
        def _llm_type(self) -> str:
            return "instant"

        def _pieces(self, prompt: str, call: Any, tally: Any) -> Iterator[str]:
            for _ in range(pieces):
                tally.completion_tokens += 1
                yield " x"

    llm = Instant()

    def per_piece(run: Callable[[], Any]) -> float:
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) / pieces * 1e6)
        return statistics.median(times)

    bare = per_piece(lambda: sum(1 for _ in llm._pieces("p", None, _Counter())))
    loop = per_piece(lambda: sum(1 for _ in llm._stream("p")))
    stream = per_piece(lambda: sum(1 for _ in llm.stream("p")))
    return {"loop": loop - bare, "stream": stream - bare}


class _Counter:
    completion_tokens = 0


def import_time(reps: int = 5) -> dict[str, float]:
    times = []
    code = (
        "import time; t=time.perf_counter(); import langchain_localllms; "
        "print(time.perf_counter()-t)"
    )
    for _ in range(reps):
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        times.append(float(out.stdout) * 1e3)
    return spread(times)


# ------------------------------------------------------------------ report
def fmt(s: dict[str, float] | None, unit: str = "x", digits: int = 2) -> str:
    """A summary as ``median (min..max, n=samples)``; "—" where nothing was measured."""
    if not s:
        return "—"
    return (
        f"{s['median']:.{digits}f}{unit} ({s['min']:.{digits}f}..{s['max']:.{digits}f}, "
        f"n={s['n']})"
    )


def ratio(r: dict[str, Any], key: str) -> dict[str, float] | None:
    """A result's ratio as the report shows it: ``lc_*`` and ``so_*`` from LlamaCpp's own
    columns, and LlamaCpp's batch as ``lc_batch`` (tokens/s, not the generic loop's wall
    time)."""
    own = r.get("own") or {}
    if key == "batch" and own.get("lc_batch"):
        return own["lc_batch"]
    return own.get(key) if key.startswith(("lc_", "so_")) else r["ratios"].get(key)


def threads_cell(r: dict[str, Any]) -> str:
    """LlamaCpp's threads ratio, with llama.cpp's own ceiling at that many sequences."""
    threads, kernel = ratio(r, "lc_threads"), ratio(r, "lc_kernel")
    if not threads:
        return "—"
    return fmt(threads) + (f"; llama.cpp's ceiling {kernel['median']:.2f}x" if kernel else "")


def tuned_cell(r: dict[str, Any], key: str) -> str:
    """A tuned community cell: "= defaults" where the community class has nothing to tune."""
    if r["community_tuned"]:
        return fmt(r["ratios"].get(key))
    return "= defaults" if r["community"] else "—"


def write_report(results: list[dict[str, Any]], imp: dict[str, float], cost: dict[str, float],
                 reps: int, out: Path) -> None:  # fmt: skip
    envs: dict[str, list[str]] = {}  # the packages of an environment -> its runtimes
    for r in results:
        packages = ", ".join(f"{d} {v}" for d, v in sorted(r["versions"].items()))
        envs.setdefault(packages, []).append(r["runtime"])
    versions = [f"for {', '.join(who)}: {packages}" for packages, who in envs.items()]
    lines = [
        "# Benchmarks",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} by `make bench` on {platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}; {'; '.join(versions)}.",
        *[f"The {r['runtime']} row was measured again on its own at {r['again']} "
          "(`scripts/bench.py --only ... --update`), after a change to that runtime's class; "
          "the others come from the run above." for r in results if "again" in r],
        f"Each cell: median (min..max, n = samples) over one run of {reps} repetitions "
        "(fewer where "
        "said below). Each sample pairs a wrapped run with its raw counterpart in the same "
        "repetition (a batch with its sequential calls, threaded calls with serialized ones, a "
        "warm prefix with a cold one), the order alternating between repetitions. "
        "Ours uses each class's default settings (only the model and greedy sampling "
        "set); raw is the runtime called directly and configured well (all CPUs, "
        "large batch); in-process runtimes run raw and community calls on the one thread our "
        "class generates on, as a process that uses llama.cpp or torch from one thread does. "
        "Community (defaults): the langchain_community class with only the model path, greedy "
        "sampling and max tokens set, as a user gets it; community (tuned): configured like raw "
        "where the class has settings for it (\"= defaults\" where nothing differs, see below). "
        "batch16 / abatch16 / 16 sequential: wall time of 16 sequential `invoke()` calls / one "
        "`batch()` (`abatch()`) of 16 other prompts; for LlamaCpp (marked tokens/s), completion "
        "tokens/s of one `generate()` of 16 prompts / that of 16 `generate()` calls one after "
        "another, so different answer lengths do not bias it. threads4 / serialized (LlamaCpp): "
        f"completion tokens/s of {BATCH_SIZE} calls from {LC_THREADS} threads at once on one "
        "instance / that of as many calls one after another from one thread (above 1 is a gain). "
        "prefix reuse: prefill time (to the first token) of a prompt whose ~1,000-token prefix "
        "the previous call had / that cold call's (below 1 is a gain). "
        "structured / free: completion tokens/s of an answer constrained by a JSON schema "
        "with long fixed keys / that of a free answer of the same prompt, ours (see below); "
        "schema compile: the median time to compile one JSON schema for the model's "
        "vocabulary. "
        "Targets: decode >= 0.98x, prompt >= 0.95x, first-token overhead <= 5 ms; "
        "a batch of 16 >= 4x 16 sequential invokes on CTranslate2, >= 2x on HuggingFacePipeline, "
        "and abatch >= 2x on a server with parallel slots.",
        "",
        "| runtime | decode ours/raw | prompt ours/raw | first token ours-raw "
        "| batch16 / 16 sequential "
        "| abatch16 / 16 sequential | threads4 / serialized | prefix reuse: prefill warm/cold "
        "| community decode/raw (defaults) | community prompt/raw (defaults) "
        "| community decode/raw (tuned) | community prompt/raw (tuned) "
        "| structured / free decode | schema compile | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        q = r["ratios"]
        batch = fmt(ratio(r, "batch")) + (" tokens/s" if ratio(r, "lc_batch") else "")
        lines.append(
            f"| {r['runtime']} | {fmt(q.get('decode'))} | {fmt(q.get('prompt'))} | "
            f"{fmt(q.get('ttft_ms'), ' ms', 1)} | {batch} | {fmt(q.get('abatch'))} | "
            f"{threads_cell(r)} | {fmt(ratio(r, 'lc_prefix'))} | "
            f"{fmt(q.get('c_decode'))} | {fmt(q.get('c_prompt'))} | {tuned_cell(r, 't_decode')} | "
            f"{tuned_cell(r, 't_prompt')} | {fmt(ratio(r, 'so_decode'))} | "
            f"{fmt(ratio(r, 'so_compile_ms'), ' ms', 1)} | {r['peak_rss_mb']:.0f} MB |"
        )
    for r in results:
        if r["ratios"].get("raw_batch"):
            lines.append(f"\n{r['runtime']}: the 16 prompts sent raw (httpx), as many at a time as "
                         "the server has slots, against 16 others one after another (wall time): "
                         f"{fmt(r['ratios']['raw_batch'])} "
                         "— the server's own ceiling for what a batch can gain.")  # fmt: skip
        if r.get("note"):
            lines.append(f"\n{r['runtime']}: {r['note']}.")
        if r["reps"] != reps:
            lines.append(f"\n{r['runtime']}: {r['reps']} repetitions and "
                         f"{r['decode_tokens']}-token decodes "
                         "(it decodes this model at a few tokens/s here), "
                         f"{PROMPT_PAIRS} prompt-speed "
                         "samples in each repetition.")  # fmt: skip
    for r in results:
        own = r.get("own") or {}
        if own.get("so_decode"):
            lines.append(
                f"\n{r['runtime']}, structured output (a JSON schema of five fields with long "
                "fixed keys, llguidance's token mask; each sample against the free answer of "
                f"the same prompt): {fmt(own['so_decode'])} the completion tokens/s of the free "
                f"answer ({fmt(own['so_ours'], '', 1)} against {fmt(own['so_free'], '', 1)} "
                f"tokens/s); {fmt(own['so_raw'])} that of raw llama-cpp-python constrained by "
                "its own converter's grammar. What the schema fixes (keys, punctuation) is "
                "fast-forwarded: taken from llguidance, not sampled, and decoded with the "
                "sampled token in one `llama_decode`. Compiling one schema of the JSON Schema "
                "Test Suite (those llguidance enforces) takes "
                f"{fmt(own['so_compile_ms'], ' ms', 1)}; llama-cpp-python's converter and "
                "llama.cpp's parser, on the schemas they take, "
                f"{fmt(own['so_raw_compile_ms'], ' ms', 1)}."
            )
        if own.get("lc_batch"):
            same = own["lc_prefix_same"]
            lines.append(
                f"\n{r['runtime']}, in-process batching, threads and prefix reuse (each sample "
                "against its counterpart in the same repetition, prompts new to every cache): "
                f"a batch of 16 decodes {fmt(own['lc_batch'])} the tokens/s of 16 sequential "
                f"calls; {LC_THREADS} threads calling the one instance at once "
                f"({BATCH_SIZE // LC_THREADS} calls each, one after another) decode "
                f"{fmt(own['lc_threads'])} the tokens/s of {BATCH_SIZE} calls one after another "
                f"(completion tokens per side: {fmt(own['lc_threads_tokens'], '', 0)} threaded, "
                f"{fmt(own['lc_serial_tokens'], '', 0)} serialized; at most "
                f"{own['lc_threads_widest']['max']:.0f} sequences of the threaded runs ran in the "
                "batch at once; "
                f"llama.cpp's own gain at {LC_THREADS} sequences, the ceiling for this figure, is "
                f"{fmt(own['lc_kernel'])}: {LC_THREADS} one-row `llama_decode` calls per step / "
                "one "
                f"{LC_THREADS}-row call, on the batch context, without sampling or wrapper); "
                "a prompt whose ~1,000-token prefix the previous call had takes "
                f"{fmt(own['lc_prefix'])} of that cold call's prefill time (to the first "
                f"token), {fmt(own['lc_prefix_cached'], '', 2)} of its tokens from the cache; "
                f"its answer equals a cold instance's in {same['same']} of {same['n']}. "
                f"Greedy answers ({BATCH_TOKENS} tokens) of one batch of {own['lc_agree']['n']} "
                f"prompts equal their single calls' in {own['lc_agree']['repacked']} of "
                f"{own['lc_agree']['n']} with the default (repacked weights, all sequences in one "
                f"`llama_decode`), and in {own['lc_agree']['exact']} of {own['lc_agree']['n']} "
                "with `exact_batches=True`."
            )
    for r in results:
        for key, which in (("c_total", "defaults"), ("t_total", "tuned")):
            if r["ratios"].get(key):
                lines.append(f"\n{r['runtime']}: langchain_community's class ({which}) cannot "
                             "stream, so its whole-answer throughput / raw is given instead: "
                             f"{fmt(r['ratios'][key])}.")  # fmt: skip
    lines += ["", NOTE]
    lines += ["", "Absolute speeds (tokens/s, median):", ""]
    for r in results:
        ab = r["absolute"]
        parts = [f"{k.replace('_', ' ')} {v['median']:.1f}" for k, v in ab.items()]
        lines.append(f"- {r['runtime']}: {', '.join(parts)}. Batching: {r['batch_note']}.")
    fastest = max(results, key=lambda r: r["absolute"]["raw_decode"]["median"])
    shortest = 1e3 / fastest["absolute"]["raw_decode"]["median"]
    share = cost["stream"] / 1e3 / shortest * 100
    lines += ["", f"`import langchain_localllms` (no runtime imported): {fmt(imp, ' ms', 1)}.", "",
              f"The wrapper's own cost per streamed piece, on a runtime that costs nothing: "
              f"{cost['loop']:.1f} µs in our streaming loop (stops, usage, chunks), "
              f"{cost['stream']:.1f} µs through LangChain's `stream()` with its callback "
              f"manager: {share:.2f}% of the shortest decode step measured above "
              f"({shortest:.1f} ms, {fastest['runtime']}). The spread of the ratios (and of "
              "first-token times, tens of ms) is this shared 2-core machine's; from one full "
              "run to the next, the medians moved by up to 10% either way.", "",
              "![benchmarks](benchmarks.png)", ""]  # fmt: skip
    out.write_text("\n".join(lines))


def plot(results: list[dict[str, Any]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("Speed relative to the raw runtime", "speed / raw runtime",
         [("decode", "decode ours/raw"), ("prompt", "prompt ours/raw"),
          ("c_decode", "community decode/raw (defaults)"),
          ("c_prompt", "community prompt/raw (defaults)"),
          ("t_decode", "community decode/raw (tuned)"),
          ("t_prompt", "community prompt/raw (tuned)")]),
        ("16 calls together against 16 one after another", "throughput / one after another",
         [("batch", "batch() (LlamaCpp: tokens/s)"), ("abatch", "abatch()"),
          ("raw_batch", "raw concurrent requests"),
          ("lc_threads", f"{LC_THREADS} threads / serialized (tokens/s)")]),
    ]  # fmt: skip
    names = [r["runtime"].replace(" (", "\n(") for r in results]
    fig, axes = plt.subplots(2, 1, figsize=(11, 8))
    for ax, (title, ylabel, keys) in zip(axes, panels, strict=True):
        width = 0.8 / len(keys)
        for i, (k, label) in enumerate(keys):
            xs, ys, lo, hi = [], [], [], []
            for j, r in enumerate(results):
                s = ratio(r, k)
                if s:
                    xs.append(j + i * width)
                    ys.append(s["median"])
                    lo.append(s["median"] - s["min"])
                    hi.append(s["max"] - s["median"])
            if xs:
                ax.bar(xs, ys, width, yerr=[lo, hi], label=label, capsize=3)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(results))], names, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} (median, min..max)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)


def run_one(name: str, reps: int) -> dict[str, Any] | None:
    """Measure one runtime in its own process (its own interpreter where it needs one)."""
    python = INTERPRETERS.get(name, Path(sys.executable))
    if not python.exists():
        print(
            f"[bench] {name}: {python} is missing (make openvino-env); not measured",
            file=sys.stderr,
        )
        return None
    t0 = time.perf_counter()
    proc = subprocess.run([str(python), __file__, "--runtime", name, "--reps", str(reps)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        msg = f"bench of {name} failed (exit {proc.returncode})"
        raise RuntimeError(msg)
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    q, own = result["ratios"], result.get("own") or {}
    lc = (f", threads {fmt(own.get('lc_threads'))} "
          f"(at most {own['lc_threads_widest']['max']:.0f} in the batch), "
          f"prefix warm/cold {fmt(own.get('lc_prefix'))}") if own else ""  # fmt: skip
    print(f"[bench] {result['runtime']} ({time.perf_counter() - t0:.0f} s): "
          f"decode {fmt(q.get('decode'))}, "
          f"prompt {fmt(q.get('prompt'))}, first token {fmt(q.get('ttft_ms'), ' ms', 1)}, "
          f"batch {fmt(ratio(result, 'batch'))}, abatch {fmt(q.get('abatch'))}, "
          f"raw batch {fmt(q.get('raw_batch'))}{lc}, "
          f"community decode {fmt(q.get('c_decode'))} prompt {fmt(q.get('c_prompt'))} "
          f"total {fmt(q.get('c_total'))}, tuned decode {fmt(q.get('t_decode'))} "
          f"prompt {fmt(q.get('t_prompt'))} total {fmt(q.get('t_total'))}",
          file=sys.stderr)  # fmt: skip
    return result


def load_saved(path: Path) -> dict[str, Any]:
    """The last run's results for ``--report-only``; exits with a message where they are
    missing or an older bench.py wrote them in another shape."""
    if not path.exists():
        raise SystemExit(f"--report-only: {path} is missing; run `make bench` first")
    saved: dict[str, Any] = json.loads(path.read_text())
    if saved.get("format") != REPORT_FORMAT:
        raise SystemExit(f"--report-only: {path} was written by an older scripts/bench.py (format "
                         f"{saved.get('format', 1)}; this one reads format {REPORT_FORMAT}, "
                         "with sample counts, tuned community and LlamaCpp thread columns); "
                         "run `make bench` anew")  # fmt: skip
    return saved


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--runtime", choices=list(ADAPTERS),
        help="measure one runtime in this process (prints JSON)",
    )
    ap.add_argument(
        "--only", nargs="+", choices=list(ADAPTERS), help="measure these; print, write no report"
    )
    ap.add_argument("--update", action="store_true",
                    help="with --only: put their rows in place of the last run's, "
                         "and write the report")  # fmt: skip
    ap.add_argument(
        "--llamacpp-columns", action="store_true",
        help="LlamaCpp's batch, threads and prefix columns",
    )
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--serve-ollama", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--report-only", action="store_true",
                    help="write the report from the last run's benchmarks.json (measures "
                         "only the import time and the wrapper's per-piece cost anew)")  # fmt: skip
    args = ap.parse_args()
    if args.serve_ollama:
        serve_ollama()
        return 0
    if args.runtime:
        print(json.dumps(measure(args.runtime, args.reps)))
        return 0
    if args.llamacpp_columns:
        print(json.dumps(llamacpp_columns(llamacpp().ours, args.reps)))
        return 0
    t0 = time.perf_counter()
    out = Path(args.out)
    if args.report_only:
        saved = load_saved(out.with_suffix(".json"))
        results, reps = saved["results"], saved["reps"]
    else:
        if args.update and not args.only:
            ap.error("--update needs --only: the runtimes to measure again")
        results = [
            r for name in (args.only or ADAPTERS) if (r := run_one(name, args.reps)) is not None
        ]
        reps = args.reps
        if args.update:
            saved = load_saved(out.with_suffix(".json"))
            if saved["reps"] != reps:
                ap.error(f"--update: the last run had {saved['reps']} repetitions; "
                         f"pass --reps {saved['reps']}")
            stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            again = {r["runtime"]: {**r, "again": stamp} for r in results}
            results = [again.pop(r["runtime"], r) for r in saved["results"]] + list(again.values())
        elif args.only:
            return 0
        saved = {"format": REPORT_FORMAT, "results": results, "reps": reps}
        out.with_suffix(".json").write_text(json.dumps(saved, indent=1) + "\n")
    imp = import_time()
    cost = wrapper_cost()
    write_report(results, imp, cost, reps, out)
    plot(results, out.with_suffix(".png"))
    print(out.read_text())
    print(f"[bench] done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
