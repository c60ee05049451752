"""make bench, measuring: the timing loops of every runtime's generic columns (ours and
the community classes against raw, batches), the wrapper's own cost and the import time
(see scripts/bench.py). LlamaCpp's own columns are in bench_llamacpp_columns.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench_adapters import ADAPTERS, BATCH_SIZE, LONG_PROMPT, SHORT_PROMPT, Adapter, Stream

#: Prompt-speed samples per repetition for the runtimes that run few repetitions.
PROMPT_PAIRS = 3
BATCH_TOKENS = 16
#: Threads calling one LlamaCpp instance at once (``lc_threads``), each making
#: ``BATCH_SIZE // LC_THREADS`` calls one after another.
LC_THREADS = 4


def ours_stream(llm: Any, prompt: str, n: int, pieces: bool = False, **kw: Any) -> Stream:
    """Time our class's stream; token counts from its own usage report (``pieces``:
    count the pieces instead, where the raw runtime can only be counted so)."""
    info: dict[str, Any] = {}
    t0 = time.perf_counter()
    first = None
    count = 0
    # Protected _stream on purpose: its chunks carry the usage (stream() yields only text).
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


# ------------------------------------------------------------------ measure
def spread(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
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


class Measure:
    """One runtime's generic columns, each wrapped run against its raw counterpart in the
    same repetition: ``ratios`` and ``abs_vals`` fill as the steps below run."""

    def __init__(self, name: str, reps: int) -> None:
        a = self.a = ADAPTERS[name]()
        self.reps = min(reps, a.max_reps or reps)
        self.n_dec = a.decode_tokens
        self.mk = a.extra["max_kw"]
        self.ratios: dict[str, list[float]] = {
            k: []
            for k in ("decode", "prompt", "ttft_ms", "batch", "abatch", "raw_batch", "c_decode",
                      "c_prompt", "c_total", "t_decode", "t_prompt", "t_total")
        }  # fmt: skip
        self.abs_vals: dict[str, list[float]] = {
            k: [] for k in ("raw_decode", "raw_prompt", "ours_decode", "ours_prompt")
        }
        # shared by every prompt below: each number is drawn once
        self.serial = itertools.count(100)
        self.numbered = not a.extra.get("no_cache")
        self.pieces = bool(a.extra.get("pieces"))
        self.long_prompt = a.extra.get("long_prompt", LONG_PROMPT)
        #: Tokens each side generates in a prompt-speed sample (its prefill is timed to the
        #: first piece, or to the end where no piece has text).
        self.prompt_n = a.extra.get("prompt_n", 4)
        #: The community classes measured, by the prefix of their ratios' keys.
        self.communities = [
            (key, llm)
            for key, llm in (("c_", a.community), ("t_", a.community_tuned))
            if llm is not None
        ]

    def fresh(self, prompt: str) -> str:
        """The prompt behind a number of its own: no server or runtime can answer it from
        a cache of an earlier request's prompt (the Ollama loopback would)."""
        return f"Note {next(self.serial)}: {prompt}" if self.numbered else prompt

    def fresh_batch(self) -> list[str]:
        return batch_prompts(self.serial, self.numbered)

    def warm_up(self) -> None:
        # warm-up: load pages, fill caches, and let each side meet both prompt shapes once
        # (OpenVINO prepares its kernels for a new input length at its first inference)
        a, fresh, mk = self.a, self.fresh, self.mk
        for warm in (SHORT_PROMPT, self.long_prompt):
            a.on_thread(lambda: a.raw(fresh(warm), 8))  # noqa: B023 - called at once
            ours_stream(a.ours, fresh(warm), 8, **{mk: 8})

    def pair(
        self, prompts: tuple[str, str], n: int, raw_first: bool, count_pieces: bool = False
    ) -> tuple[Stream, Stream]:
        """One raw and one wrapped run (prompts: raw's, ours), in the order asked."""
        a, mk = self.a, self.mk
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

    def community(self, key: str, llm: Any, same: str, r_long: Stream, r_dec: Stream) -> None:
        """A community class's runs against this repetition's raw ones (as ours is measured)."""
        a, ratios = self.a, self.ratios
        count = a.extra["count"]
        prompt = self.fresh(self.long_prompt)
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

    def streams(self) -> None:
        """Prompt speed, first token and decode speed of every repetition, ours and the
        community classes against raw."""
        a, fresh, ratios, abs_vals = self.a, self.fresh, self.ratios, self.abs_vals
        long_prompt, communities = self.long_prompt, self.communities
        for rep in range(self.reps):
            first = rep % 2 == 0  # which side goes first alternates: a drift of the machine cancels
            # prompt speed: a long prompt, new to each side. Runtimes with few repetitions
            # take PROMPT_PAIRS prompt samples in each (a prefill is cheap, and OpenVINO's
            # prefill times spike on either side).
            for k in range(PROMPT_PAIRS if a.max_reps else 1):
                r_long, o_long = self.pair(
                    (fresh(long_prompt), fresh(long_prompt)), self.prompt_n, first != bool(k % 2)
                )
                ratios["prompt"].append(o_long.prompt_tps / r_long.prompt_tps)
                abs_vals["raw_prompt"].append(r_long.prompt_tps)
                abs_vals["ours_prompt"].append(o_long.prompt_tps)
            # first token: a short prompt, new to each side
            r_first, o_first = self.pair((fresh(SHORT_PROMPT), fresh(SHORT_PROMPT)), 2, first)
            ratios["ttft_ms"].append((o_first.first_s - r_first.first_s) * 1e3)
            # decode speed: the same prompt on both sides, so both decode the same tokens
            same = fresh(SHORT_PROMPT)
            r_dec, o_dec = self.pair((same, same), self.n_dec, first, self.pieces)
            ratios["decode"].append(o_dec.decode_tps / r_dec.decode_tps)
            abs_vals["raw_decode"].append(r_dec.decode_tps)
            abs_vals["ours_decode"].append(o_dec.decode_tps)
            for key, llm in communities if first else communities[::-1]:
                self.community(key, llm, same, r_long, r_dec)

    # batch: wall time of 16 sequential invokes / one batch (abatch), each side with 16
    # fresh prompts of its own per repetition; the order rotates between repetitions
    def sequential(self) -> float:
        batch = self.fresh_batch()
        t0 = time.perf_counter()
        for p in batch:
            self.a.ours.invoke(p, **{self.mk: BATCH_TOKENS})
        return time.perf_counter() - t0

    def batched(self) -> float:
        batch = self.fresh_batch()
        t0 = time.perf_counter()
        self.a.ours.batch(batch, **{self.mk: BATCH_TOKENS})
        return time.perf_counter() - t0

    def abatched(self) -> float:
        batch = self.fresh_batch()
        t0 = time.perf_counter()
        asyncio.run(self.a.ours.abatch(batch, **{self.mk: BATCH_TOKENS}))
        return time.perf_counter() - t0

    def batches(self) -> None:
        """batch (and abatch) against sequential calls in every repetition, and on a server
        with slots, its raw concurrency."""
        a, ratios = self.a, self.ratios
        sides: dict[str, Callable[[], float]] = {
            "batch": self.batched,
            "sequential": self.sequential,
        }
        if a.extra.get("abatch"):
            sides["abatch"] = self.abatched
        order = list(sides)
        for rep in range(self.reps):
            k = rep % len(order)
            took = {side: sides[side]() for side in order[k:] + order[:k]}
            ratios["batch"].append(took["sequential"] / took["batch"])
            if "abatch" in took:
                ratios["abatch"].append(took["sequential"] / took["abatch"])
            if a.extra.get("slots"):
                ratios["raw_batch"].append(
                    raw_concurrency(a, a.extra["slots"], rep, self.fresh_batch)
                )


def measure(name: str, reps: int) -> dict[str, Any]:
    m = Measure(name, reps)
    a, reps = m.a, m.reps
    m.warm_up()
    m.streams()
    m.batches()
    if name == "llamacpp":
        # imported here: that module builds on this one's helpers
        from bench_llamacpp_columns import llamacpp_columns, structured_columns

        own = {
            **llamacpp_columns(a.ours, reps, m.serial),
            **structured_columns(a.ours, reps, m.serial),
        }
    else:
        own = {}
    return {
        "runtime": a.name,
        "ratios": {k: spread(v) for k, v in m.ratios.items() if v},
        "own": own,
        "absolute": {k: spread(v) for k, v in m.abs_vals.items() if v},
        "batch_note": a.batch_note,
        "note": a.extra.get("note", ""),
        "community": a.community is not None,
        "community_tuned": a.community_tuned is not None,
        "reps": reps,
        "decode_tokens": m.n_dec,
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
    # LocalLLM, the base our classes share, is exported by no public module.
    from langchain_localllms.llms._base import LocalLLM

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

    # Protected _pieces and _stream on purpose: each layer timed on its own, then stream().
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
