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

The bench is split by concern: bench_adapters.py (each runtime raw, ours, community),
bench_measure.py and bench_llamacpp_columns.py (the timing loops), bench_report.py
(docs/benchmarks.md); this file is the command line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench_adapters import ADAPTERS, INTERPRETERS, ROOT, llamacpp, serve_ollama
from bench_llamacpp_columns import llamacpp_columns
from bench_measure import import_time, measure, wrapper_cost
from bench_report import REPORT_FORMAT, fmt, load_saved, plot, ratio, write_report


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


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--runtime",
        choices=list(ADAPTERS),
        help="measure one runtime in this process (prints JSON)",
    )
    ap.add_argument(
        "--only", nargs="+", choices=list(ADAPTERS), help="measure these; print, write no report"
    )
    ap.add_argument("--update", action="store_true",
                    help="with --only: put their rows in place of the last run's, "
                         "and write the report")  # fmt: skip
    ap.add_argument(
        "--llamacpp-columns",
        action="store_true",
        help="LlamaCpp's batch, threads and prefix columns",
    )
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--serve-ollama", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--report-only", action="store_true",
                    help="write the report from the last run's benchmarks.json (measures "
                         "only the import time and the wrapper's per-piece cost anew)")  # fmt: skip
    return ap


def measured(
    args: argparse.Namespace, ap: argparse.ArgumentParser, out: Path
) -> tuple[list[dict[str, Any]], int] | None:
    """Measure the runtimes asked for (``--update``: their rows in place of the last run's)
    and save the results next to ``out``; None where ``--only`` writes no report."""
    if args.update and not args.only:
        ap.error("--update needs --only: the runtimes to measure again")
    results = [r for name in (args.only or ADAPTERS) if (r := run_one(name, args.reps)) is not None]
    reps = args.reps
    if args.update:
        saved = load_saved(out.with_suffix(".json"))
        if saved["reps"] != reps:
            ap.error(
                f"--update: the last run had {saved['reps']} repetitions; "
                f"pass --reps {saved['reps']}"
            )
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        again = {r["runtime"]: {**r, "again": stamp} for r in results}
        results = [again.pop(r["runtime"], r) for r in saved["results"]] + list(again.values())
    elif args.only:
        return None
    saved = {"format": REPORT_FORMAT, "results": results, "reps": reps}
    out.with_suffix(".json").write_text(json.dumps(saved, indent=1) + "\n")
    return results, reps


def main() -> int:
    ap = parser()
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
        done = measured(args, ap, out)
        if done is None:
            return 0
        results, reps = done
    imp = import_time()
    cost = wrapper_cost()
    write_report(results, imp, cost, reps, out)
    plot(results, out.with_suffix(".png"))
    print(out.read_text())
    print(f"[bench] done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
