"""Throughput of CTranslate2 through langchain-localllms, and the wrapper's overhead.

Two comparisons on the Gemma-3-270M CTranslate2 model of the model kit, each
interleaved and repeated (``--rounds``), reported as median [min..max]:

1. ``llm.batch(16 prompts)`` (one ``generate_batch``) against 16 sequential
   ``llm.invoke()`` calls.
2. The wrapper against CTranslate2 called directly: ``llm.stream()`` against
   ``Generator.generate_tokens``, and ``llm.batch()`` against
   ``Generator.generate_batch``.

Generated tokens per wall-clock second, and per CPU-second of this process (all its
threads): on a machine shared with other work the wall clock swings with their load,
CPU time much less. Every answer is forced to ``--max-length`` tokens
(``min_length``), so each side generates exactly the same number of tokens.

    .venv/bin/python scripts/bench_ctranslate2.py [--max-length 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import modelkit
from langchain_localllms import CTranslate2

PROMPTS = [
    "The first man on the moon was",
    "My favourite colour is",
    "One, two, three, four,",
    "The capital of France is Paris. The capital of Italy is",
    "The list of top romantic songs:\n1.",
    "The list of top rap songs:\n1.",
    "Who was the US president in the year the first Pokemon game was released?",
    "A recipe for pancakes:",
    "The three laws of motion are",
    "Once upon a time, in a small village,",
    "The best way to learn a language is",
    "Photosynthesis is the process by which",
    "The tallest mountain in the world is",
    "Here is a short poem about the sea:\n",
    "The main causes of the French Revolution were",
    "def fibonacci(n):",
]


def spread(values: list[float], digits: int = 1) -> str:
    med, lo, hi = statistics.median(values), min(values), max(values)
    return f"{med:8.{digits}f} [{lo:.{digits}f}..{hi:.{digits}f}]"


def timed(fn: Callable[[], int]) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds of this process (all threads) and tokens of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    tokens = fn()
    return time.perf_counter() - w0, time.process_time() - c0, tokens


#: The ratios reported, each leg against the other of its pair.
PAIRS = {
    "batch / sequential": ("batch", "sequential"),
    "batch: wrapper / raw": ("batch", "raw_batch"),
    "stream: wrapper / raw": ("stream", "raw_stream"),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gemma-ct2")
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this file")
    return parser.parse_args()


def make_legs(llm: CTranslate2, prompts: list[str], n: int) -> dict[str, Callable[[], int]]:
    """The runs compared, each returning the tokens it generated."""
    generator, tok = llm.client, llm.tokenizer
    starts = [tok.convert_ids_to_tokens(ids) for ids in tok(prompts)["input_ids"]]
    raw_options = {
        "max_length": n,
        "min_length": n,
        "include_prompt_in_result": False,
        "end_token": llm.engine.end_ids,
    }

    def usage(result) -> int:
        return result.llm_output["token_usage"]["completion_tokens"]

    def wrapper_batch() -> int:
        return usage(llm.generate(prompts))

    def wrapper_sequential() -> int:
        return sum(usage(llm.generate([p])) for p in prompts)

    def raw_batch() -> int:
        results = generator.generate_batch(starts, **raw_options)
        return sum(len(r.sequences_ids[0]) for r in results)

    def wrapper_stream() -> int:
        # Protected _stream on purpose: stream() yields only text, without the usage.
        *_, last = llm._stream(prompts[0])  # the chunks of llm.stream(), the last with usage
        return int(last.generation_info["completion_tokens"])

    def raw_stream() -> int:
        return sum(1 for _ in generator.generate_tokens(starts[0], max_length=n, min_length=n))

    return {
        "batch": wrapper_batch,
        "sequential": wrapper_sequential,
        "raw_batch": raw_batch,
        "stream": wrapper_stream,
        "raw_stream": raw_stream,
    }


def run_rounds(
    legs: dict[str, Callable[[], int]], rounds: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Tokens per wall second and per CPU second of every leg, in every round."""
    legs["batch"]()  # warm up (allocations, caches)
    wall: dict[str, list[float]] = {k: [] for k in legs}
    cpu: dict[str, list[float]] = {k: [] for k in legs}
    for r in range(rounds):
        # Reverse the order every other round so that drift in machine load hits both
        # sides of each comparison alike.
        for name in legs if r % 2 == 0 else reversed(legs):
            seconds, cpu_seconds, tokens = timed(legs[name])
            wall[name].append(tokens / seconds)
            cpu[name].append(tokens / cpu_seconds)
            print(
                f"round {r + 1}: {name:<10} {tokens:4d} tokens in {seconds:6.2f}s "
                f"({cpu_seconds:6.2f}s CPU)",
                file=sys.stderr,
            )
    return wall, cpu


def ratios(rows: dict[str, list[float]], a: str, b: str) -> list[float]:
    return [x / y for x, y in zip(rows[a], rows[b], strict=True)]


def report(
    args: argparse.Namespace, n: int, wall: dict[str, list[float]], cpu: dict[str, list[float]]
) -> None:
    """The table on stdout, and the results as JSON where ``--json`` asks for them."""
    print(f"\n{args.model}, {args.batch} prompts x {n} tokens, {args.rounds} rounds")
    print(f"{'tokens per second':<28}{'wall, median [min..max]':>28}{'per CPU-second':>30}")
    labels = {
        "batch": f"llm.batch({args.batch})",
        "sequential": f"{args.batch} x llm.invoke()",
        "raw_batch": "Generator.generate_batch",
        "stream": "llm.stream()",
        "raw_stream": "Generator.generate_tokens",
    }
    for name, label in labels.items():
        print(f"  {label:<26}{spread(wall[name]):>28}{spread(cpu[name]):>30}")
    print("ratios (per round)")
    for label, (a, b) in PAIRS.items():
        print(f"  {label:<26}{spread(ratios(wall, a, b), 3):>28}{spread(ratios(cpu, a, b), 3):>30}")
    if args.json:
        out = {
            "model": args.model,
            "batch": args.batch,
            "max_length": n,
            "tokens_per_wall_second": wall,
            "tokens_per_cpu_second": cpu,
            "wall_ratios": {k: ratios(wall, a, b) for k, (a, b) in PAIRS.items()},
            "cpu_ratios": {k: ratios(cpu, a, b) for k, (a, b) in PAIRS.items()},
        }
        Path(args.json).write_text(json.dumps(out, indent=1))


def main() -> None:
    args = parse_args()
    n = args.max_length
    prompts = (PROMPTS * (args.batch // len(PROMPTS) + 1))[: args.batch]
    llm = CTranslate2(model_path=str(modelkit.prepare(args.model)), max_length=n, min_length=n)
    wall, cpu = run_rounds(make_legs(llm, prompts, n), args.rounds)
    report(args, n, wall, cpu)


if __name__ == "__main__":
    main()
