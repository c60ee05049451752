"""make bench: what the wrapper costs, as ratios measured in the same run.

For each runtime, in its own process (so peak RSS is its own):

* decode and prompt tokens/s through our class (default settings: a user who sets
  nothing but the model) / the raw runtime called directly, configured well;
* time to first streamed token, ours - raw;
* a batch of 16 prompts through ``batch()`` / 16 sequential ``invoke()`` (throughput);
* the same figures for ``langchain_community.llms`` where it runs offline;
* peak RSS.

Measurements interleave raw and wrapped runs and repeat them; the report gives the
median and the spread (min..max) of every ratio. Run: ``make bench`` (it writes
docs/benchmarks.md and docs/benchmarks.png) or
``python scripts/bench.py --runtime llamacpp --reps 5``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
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

LONG_PROMPT = (
    "The history of the moon landing begins with early rocket research in the "
    "twentieth century. " * 24
).strip()
SHORT_PROMPT = "The first man on the moon was"
DECODE_TOKENS = 64
BATCH_PROMPTS = [f"Fact number {i} about the moon is that" for i in range(16)]
BATCH_TOKENS = 16
NOTE = (
    "Peak RSS is that runtime's whole bench process: the raw runtime, our class and the "
    "community class loaded side by side. Not measured here yet: HuggingFacePipeline "
    "(torch, OpenVINO) and Ollama (only a loopback server in the bench's own process is "
    "available here, which would measure itself). For Llamafile, speeds are the server's; "
    "the ratios measure the client's cost per request."
    " The community Llamafile's prompt figure reflects llama-server's prompt cache (that "
    "class cannot turn `cache_prompt` off), not client speed. CTranslate2's prompt ratio is "
    "timed to the first non-empty piece, which our detokenizer may hold back by a token."
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


def timed(pieces: Iterator[Any], prompt_tokens: int, count: Callable[[], int] | None = None) -> Stream:
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
    """How to run one runtime raw, through our class and through langchain_community."""

    name: str
    raw: Callable[[str, int], Stream]
    ours: Any
    community: Any | None = None
    batch_note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def ours_stream(llm: Any, prompt: str, n: int, **kw: Any) -> Stream:
    """Time our class's stream; token counts from its own usage report."""
    info: dict[str, Any] = {}
    t0 = time.perf_counter()
    first = None
    for chunk in llm._stream(prompt, **kw):  # noqa: SLF001 - the chunk carries usage
        if first is None and chunk.text:
            first = time.perf_counter() - t0
        if chunk.generation_info:
            info = chunk.generation_info
    total = time.perf_counter() - t0
    return Stream(first or total, total, info["prompt_tokens"], info["completion_tokens"])


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
            for tok in raw.generate(tokens, temp=0.0, repeat_penalty=1.0, top_k=40, top_p=0.95, min_p=0.05):
                if llama_cpp.llama_vocab_is_eog(raw._model.vocab, tok) or count >= n:  # noqa: SLF001
                    break
                count += 1
                yield raw.detokenize([tok])

        return timed(gen(), len(tokens), lambda: count)

    ours = LlamaCpp(model_path=path, temperature=0.0, repeat_penalty=1.0)
    community = None
    try:
        from langchain_community.llms import LlamaCpp as CommunityLlamaCpp

        community = CommunityLlamaCpp(model_path=path, temperature=0.0, repeat_penalty=1.0,
                                      max_tokens=DECODE_TOKENS, verbose=False)  # fmt: skip
    except ImportError:
        pass

    def count(text: str) -> int:
        return len(raw.tokenize(text.encode(), add_bos=False, special=True))

    return Adapter("LlamaCpp", run_raw, ours, community, "in-process llama.cpp runs one sequence at a time",
                   {"count": count, "max_kw": "max_tokens"})  # fmt: skip


def gpt4all() -> Adapter:
    from langchain_localllms import GPT4All
    from langchain_localllms._files import cpu_count

    path = modelkit.path("tiny-gguf")
    ours = GPT4All(model=str(path), temp=0.0, n_ctx=1024)
    engine = ours.client  # the raw gpt4all.GPT4All, same loaded weights
    import gpt4all as g4a

    raw_model = g4a.GPT4All(model_name=path.name, model_path=str(path.parent), allow_download=False,
                            n_threads=cpu_count(), n_ctx=1024, device="cpu")  # fmt: skip
    del engine

    def run_raw(prompt: str, n: int) -> Stream:
        return timed(raw_model.generate(prompt, max_tokens=n, temp=0.0, top_k=1, n_batch=128, streaming=True), 0)

    return Adapter("GPT4All (tiny model)", run_raw, ours, None, "one sequence at a time",
                   {"count": None, "max_kw": "max_tokens"})  # fmt: skip


def ctranslate2() -> Adapter:
    import ctranslate2 as ct2
    from transformers import AutoTokenizer

    from langchain_localllms import CTranslate2

    path = str(modelkit.path("gemma-ct2"))
    tok = AutoTokenizer.from_pretrained(path)
    raw = ct2.Generator(path, device="cpu")

    def run_raw(prompt: str, n: int) -> Stream:
        ids = tok(prompt)["input_ids"]
        tokens = tok.convert_ids_to_tokens(ids)
        steps = raw.generate_tokens(tokens, max_length=n, sampling_topk=1, end_token=[])
        return timed(steps, len(ids))

    ours = CTranslate2(model_path=path, sampling_topk=1)
    community = None
    try:
        from langchain_community.llms import CTranslate2 as CommunityCT2

        community = CommunityCT2(model_path=path, tokenizer_name=path, max_length=DECODE_TOKENS, sampling_topk=1)
    except ImportError:
        pass

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    return Adapter("CTranslate2", run_raw, ours, community, "one generate_batch for the whole batch",
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


def llamafile() -> Adapter:
    from langchain_localllms import Llamafile
    from tests.integration_tests.servers import llama_server

    server = llama_server()
    body = {"temperature": 0, "stream": True, "cache_prompt": False}
    ours = Llamafile(base_url=server.url, temperature=0, cache_prompt=False)
    community = None
    try:
        from langchain_community.llms.llamafile import Llamafile as CommunityLlamafile

        community = CommunityLlamafile(base_url=server.url, temperature=0, n_predict=DECODE_TOKENS, streaming=True)
    except ImportError:
        pass
    return Adapter("Llamafile (llama-server, 4 slots)", _http_raw(server.url + "/completion", body, "sse"),
                   ours, None if community is None else community, "requests run concurrently on the server's slots",
                   {"count": ours.get_num_tokens, "max_kw": "n_predict"})  # fmt: skip


ADAPTERS: dict[str, Callable[[], Adapter]] = {
    "llamafile": llamafile,
    "llamacpp": llamacpp,
    "ctranslate2": ctranslate2,
    "gpt4all": gpt4all,
}


# ------------------------------------------------------------------ measure
def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def measure(name: str, reps: int) -> dict[str, Any]:
    a = ADAPTERS[name]()
    mk = a.extra["max_kw"]
    ratios: dict[str, list[float]] = {
        k: [] for k in ("decode", "prompt", "ttft_ms", "batch", "c_decode", "c_prompt", "c_total")
    }
    abs_vals: dict[str, list[float]] = {k: [] for k in ("raw_decode", "raw_prompt", "ours_decode", "ours_prompt")}
    # warm-up: load pages, fill caches
    a.raw(SHORT_PROMPT, 8)
    ours_stream(a.ours, SHORT_PROMPT, 8, **{mk: 8})
    for _ in range(reps):
        r_long = a.raw(LONG_PROMPT, 4)
        o_long = ours_stream(a.ours, LONG_PROMPT, 4, **{mk: 4})
        r_dec = a.raw(SHORT_PROMPT, DECODE_TOKENS)
        o_dec = ours_stream(a.ours, SHORT_PROMPT, DECODE_TOKENS, **{mk: DECODE_TOKENS})
        if r_long.prompt_tokens:
            ratios["prompt"].append(o_long.prompt_tps / r_long.prompt_tps)
            abs_vals["raw_prompt"].append(r_long.prompt_tps)
        ratios["decode"].append(o_dec.decode_tps / r_dec.decode_tps)
        ratios["ttft_ms"].append((o_dec.first_s - r_dec.first_s) * 1e3)
        abs_vals["raw_decode"].append(r_dec.decode_tps)
        abs_vals["ours_decode"].append(o_dec.decode_tps)
        abs_vals["ours_prompt"].append(o_long.prompt_tps)
        if a.community is not None:
            count = a.extra["count"]
            c_long = community_stream(a.community, LONG_PROMPT, count)
            c_dec = community_stream(a.community, SHORT_PROMPT, count)
            if c_dec.total_s - c_dec.first_s > 1e-3:  # it streamed: phases can be told apart
                ratios["c_prompt"].append(c_long.prompt_tps / r_long.prompt_tps)
                ratios["c_decode"].append(c_dec.decode_tps / r_dec.decode_tps)
            else:  # no streaming: compare whole-answer throughput instead
                ratios["c_total"].append(
                    (c_dec.completion_tokens / c_dec.total_s) / (r_dec.completion_tokens / r_dec.total_s)
                )
    for _ in range(max(1, reps // 2)):
        t0 = time.perf_counter()
        a.ours.batch(BATCH_PROMPTS, **{mk: BATCH_TOKENS})
        t_batch = time.perf_counter() - t0
        t0 = time.perf_counter()
        for p in BATCH_PROMPTS:
            a.ours.invoke(p, **{mk: BATCH_TOKENS})
        t_seq = time.perf_counter() - t0
        ratios["batch"].append(t_seq / t_batch)
    return {
        "runtime": a.name,
        "ratios": {k: spread(v) for k, v in ratios.items() if v},
        "absolute": {k: spread(v) for k, v in abs_vals.items() if v},
        "batch_note": a.batch_note,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def import_time(reps: int = 5) -> dict[str, float]:
    times = []
    code = "import time; t=time.perf_counter(); import langchain_localllms; print(time.perf_counter()-t)"
    for _ in range(reps):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        times.append(float(out.stdout) * 1e3)
    return spread(times)


# ------------------------------------------------------------------ report
def fmt(s: dict[str, float] | None, unit: str = "x", digits: int = 2) -> str:
    if not s:
        return "—"
    return f"{s['median']:.{digits}f}{unit} ({s['min']:.{digits}f}..{s['max']:.{digits}f})"


def write_report(results: list[dict[str, Any]], imp: dict[str, float], reps: int, out: Path) -> None:
    import importlib.metadata as md

    versions = []
    for dist in ("langchain-core", "llama-cpp-python", "ctranslate2", "transformers", "torch", "gpt4all", "langchain-community"):
        try:
            versions.append(f"{dist} {md.version(dist)}")
        except md.PackageNotFoundError:
            pass
    lines = [
        "# Benchmarks",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} by `make bench` on {platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}; {', '.join(versions)}.",
        f"Each ratio: median (min..max) over {reps} interleaved repetitions in one run. "
        "Ours uses each class's default settings (only the model and greedy sampling "
        "set); raw is the runtime called directly and configured well (all CPUs, "
        "large batch). Targets: decode >= 0.98x, prompt >= 0.95x, first-token overhead <= 5 ms.",
        "",
        "| runtime | decode ours/raw | prompt ours/raw | first token ours-raw | batch16 / 16 sequential | community decode/raw | community prompt/raw | peak RSS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        q = r["ratios"]
        lines.append(
            f"| {r['runtime']} | {fmt(q.get('decode'))} | {fmt(q.get('prompt'))} | "
            f"{fmt(q.get('ttft_ms'), ' ms', 1)} | {fmt(q.get('batch'))} | {fmt(q.get('c_decode'))} | "
            f"{fmt(q.get('c_prompt'))} | {r['peak_rss_mb']:.0f} MB |"
        )
    for r in results:
        if r["ratios"].get("c_total"):
            lines.append(f"\n{r['runtime']}: langchain_community's class cannot stream, so its whole-answer "
                         f"throughput / raw is given instead: {fmt(r['ratios']['c_total'])}.")  # fmt: skip
    lines += ["", NOTE]
    lines += ["", "Absolute speeds (tokens/s, median):", ""]
    for r in results:
        ab = r["absolute"]
        parts = [f"{k.replace('_', ' ')} {v['median']:.1f}" for k, v in ab.items()]
        lines.append(f"- {r['runtime']}: {', '.join(parts)}. Batching: {r['batch_note']}.")
    lines += ["", f"`import langchain_localllms` (no runtime imported): {fmt(imp, ' ms', 1)}.", "",
              "![benchmarks](benchmarks.png)", ""]  # fmt: skip
    out.write_text("\n".join(lines))


def plot(results: list[dict[str, Any]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("decode", "decode ours/raw"), ("prompt", "prompt ours/raw"), ("c_decode", "community decode/raw"), ("c_prompt", "community prompt/raw")]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(keys)
    for i, (k, label) in enumerate(keys):
        xs, ys, lo, hi = [], [], [], []
        for j, r in enumerate(results):
            s = r["ratios"].get(k)
            if s:
                xs.append(j + i * width)
                ys.append(s["median"])
                lo.append(s["median"] - s["min"])
                hi.append(s["max"] - s["median"])
        ax.bar(xs, ys, width, yerr=[lo, hi], label=label, capsize=3)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(results))], [r["runtime"] for r in results])
    ax.set_ylabel("speed / raw runtime")
    ax.set_title("Wrapper speed relative to the raw runtime (median, min..max)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", choices=list(ADAPTERS), help="measure one runtime (prints JSON)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = ap.parse_args()
    if args.runtime:
        print(json.dumps(measure(args.runtime, args.reps)))
        return 0
    results = []
    for name in ADAPTERS:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, __file__, "--runtime", name, "--reps", str(args.reps)],
                              capture_output=True, text=True)  # fmt: skip
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        q = results[-1]["ratios"]
        print(f"[bench] {results[-1]['runtime']}: decode {fmt(q.get('decode'))}, prompt {fmt(q.get('prompt'))}, "
              f"first token {fmt(q.get('ttft_ms'), ' ms', 1)}, batch {fmt(q.get('batch'))}, "
              f"community decode {fmt(q.get('c_decode'))} prompt {fmt(q.get('c_prompt'))}", file=sys.stderr)  # fmt: skip
    imp = import_time()
    out = Path(args.out)
    write_report(results, imp, args.reps, out)
    plot(results, out.with_suffix(".png"))
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
