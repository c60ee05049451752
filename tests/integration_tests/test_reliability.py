"""Reliability: bad inputs, native crashes, threads, memory, abandoned streams.

Every bad input must end in a typed error that names the problem: never a crash of
the interpreter (native cases run in a child process to prove it), never a hang,
never a silently ignored argument. docs/reliability.md summarises the counts.
"""

from __future__ import annotations

import asyncio
import gc
import re
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import modelkit
from langchain_localllms import GPT4All, Grammar, LlamaCpp
from tests.integration_tests.contract import rss_mb


@dataclass(frozen=True)
class Case:
    """One bad input: what to call, the error type it must raise, words it must say."""

    id: str
    call: Callable[[], Any]
    error: type[BaseException] | tuple[type[BaseException], ...]
    says: str


def gguf() -> str:
    return str(modelkit.path("gemma-gguf"))


def tiny() -> str:
    return str(modelkit.path("tiny-gguf"))


_LLMS: dict[str, Any] = {}


def shared(name: str) -> Any:
    """Instances reused across cases (loading once keeps the suite fast)."""
    if name not in _LLMS:
        _LLMS[name] = {
            "llamacpp": lambda: LlamaCpp(model_path=gguf(), temperature=0, max_tokens=4),
            "gpt4all": lambda: GPT4All(model=tiny(), temp=0, max_tokens=4, n_ctx=1024),
        }[name]()
    return _LLMS[name]


def _tmp(name: str, data: bytes | None = None, directory: bool = False) -> str:
    base = Path(modelkit.CACHE) / "reliability"
    base.mkdir(parents=True, exist_ok=True)
    p = base / name
    if directory:
        p.mkdir(exist_ok=True)
    elif data is not None:
        p.write_bytes(data)
    return str(p)


CASES: list[Case] = [
    # --- model files
    Case(
        "llamacpp-missing-file",
        lambda: LlamaCpp(model_path="/nowhere/model.gguf"),
        FileNotFoundError,
        "/nowhere/model.gguf",
    ),
    Case(
        "llamacpp-directory",
        lambda: LlamaCpp(model_path=_tmp("a-dir", directory=True)),
        IsADirectoryError,
        "directory",
    ),
    Case(
        "llamacpp-garbage-file",
        lambda: LlamaCpp(model_path=_tmp("garbage.gguf", b"\x89PNG not a model")),
        ValueError,
        "not a GGUF",
    ),
    Case(
        "llamacpp-empty-file",
        lambda: LlamaCpp(model_path=_tmp("empty.gguf", b"")),
        ValueError,
        "empty",
    ),
    Case(
        "gpt4all-missing-file",
        lambda: GPT4All(model="/nowhere/m.gguf"),
        FileNotFoundError,
        "/nowhere/m.gguf",
    ),
    Case(
        "gpt4all-garbage-file",
        lambda: GPT4All(model=_tmp("garbage2.gguf", b"GGML old format")),
        ValueError,
        "not a GGUF",
    ),
    Case("gpt4all-unsupported-architecture", lambda: GPT4All(model=gguf()), ValueError, "gemma3"),
    # --- parameters
    Case(
        "llamacpp-negative-n_ctx",
        lambda: LlamaCpp(model_path=gguf(), n_ctx=-5),
        ValueError,
        "n_ctx",
    ),
    Case(
        "llamacpp-zero-threads",
        lambda: LlamaCpp(model_path=gguf(), n_threads=0),
        ValueError,
        "n_threads",
    ),
    Case(
        "llamacpp-negative-temperature",
        lambda: LlamaCpp(model_path=gguf(), temperature=-0.5),
        ValueError,
        "temperature",
    ),
    Case(
        "llamacpp-negative-max_tokens",
        lambda: LlamaCpp(model_path=gguf(), max_tokens=-7),
        ValueError,
        "max_tokens",
    ),
    Case(
        "llamacpp-top_p-above-1", lambda: LlamaCpp(model_path=gguf(), top_p=3), ValueError, "top_p"
    ),
    Case(
        "llamacpp-unknown-init-arg",
        lambda: LlamaCpp(model_path=gguf(), n_ctxx=10),
        ValueError,
        "n_ctxx",
    ),
    Case(
        "llamacpp-unknown-model_kwargs",
        lambda: LlamaCpp(model_path=gguf(), model_kwargs={"flash": 1}),
        ValueError,
        "flash",
    ),
    Case(
        "llamacpp-vocab_only",
        lambda: LlamaCpp(model_path=gguf(), model_kwargs={"vocab_only": True}),
        ValueError,
        "vocab_only",
    ),
    Case(
        "llamacpp-suffix-unsupported",
        lambda: LlamaCpp(model_path=gguf(), suffix="end"),
        ValueError,
        "suffix",
    ),
    Case(
        "llamacpp-seed-wrong-type",
        lambda: LlamaCpp(model_path=gguf(), seed="abc"),
        ValueError,
        "seed",
    ),
    Case(
        "gpt4all-parameter-that-would-change-results",
        lambda: GPT4All(model=tiny(), vocab_only=True),
        ValueError,
        "vocab_only",
    ),
    Case(
        "gpt4all-allow-download",
        lambda: GPT4All(model=tiny(), allow_download=True),
        ValueError,
        "allow_download",
    ),
    Case(
        "gpt4all-negative-max_tokens",
        lambda: GPT4All(model=tiny(), max_tokens=-1),
        ValueError,
        "max_tokens",
    ),
    Case(
        "callbacks-twice",
        lambda: LlamaCpp(model_path=gguf(), callbacks=[], callback_manager=_manager()),
        ValueError,
        "not both",
    ),
    # --- calls
    Case(
        "prompt-longer-than-context",
        lambda: shared("llamacpp").invoke("word " * 5000),
        ValueError,
        "larger n_ctx",
    ),
    Case(
        "non-str-prompt-invoke",
        lambda: shared("llamacpp").invoke(12345),
        (TypeError, ValueError),
        "nvalid input",
    ),
    Case(
        "non-str-prompt-generate",
        lambda: shared("llamacpp").generate([b"bytes"]),
        TypeError,
        "strings",
    ),
    Case(
        "prompt-list-not-str",
        lambda: shared("llamacpp").generate("a string"),
        TypeError,
        "list of prompt strings",
    ),
    Case(
        "unknown-call-kwarg",
        lambda: shared("llamacpp").invoke("hi", temprature=0.1),
        TypeError,
        "temprature",
    ),
    Case(
        "bad-call-value",
        lambda: shared("llamacpp").invoke("hi", max_tokens="lots"),
        ValueError,
        "max_tokens",
    ),
    Case(
        "gpt4all-unknown-call-kwarg",
        lambda: shared("gpt4all").invoke("hi", temperature=0.1),
        TypeError,
        "temperature",
    ),
    Case("gpt4all-empty-prompt", lambda: shared("gpt4all").invoke(""), ValueError, "empty"),
    Case(
        "stop-in-two-places",
        lambda: LlamaCpp(model_path=gguf(), stop=["a"]).invoke("hi", stop=["b"]),
        ValueError,
        "one place",
    ),
    Case(
        "stop-as-string",
        lambda: shared("llamacpp").invoke("hi", stop="\n"),
        TypeError,
        "list of strings",
    ),
    Case(
        "stop-empty-string",
        lambda: shared("llamacpp").invoke("hi", stop=[""]),
        ValueError,
        "empty stop",
    ),
    # --- grammars
    Case(
        "grammar-syntax",
        lambda: shared("llamacpp").invoke("hi", grammar='root ::= "a" )'),
        ValueError,
        "line 1:",
    ),
    Case(
        "grammar-undefined-rule",
        lambda: LlamaCpp(model_path=gguf(), grammar="root ::= thing"),
        ValueError,
        "undefined rule",
    ),
    Case(
        "grammar-wrong-type",
        lambda: shared("llamacpp").invoke("hi", grammar=42),
        TypeError,
        "grammar must be",
    ),
    Case(
        "grammar-path-missing",
        lambda: LlamaCpp(model_path=gguf(), grammar_path="/nowhere/g.gbnf"),
        FileNotFoundError,
        "g.gbnf",
    ),
    Case(
        "grammar-and-grammar_path",
        lambda: LlamaCpp(model_path=gguf(), grammar='root ::= "a"', grammar_path="/x.gbnf"),
        ValueError,
        "not both",
    ),
    Case(
        "grammar-on-gpt4all",
        lambda: shared("gpt4all").invoke("hi", grammar=Grammar.builtin("json")),
        TypeError,
        "grammar",
    ),
    Case(
        "grammar-schema-not-object", lambda: Grammar.from_json_schema("[1, 2]"), TypeError, "object"
    ),
]


def _manager() -> Any:
    from langchain_core.callbacks import CallbackManager

    return CallbackManager([])


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_a_typed_error_that_names_it(case: Case) -> None:
    with pytest.raises(case.error) as e:
        case.call()
    assert re.search(re.escape(case.says), str(e.value)), f"{type(e.value).__name__}: {e.value}"


# Native code: prove the interpreter survives by running each in a child process.
NATIVE = {
    "truncated-gguf": """
        src = open(modelkit.path("gemma-gguf"), "rb").read(3_000_000)
        p = modelkit.CACHE / "reliability" / "cut.gguf"; p.write_bytes(src)
        LlamaCpp(model_path=str(p))""",
    "gguf-header-then-garbage": """
        p = modelkit.CACHE / "reliability" / "hdr.gguf"
        p.write_bytes(b"GGUF" + bytes(range(256)) * 64)
        LlamaCpp(model_path=str(p))""",
    "gpt4all-truncated-gguf": """
        src = open(modelkit.path("tiny-gguf"), "rb").read(100_000)
        p = modelkit.CACHE / "reliability" / "cut-tiny.gguf"; p.write_bytes(src)
        GPT4All(model=str(p))""",
    "grammar-pathological-nesting": """
        llm = LlamaCpp(model_path=str(modelkit.path("tiny-gguf")), n_ctx=256)
        llm.invoke("x", grammar="root ::= " + "(" * 3000 + '"a"' + ")" * 3000, max_tokens=2)""",
}


@pytest.mark.parametrize("name", list(NATIVE))
def test_native_failure_is_an_exception_not_a_crash(name: str) -> None:
    code = "import sys, modelkit\nfrom langchain_localllms import LlamaCpp, GPT4All\ntry:\n"
    code += textwrap.indent(textwrap.dedent(NATIVE[name]).strip(), "    ")
    code += (
        "\nexcept Exception as e:\n    print('RAISED', type(e).__name__, str(e)[:300])\n"
        "else:\n    print('RAN')\n"
    )
    root = Path(__file__).resolve().parents[2]
    (Path(modelkit.CACHE) / "reliability").mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root
    )
    assert proc.returncode == 0, f"interpreter died (rc={proc.returncode}): {proc.stderr[-1500:]}"
    assert "RAISED" in proc.stdout or "RAN" in proc.stdout, proc.stdout


# ------------------------------------------------------------------ memory
def test_rss_stays_bounded_over_300_invokes(capsys) -> None:
    llm = LlamaCpp(model_path=tiny(), n_ctx=512, temperature=0, max_tokens=8)
    for _ in range(20):  # warm-up: allocator pools, caches
        llm.invoke("Red cat and blue dog")
    gc.collect()
    before = rss_mb()
    for i in range(300):
        llm.invoke(f"Red cat and blue dog {i}")
    gc.collect()
    growth = rss_mb() - before
    with capsys.disabled():
        print(f"\n[reliability] RSS growth over 300 LlamaCpp invokes: {growth:+.1f} MB")
    assert growth < 30, f"RSS grew {growth:.1f} MB over 300 calls"


# ------------------------------------------------------------ early stops
def test_abandoned_stream_frees_the_model() -> None:
    llm = LlamaCpp(model_path=tiny(), n_ctx=512, temperature=0, max_tokens=400)
    stream = llm.stream("Red cat and blue dog")
    next(stream)
    stream.close()
    used = llm.client.n_tokens
    # The lock is free (a new call runs at once) and nothing decodes in the background.
    done = threading.Event()
    threading.Thread(
        target=lambda: (llm.invoke("hi", max_tokens=1), done.set()), daemon=True
    ).start()
    assert done.wait(60), "the model stayed locked after the stream was abandoned"
    assert llm.client.n_tokens <= used + 8


async def test_abandoned_async_stream_frees_the_model() -> None:
    llm = LlamaCpp(model_path=tiny(), n_ctx=512, temperature=0, max_tokens=400)
    agen = llm.astream("Red cat and blue dog")
    async for _ in agen:
        break
    await agen.aclose()
    out = await asyncio.wait_for(llm.ainvoke("hi", max_tokens=1), 60)
    assert isinstance(out, str)


# ------------------------------------------------- copies outlive the original
# A copy shares the loaded model; freeing it with the original used to crash the copy
# (SIGSEGV), so each runtime runs in a child process.
COPIES = {
    "llamacpp": (
        "LlamaCpp",
        "model_path=str(modelkit.path('gemma-gguf')), temperature=0, max_tokens=6, n_ctx=256",
    ),
    "gpt4all": (
        "GPT4All",
        "model=str(modelkit.path('tiny-gguf')), temp=0, max_tokens=6, n_ctx=256",
    ),
    "ctranslate2": ("CTranslate2", "model_path=str(modelkit.path('tiny-ct2')), max_length=6"),
    "huggingface": (
        "HuggingFacePipeline",
        "model_id=str(modelkit.path('tiny-hf')), max_new_tokens=6, temperature=0",
    ),
}
_COPY_SCRIPT = """
import copy, gc, pickle, modelkit
from langchain_localllms import {cls}
llm = {cls}({args})
prompt = "Red cat and blue dog"
expected = llm.invoke(prompt)
shallow = llm.model_copy()
deep = copy.deepcopy(llm)
del llm
gc.collect()
assert shallow.invoke(prompt) == expected, "model_copy answered differently"
del shallow
gc.collect()
assert deep.invoke(prompt) == expected, "deepcopy answered differently"
restored = pickle.loads(pickle.dumps(deep))
del deep
gc.collect()
assert restored.invoke(prompt) == expected, "unpickled copy answered differently"
print("COPIES-OK", repr(expected))
"""


@pytest.mark.parametrize("runtime", list(COPIES))
def test_copies_outlive_the_original(runtime: str) -> None:
    cls, args = COPIES[runtime]
    root = Path(__file__).resolve().parents[2]
    code = _COPY_SCRIPT.format(cls=cls, args=args)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root
    )
    assert proc.returncode == 0, (
        f"rc={proc.returncode} (negative: killed by a signal): {proc.stderr[-1500:]}"
    )
    assert "COPIES-OK" in proc.stdout


def test_copy_with_another_load_setting_loads_anew() -> None:
    # n_ctx decides the context llama.cpp allocates: a copy with its own must not run
    # the original's model.
    llm = LlamaCpp(model_path=tiny(), n_ctx=512, temperature=0, max_tokens=2)
    small = llm.model_copy(update={"n_ctx": 64})
    assert small.client is not llm.client
    with pytest.raises(ValueError, match="larger n_ctx"):
        small.invoke("word " * 100)
    assert isinstance(llm.invoke("word " * 100), str)
    assert llm.model_copy(update={"temperature": 0.5}).client is llm.client


# --------------------------------------------------------------- native builds
def test_native_builds_have_no_amx_kernels_and_load_without_warning() -> None:
    # llama.cpp's AMX kernels crash on K-quant models; the kit leaves them out of
    # every build (LOCALLLMS_AMX=1 opts in).
    from modelkit import native
    from tests.integration_tests.servers import llama_server_binary

    libraries = native.installed_libraries()
    assert any(p.name.startswith("libggml-cpu") for p in libraries), libraries
    found = native.amx_kernels([*libraries, llama_server_binary()])
    assert found == 0 or native.amx_wanted(), f"{found} native builds contain AMX kernels"
    import warnings

    from langchain_localllms.engines import gguf

    gguf._AMX_CHECKED = False
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        LlamaCpp(model_path=tiny(), n_ctx=64)
