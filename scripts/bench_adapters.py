"""make bench, adapters: how each runtime is set up and run raw, through our class and
through langchain_community's class (see scripts/bench.py).

Every raw runner returns a :class:`Stream` (when the first and last pieces came, and the
token counts); :class:`Adapter` holds one runtime's three sides. This is the one module
of the bench that reaches into the runtimes' own private attributes, each where the raw
runtime offers no public way to do what raw must do.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
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
#: The bench's entry point: the Ollama adapter starts its loopback server through it.
ENTRY = Path(__file__).resolve().with_name("bench.py")


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
        from langchain_localllms.core.threads import native_thread

        return native_thread(self.thread).call(run)


# ------------------------------------------------------------------ adapters
def llamacpp() -> Adapter:
    import llama_cpp

    from langchain_localllms import LlamaCpp
    from langchain_localllms.core.files import cpu_count

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
                # llama-cpp-python's Llama has no public accessor for the llama_vocab
                # pointer llama.cpp's C functions take: its private _model holds it.
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


def gpt4all_raw(engine: Any) -> Callable[[str, int], Stream]:
    """The raw side of GPT4All: ``run_raw`` on gpt4all's LLModel ``engine``."""

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
            # gpt4all's own decoder of token bytes into complete characters (private:
            # LLModel offers no public one), fed every token that is counted here.
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

        # LLModel has no public hook per generated token id nor per prompt token:
        # prompt_model calls these two private methods, replaced here for one call.
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

    return run_raw


def gpt4all() -> Adapter:
    from langchain_localllms import GPT4All

    path = modelkit.path("tiny-gguf")
    ours = GPT4All(model=str(path), temp=0.0, n_ctx=1024)
    # The raw runtime: our class's gpt4all.GPT4All itself, loaded with all CPUs' threads
    # as raw would be: one model and one set of llama.cpp threads in the process.
    raw_model = ours.client
    engine = raw_model.model  # gpt4all's LLModel: what GPT4All.generate calls

    run_raw = gpt4all_raw(engine)
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

    # Private, and ours: HuggingFacePipeline has no public accessor for the rows it puts in
    # one generate() call (batch_size=None picks them by device).
    return Adapter(name, run_raw, ours, community,
                   f"{ours.rows_per_generate()} prompts per left-padded generate() call "
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

    proc = subprocess.Popen([sys.executable, str(ENTRY), "--serve-ollama"], stdin=subprocess.PIPE,
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


def llama_vocab(llama: Any) -> Any:
    """The ``llama_vocab`` pointer of a ``llama_cpp.Llama``, for llama.cpp's C functions."""
    # llama-cpp-python has no public accessor for it: its private _model holds it.
    return llama._model.vocab
