"""The table of docs/reliability.md, counted from the test suite itself.

Each row names what its tests assert and selects them by node id (a regular
expression). The script collects the suite the way ``make test`` runs it (``.venv``
for everything but OpenVINO, ``.venv-openvino`` for OpenVINO) and counts the tests
each row selects. ``make test`` passes only when every one of them passes.

    python scripts/reliability_counts.py          # rewrite the table in the docs
    python scripts/reliability_counts.py --check  # exit 1 if the docs disagree

``tests/integration_tests/test_docs.py`` runs the check, so a hand-typed count fails.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"
BEGIN = "<!-- rows: written by scripts/reliability_counts.py -->"
END = "<!-- end of rows -->"
CONTRACT = r"integration_tests/test_\w+\.py::Test\w+Contract::"

#: (what the tests assert, where they are, which node ids they are)
ROWS: list[tuple[str, str, str]] = [
    (
        "Bad inputs, catalogue across runtimes (missing / directory / garbage / empty model "
        "files, unsupported architectures, out-of-range and mistyped parameters, unknown init "
        "and call arguments, prompts longer than the context, empty and non-string prompts, "
        "stops given twice / as a string / empty, GBNF syntax errors and undefined rules, "
        "grammars on a runtime that cannot take one, `callbacks` + `callback_manager`): each "
        "raises its typed error naming the problem",
        "`test_reliability.py`",
        r"test_reliability\.py::test_bad_input_gives_a_typed_error_that_names_it",
    ),
    (
        "Native failures in a child process (truncated GGUF, GGUF header then garbage, "
        "truncated GGUF in GPT4All, pathologically nested grammar): the interpreter survives "
        "and raises. Where llama.cpp accepts an input (the nested grammar), the test also "
        "accepts that it ran, and says so",
        "`test_reliability.py`",
        r"test_reliability\.py::test_native_failure_is_an_exception_not_a_crash",
    ),
    (
        "Memory: 300 `invoke`s on one `LlamaCpp` instance grow RSS by less than 30 MB",
        "`test_reliability.py`",
        r"test_reliability\.py::test_rss_stays_bounded",
    ),
    (
        "`close()` on every class: the memory of a real model goes back to the system (RSS "
        "before and after, llama.cpp, CTranslate2 and transformers), `with`/`async with`, "
        "copies closed with it, a stream running during close() finishes, a closed instance "
        "(even on a cache hit) raises `ClosedError`; CTranslate2 `unload()`",
        "`test_lifecycle.py`, `tests/integration_tests/contract.py`, `test_native.py`",
        r"(test_lifecycle\.py::|Contract::test_(close|async_with)|test_native\.py::test_close)",
    ),
    (
        "A prompt longer than the context is a typed error on every class, never a silent "
        'cut (Ollama: the server\'s own truncation detected), and `n_ctx`/`num_ctx="auto"` '
        "takes the trained context",
        "`tests/integration_tests/contract.py`, `test_llamacpp.py`, `test_ctranslate2.py`, "
        "`test_ollama.py`",
        r"(Contract::test_a_prompt_longer_than_the_context|test_n_ctx_auto|trained_context"
        r"|truncat)",
    ),
    (
        "Streams closed early or abandoned (sync and async) stop decoding and free the model",
        "`test_reliability.py`, `test_ctranslate2.py`, `test_huggingface_pipeline.py`, "
        "`tests/unit_tests/test_base.py`, `test_native.py`",
        r"^(?!.*Contract::).*(test_abandoned_|test_closing_a_stream_stops|consumer_that_stops_early"
        r"|test_closing_early_stops_decoding)",
    ),
    (
        "Cancellation: a cancelled or timed-out async call stops llama.cpp between prompt "
        "chunks, a CTranslate2 batch at its next step and a native job between its steps, and "
        "frees the model at once; a server that cannot report its slots is asked once, never "
        "from the event loop",
        "`test_llamacpp.py`, `test_ctranslate2.py`, `tests/unit_tests/test_native.py`, "
        "`test_llamafile.py`",
        r"(cancelled|gives_up|never_from_the_event_loop)",
    ),
    (
        "Batches: each prompt's tokens reach its own callback run; with "
        "`return_exceptions=True` a failing prompt (longer than any context, or a runner "
        "error) fails alone and the others are answered, native batches still batching them",
        "`contract.py` (every runtime class), `tests/unit_tests/test_runs.py`",
        r"(test_runs\.py::|Contract::test_batch_tokens_reach_their_own_runs"
        r"|Contract::test_batch_isolates_a_prompt_that_fails)",
    ),
    (
        "CTranslate2 errors: model directories, tokenizer, truncated model, `compute_type`, "
        "`device`, options it cannot honour, grammars refused, conversion inputs",
        "`test_ctranslate2.py` (integration and unit)",
        r"test_ctranslate2\.py::(test_missing_and_wrong_model_directories|test_tokenizer_must_be_found"
        r"|test_truncated_model_is_a_value_error|test_device_and_compute_type_are_checked"
        r"|test_generate_batch_options_we_do_not_take_are_refused|test_grammar_is_refused_clearly"
        r"|test_convert_refuses_bad_inputs)",
    ),
    (
        "HuggingFacePipeline errors: missing models and offline Hub ids, `device=0` without a "
        "GPU, unknown and refused options, generation-thread errors surfacing as themselves, "
        "malformed grammars, OpenVINO without its extra, `trust_remote_code` off",
        "`test_huggingface_pipeline.py` (integration and unit)",
        r"test_huggingface_pipeline\.py::(test_missing_models_fail_fast|test_gpu_style_device"
        r"|test_unknown_and_refused_options|test_generation_thread_error|test_malformed_grammars"
        r"|test_openvino_backend_without_optimum|test_remote_code_stays_off"
        r"|test_a_missing_or_file_path|test_an_uncached_hub_id|test_options_that_cannot_be_honoured)",
    ),
    (
        "OpenVINO errors: weight formats, re-export of an exported model, unknown device",
        "`test_openvino.py` (in `.venv-openvino`)",
        r"test_openvino\.py::test_bad_openvino_settings",
    ),
    (
        "Server faults, Llamafile and Ollama: not running (names the URL and how to start "
        "it), HTTP errors carry the server's message (404 says `ollama pull`), error events or "
        "lines mid-stream, a cut connection raises instead of a partial answer, timeouts name "
        "their setting, non-JSON lines, a stale pooled connection is retried once",
        "`tests/unit_tests/test_http.py`, `test_llamafile.py`, `test_ollama.py` (recorded wire "
        "bytes) and the integration tests on `llama-server` and the loopback Ollama",
        r"(test_http\.py::|test_llamafile\.py::|test_ollama\.py::)\w*(not_running|error|cut"
        r"|timeout|refuses|without_final|pooled_connection|unknown_model|wrong_server|non_json"
        r"|rejects)",
    ),
    (
        "Concurrency: 8 threads on one `CTranslate2` or `HuggingFacePipeline` give the "
        "single-threaded greedy answers; on `LlamaCpp`, calls from threads, tasks and streams "
        "read in turn join one batch, each with its own prompt's answer (with "
        "`exact_batches`: the texts, usage and finish reasons of single calls); `abatch` "
        "keeps every server slot busy and the order",
        "`test_llamacpp.py`, `test_ctranslate2.py`, `test_huggingface_pipeline.py`, "
        "`test_llamafile.py`, `test_ollama.py`",
        r"(test_threads_share_one|test_abatch_of_8|test_eight_threads|test_calls_from_threads_join"
        r"|test_concurrent_async_calls_join|test_streams_read_in_turn_decode_together"
        r"|test_a_batch_and_a_call_from_another_thread)",
    ),
    (
        "One instance, any pattern of use, on every runtime class: two streams read in turn "
        "(sync and async), a call inside a stream, a call from an `on_llm_new_token` handler, "
        "an abandoned stream left open, copies and pickling. Each pattern runs under a "
        "bounded wait (a hang fails) and must give the single call's answer",
        "`tests/integration_tests/contract.py` (the real-Ollama class runs only with "
        "`OLLAMA_BASE_URL`)",
        CONTRACT + r"test_(two_streams_read_in_turn|call_inside_a_stream|call_from_a_token_callback"
        r"|abandoned_stream_does_not_block_others|two_async_streams_read_in_turn"
        r"|copies_share_the_model_and_answer_alike|pickle_round_trip_loads_the_same_model)",
    ),
    (
        "Copies outlive the original, in a child process; a copy that changes `n_ctx` loads "
        "its own model; one generation thread per runtime serves every model and caller",
        "`test_reliability.py`, `tests/unit_tests/test_native.py`",
        r"(test_copies_outlive_the_original|test_copy_with_another_load_setting"
        r"|test_every_model_of_a_runtime_runs_on_one_thread|test_second_stream_in_the_same_thread"
        r"|test_run_from_the_runtime_thread_itself)",
    ),
    (
        "Native builds: no AMX kernels in llama-cpp-python or llama-server; a build that "
        "crashes fails its step naming the cause and the fix; the build key follows the CPU "
        "and flags; the AMX warning fires only for an AMX build on an AMX CPU",
        "`test_reliability.py`, `tests/unit_tests/test_native.py`",
        r"(test_native_builds_have_no_amx|test_a_build_that_crashes|test_builds_differ_by_cpu"
        r"|test_amx_kernels_are_found|test_amx_build_on_amx_cpu)",
    ),
    (
        "Security: chat templates render in a Jinja sandbox (escape attempts fail) within "
        "2 s and 1,000,000 characters; credentials (URL passwords, auth headers, tokens in "
        "`model_kwargs`, proxy passwords) never reach a repr, trace, cache key or error",
        "`tests/unit_tests/test_prompts.py`, `test_http.py`, `test_llamafile.py`, "
        "`test_ollama.py`, `test_huggingface_pipeline.py`",
        r"(test_hostile_template|test_redaction_helpers|credentials|test_bad_urls_are_refused"
        r"|reaches_no_repr)",
    ),
    (
        "Drop-in: every `langchain_community` parameter at its default builds, answers and "
        "warns about nothing; ignored ones warn once, ones that would change results are "
        "refused; `model_kwargs` cannot disagree with a field; `get_num_tokens` uses the "
        "model's own vocabulary offline",
        "`test_dropin.py`, `test_llamacpp.py`, `test_gpt4all.py`, `test_ollama.py`",
        r"(test_dropin\.py::|community_parameters|parameters_ollama_ignores|counted_offline"
        r"|echo_and_streaming_false|streaming_false_sends)",
    ),
]


def collect() -> list[str]:
    """Node ids of the suite, collected as ``make test`` runs it."""
    runs = [
        (ROOT / ".venv" / "bin" / "python",
         ["tests", "--ignore=tests/integration_tests/test_openvino.py"]),
        (ROOT / ".venv-openvino" / "bin" / "python", ["tests/integration_tests/test_openvino.py"]),
    ]  # fmt: skip
    ids: list[str] = []
    for python, args in runs:
        exe = str(python) if python.exists() else sys.executable
        out = subprocess.run(
            [exe, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
            cwd=ROOT, capture_output=True, text=True, check=False,
        )  # fmt: skip
        ids += [line for line in out.stdout.splitlines() if "::" in line]
    return ids


def table(ids: list[str]) -> str:
    lines = ["| what the tests assert | where | tests |", "|---|---|---|"]
    for what, where, pattern in ROWS:
        selector = re.compile(pattern)
        n = sum(1 for node in ids if selector.search(node))
        lines.append(f"| {what} | {where} | {n} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="fail if docs/reliability.md disagrees")
    args = ap.parse_args()
    text = DOC.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    wanted = "\n" + table(collect()) + "\n"
    if args.check:
        if text[start:end] != wanted:
            print("docs/reliability.md is not what the suite counts; run "
                  "python scripts/reliability_counts.py", file=sys.stderr)  # fmt: skip
            return 1
        return 0
    DOC.write_text(text[:start] + wanted + text[end:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
