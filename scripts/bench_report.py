"""make bench, report: docs/benchmarks.md (and its plot) from the measured results, and
the results file docs/benchmarks.json that ``--report-only`` and ``--update`` read (see
scripts/bench.py).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from bench_adapters import BATCH_SIZE
from bench_measure import BATCH_TOKENS, LC_THREADS, PROMPT_PAIRS

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


def fmt(s: dict[str, float] | None, unit: str = "x", digits: int = 2) -> str:
    """A summary as ``median (min..max, n=samples)``; "—" where nothing was measured."""
    if not s:
        return "—"
    return (
        f"{s['median']:.{digits}f}{unit} ({s['min']:.{digits}f}..{s['max']:.{digits}f}, n={s['n']})"
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
    lines = header(results, reps)
    lines += table_rows(results)
    lines += runtime_notes(results, reps)
    lines += own_notes(results)
    lines += community_notes(results)
    lines += ["", NOTE]
    lines += ["", "Absolute speeds (tokens/s, median):", ""]
    for r in results:
        ab = r["absolute"]
        parts = [f"{k.replace('_', ' ')} {v['median']:.1f}" for k, v in ab.items()]
        lines.append(f"- {r['runtime']}: {', '.join(parts)}. Batching: {r['batch_note']}.")
    lines += closing(results, imp, cost)
    out.write_text("\n".join(lines))


def header(results: list[dict[str, Any]], reps: int) -> list[str]:
    """The title, what was measured where and with what, the legend and the table's head."""
    envs: dict[str, list[str]] = {}  # the packages of an environment -> its runtimes
    for r in results:
        packages = ", ".join(f"{d} {v}" for d, v in sorted(r["versions"].items()))
        envs.setdefault(packages, []).append(r["runtime"])
    versions = [f"for {', '.join(who)}: {packages}" for packages, who in envs.items()]
    return [
        "# Benchmarks",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} by `make bench` on {platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}; {'; '.join(versions)}.",
        *[
            f"The {r['runtime']} row was measured again on its own at {r['again']} "
            "(`scripts/bench.py --only ... --update`), after a change to that runtime's class; "
            "the others come from the run above."
            for r in results
            if "again" in r
        ],
        legend(reps),
        "",
        "| runtime | decode ours/raw | prompt ours/raw | first token ours-raw "
        "| batch16 / 16 sequential "
        "| abatch16 / 16 sequential | threads4 / serialized | prefix reuse: prefill warm/cold "
        "| community decode/raw (defaults) | community prompt/raw (defaults) "
        "| community decode/raw (tuned) | community prompt/raw (tuned) "
        "| structured / free decode | schema compile | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]


def legend(reps: int) -> str:
    """What a cell holds, how each column is measured, and the targets."""
    return (
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
        'where the class has settings for it ("= defaults" where nothing differs, see below). '
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
        "and abatch >= 2x on a server with parallel slots."
    )


def table_rows(results: list[dict[str, Any]]) -> list[str]:
    """One row of the table per runtime."""
    lines: list[str] = []
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
    return lines


def runtime_notes(results: list[dict[str, Any]], reps: int) -> list[str]:
    """A runtime's raw concurrency, its own note, and its repetitions where fewer."""
    lines: list[str] = []
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
    return lines


def own_notes(results: list[dict[str, Any]]) -> list[str]:
    """LlamaCpp's own columns: structured output; batching, threads and prefix reuse."""
    lines: list[str] = []
    for r in results:
        own = r.get("own") or {}
        if own.get("so_decode"):
            lines.append(structured_note(r, own))
        if own.get("lc_batch"):
            lines.append(llamacpp_note(r, own))
    return lines


def structured_note(r: dict[str, Any], own: dict[str, Any]) -> str:
    """The structured-output paragraph of a runtime with those columns (LlamaCpp)."""
    return (
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


def llamacpp_note(r: dict[str, Any], own: dict[str, Any]) -> str:
    """The paragraph on LlamaCpp's in-process batching, threads and prefix reuse."""
    same = own["lc_prefix_same"]
    return (
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


def community_notes(results: list[dict[str, Any]]) -> list[str]:
    """The whole-answer ratio of a community class that cannot stream."""
    lines: list[str] = []
    for r in results:
        for key, which in (("c_total", "defaults"), ("t_total", "tuned")):
            if r["ratios"].get(key):
                lines.append(f"\n{r['runtime']}: langchain_community's class ({which}) cannot "
                             "stream, so its whole-answer throughput / raw is given instead: "
                             f"{fmt(r['ratios'][key])}.")  # fmt: skip
    return lines


def closing(
    results: list[dict[str, Any]], imp: dict[str, float], cost: dict[str, float]
) -> list[str]:
    """The import time, the wrapper's own cost per piece, and the plot."""
    fastest = max(results, key=lambda r: r["absolute"]["raw_decode"]["median"])
    shortest = 1e3 / fastest["absolute"]["raw_decode"]["median"]
    share = cost["stream"] / 1e3 / shortest * 100
    return ["", f"`import langchain_localllms` (no runtime imported): {fmt(imp, ' ms', 1)}.", "",
            f"The wrapper's own cost per streamed piece, on a runtime that costs nothing: "
            f"{cost['loop']:.1f} µs in our streaming loop (stops, usage, chunks), "
            f"{cost['stream']:.1f} µs through LangChain's `stream()` with its callback "
            f"manager: {share:.2f}% of the shortest decode step measured above "
            f"({shortest:.1f} ms, {fastest['runtime']}). The spread of the ratios (and of "
            "first-token times, tens of ms) is this shared 2-core machine's; from one full "
            "run to the next, the medians moved by up to 10% either way.", "",
            "![benchmarks](benchmarks.png)", ""]  # fmt: skip


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
