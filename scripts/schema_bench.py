"""JSONSchemaBench (guidance-ai/jsonschemabench) against our structured output.

Two measurements, each over the benchmark's ``data/<category>/*.json``:

* ``compile``: every schema, for every constraint engine of ``grammars.schemas``, is
  bound as ``with_structured_output`` binds it (``prepare``, strict) and, for
  llguidance, compiled for Gemma-3-270M's vocabulary. Each ends as ``compiled``,
  ``refused`` (a typed ``SchemaNotSupported``) or ``error`` (anything else: a bug).
  Compile time per schema is recorded.
* ``decode``: a seeded sample per category answered by ``ChatLlamaCpp`` on Gemma-3-270M
  (``with_structured_output(schema, include_raw=True)``); each answer is ``valid``,
  ``refused`` at bind, ``cut`` at max_tokens, or ``invalid`` (an error that names
  why; never returned as a result).

Run: ``python scripts/schema_bench.py compile --data DIR`` and ``... decode --data DIR``
(DIR: the repository's ``data`` folder). Per-schema results go to
``$LOCALLLMS_CACHE/schema_bench.json``; ``report`` prints the tables
``docs/structured_output.md`` shows.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_adapters import llama_vocab

import modelkit
from langchain_localllms.errors import SchemaNotSupported
from langchain_localllms.grammars import Grammar
from langchain_localllms.grammars.guidance import Guide
from langchain_localllms.grammars.schemas import ENGINES, prepare

#: Per-schema results (large: kept in the model cache, not in git; the docs hold tables).
OUT = Path(os.environ.get("LOCALLLMS_CACHE", Path.home() / ".cache/langchain-localllms"))
OUT = OUT / "schema_bench.json"
#: The paper's (arXiv 2501.10868) best coverage where we have its figure: GitHub-Hard,
#: Guidance 41% (llama.cpp 39%, XGrammar 28%); GlaiveAI, every engine above 86%.
PAPER_BEST = {"Github_hard": ("Guidance", 0.41), "Glaiveai2K": ("all engines above", 0.86)}


def schemas(data: Path) -> list[tuple[str, str, Any]]:
    found = []
    for category in sorted(p for p in data.iterdir() if p.is_dir()):
        for f in sorted(category.glob("*.json")):
            try:
                found.append((category.name, f.name, json.loads(f.read_text(encoding="utf-8"))))
            except ValueError:
                found.append((category.name, f.name, None))
    return found


def gemma_tokenizer() -> Any:
    import llama_cpp
    from llguidance.llamacpp import lltokenizer_from_vocab

    llm = llama_cpp.Llama(str(modelkit.path("gemma-gguf")), vocab_only=True, verbose=False)
    return llm, lltokenizer_from_vocab(llama_vocab(llm))


def compile_all(data: Path) -> dict[str, Any]:
    _, tokenizer = gemma_tokenizer()
    rows = []
    for category, name, schema in schemas(data):
        row: dict[str, Any] = {"category": category, "file": name}
        for engine in ENGINES:
            start = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    prepared = prepare(schema, engine)
                    if engine == "llguidance":
                        Guide(tokenizer, Grammar.from_json_schema(prepared))
                outcome = "compiled"
            except SchemaNotSupported as e:
                outcome = f"refused:{e.keyword or 'engine'}"
            except Exception as e:  # a bug: counted and shown, never hidden
                outcome = f"error:{type(e).__name__}:{str(e)[:80]}"
            row[engine] = outcome
            row[f"{engine}_ms"] = (time.perf_counter() - start) * 1e3
        rows.append(row)
    return {"compile": rows}


def decode_sample(data: Path, per_category: int, seed: int, max_tokens: int) -> dict[str, Any]:
    from langchain_localllms import ChatLlamaCpp

    chat = ChatLlamaCpp(
        model_path=str(modelkit.path("gemma-gguf")),
        temperature=0,
        max_tokens=max_tokens,
        n_ctx=4096,
    )
    rng = random.Random(seed)
    by_category: dict[str, list[tuple[str, Any]]] = {}
    for category, name, schema in schemas(data):
        by_category.setdefault(category, []).append((name, schema))
    rows = []
    for category, items in sorted(by_category.items()):
        for name, schema in rng.sample(items, min(per_category, len(items))):
            row: dict[str, Any] = {"category": category, "file": name}
            start = time.perf_counter()
            try:
                text = json.dumps(schema)
                prompt = f"JSON schema:\n{text[:1500]}\nA JSON value valid for it:\n"
                out = chat.with_structured_output(schema, include_raw=True).invoke(prompt)
                error = out["parsing_error"]
                if error is None:
                    row["outcome"] = "valid"
                elif "not complete JSON" in str(error):
                    row["outcome"] = "cut"
                else:
                    row["outcome"] = "invalid"
                    row["why"] = str(error)[:200]
            except SchemaNotSupported as e:
                row["outcome"] = f"refused:{e.keyword or 'engine'}"
            except Exception as e:
                row["outcome"] = "error"
                row["why"] = f"{type(e).__name__}: {e}"[:300]
                traceback.print_exc()
            row["seconds"] = time.perf_counter() - start
            print(category, name, row["outcome"], f"{row['seconds']:.1f}s", flush=True)
            rows.append(row)
    chat.close()
    return {"decode": rows, "decode_settings": {"per_category": per_category, "seed": seed,
            "max_tokens": max_tokens, "model": "Gemma-3-270M base Q4_K_M"}}  # fmt: skip


def report(results: dict[str, Any]) -> str:
    lines = []
    rows = results.get("compile", [])
    if rows:
        lines += ["| category | schemas | " + " | ".join(
            f"{e}: compiled / refused / error" for e in ENGINES) + " |",
            "|---|---:|" + "---:|" * len(ENGINES)]  # fmt: skip
        for category in sorted({r["category"] for r in rows} | {"all"}):
            part = [r for r in rows if category in ("all", r["category"])]
            cells = []
            for e in ENGINES:
                c = Counter(r[e].split(":")[0] for r in part)
                cells.append(f"{c['compiled']} / {c['refused']} / {c['error']}")
            lines.append(f"| {category} | {len(part)} | " + " | ".join(cells) + " |")
        times = [r["llguidance_ms"] for r in rows if r["llguidance"] == "compiled"]
        times.sort()
        lines += ["", f"llguidance compile time (Gemma vocabulary), {len(times)} compiled "
                  f"schemas: median {statistics.median(times):.1f} ms, p95 "
                  f"{times[int(len(times) * 0.95)]:.0f} ms, max {times[-1]:.0f} ms."]  # fmt: skip
        refused = Counter(r["llguidance"].split(":", 1)[1] for r in rows
                          if r["llguidance"].startswith("refused"))  # fmt: skip
        lines += ["", "Refused by llguidance, by keyword: " + ", ".join(
            f"`{k}` {n}" for k, n in refused.most_common(12))]  # fmt: skip
    rows = results.get("decode", [])
    if rows:
        s = results["decode_settings"]
        lines += ["", f"Decoded: {s['per_category']} schemas a category (seed {s['seed']}), "
                  f"max_tokens={s['max_tokens']}, {s['model']}, ChatLlamaCpp.", "",
                  "| category | sampled | valid | refused at bind | cut at max_tokens | "
                  "invalid (typed error) | valid of those not cut | paper's best |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
        for category in sorted({r["category"] for r in rows} | {"all"}):
            part = [r for r in rows if category in ("all", r["category"])]
            c = Counter(r["outcome"].split(":")[0] for r in part)
            answered = len(part) - c["cut"]
            share = f"{c['valid'] / answered:.0%}" if answered else "-"
            best = PAPER_BEST.get(category)
            paper = f"{best[0]} {best[1]:.0%}" if best else ""
            bad = c["invalid"] + c["error"]
            lines.append(f"| {category} | {len(part)} | {c['valid']} | {c['refused']} | "
                         f"{c['cut']} | {bad} | {share} | {paper} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["compile", "decode", "report"])
    parser.add_argument("--data", type=Path, help="jsonschemabench's data folder")
    parser.add_argument("--per-category", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    if args.what == "compile":
        results.update(compile_all(args.data))
    elif args.what == "decode":
        results.update(decode_sample(args.data, args.per_category, args.seed, args.max_tokens))
    if args.what != "report":
        OUT.write_text(json.dumps(results, indent=1) + "\n")
    print(report(results))


if __name__ == "__main__":
    main()
