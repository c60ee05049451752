"""Our own logic around native code: the shared model's threads, the AMX guard, the smoke check."""

from __future__ import annotations

import asyncio
import copy
import pickle
import stat
import sys
import threading
import time
import types
import warnings
from typing import Any, ClassVar

import pytest
from pydantic import PrivateAttr

from langchain_localllms.core import threads as _native
from langchain_localllms.core.threads import SharedModel
from langchain_localllms.engines import gguf
from langchain_localllms.errors import ClosedError
from tests.unit_tests.fake import ScriptedLLM


def counting(n: int, decoded: list[int]):
    """A decoding job that emits 0..n-1 and records what it decoded."""

    def work(emit):
        for i in range(n):
            decoded.append(i)
            if not emit(i):
                return

    return work


def test_reader_gets_every_item_and_worker_ends():
    shared = SharedModel(object(), None, runtime="t0")
    decoded: list[int] = []
    assert list(shared.stream(counting(50, decoded))) == list(range(50))


def test_closing_early_stops_decoding_within_the_lookahead():
    shared = SharedModel(object(), None, runtime="t1")
    decoded: list[int] = []
    stream = shared.stream(counting(1000, decoded))
    assert next(stream) == 0
    stream.close()
    assert len(decoded) <= 1 + _native.LOOKAHEAD + 1


def test_second_stream_in_the_same_thread_is_served():
    # The first worker holds the model; it must run on to its end without its reader.
    shared = SharedModel(object(), None, runtime="t2")
    first = shared.stream(counting(30, []))
    second = shared.stream(counting(5, []))
    done = []

    def read():
        done.append((next(first), list(second), list(first)))

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), "the second stream waited for the first one's reader"
    assert done == [(0, list(range(5)), list(range(1, 30)))]


def test_an_error_in_the_worker_reaches_the_reader_after_its_items():
    shared = SharedModel(object(), None, runtime="t3")

    def work(emit):
        emit("a")
        raise KeyError("engine failed")

    stream = shared.stream(work)
    assert next(stream) == "a"
    with pytest.raises(KeyError, match="engine failed"):
        next(stream)
    assert list(shared.stream(counting(2, []))) == [0, 1]  # the model is free again


def test_every_model_of_a_runtime_runs_on_one_thread_whatever_the_caller():
    # llama.cpp and torch keep one OpenMP pool per calling thread; a second pool in the
    # process slows every generation, so all of a runtime's work shares one thread.
    a = SharedModel(object(), None, runtime="one-thread")
    b = SharedModel(object(), None, runtime="one-thread")
    seen: list[int | None] = []

    def where(emit):
        seen.append(threading.get_ident())
        emit(0)

    list(a.stream(where))
    t = threading.Thread(
        target=lambda: (list(b.stream(where)), seen.append(b.run(threading.get_ident)))
    )
    t.start()
    t.join(20)
    assert len(seen) == 3
    assert len(set(seen)) == 1
    assert seen[0] != threading.get_ident()


def test_run_from_the_runtime_thread_itself_does_not_wait_for_itself():
    shared = SharedModel(object(), None, runtime="nested")

    def work(emit):
        emit(shared.run(lambda: "inline"))

    assert list(shared.stream(work)) == ["inline"]


def test_model_is_closed_once_when_the_last_holder_goes():
    closed = []
    shared = SharedModel(object(), lambda: closed.append(1), runtime="t-close")
    holder = [shared]
    del shared
    assert closed == []
    holder.clear()
    assert closed == [1]


def test_close_frees_at_once_when_idle_and_refuses_later_use():
    freed = []
    shared = SharedModel(
        object(),
        lambda: freed.append(1),
        runtime="t-close",
        name="test model",
        parts={"tokenizer": "tok"},
    )
    assert shared.part("tokenizer") == "tok"
    shared.close()
    assert freed == [1]
    assert shared.closed
    for use in (lambda: shared.model, lambda: shared.part("tokenizer"), shared.use().__enter__):
        with pytest.raises(ClosedError, match="this test model was closed"):
            use()
    shared.close()
    assert freed == [1]  # once


def test_close_during_a_use_frees_when_the_last_use_ends():
    freed = []
    model = object()
    shared = SharedModel(model, lambda: freed.append(1), runtime="t-close", parts={"p": 1})
    with shared.use() as a, shared.use() as b:
        assert a is b is model
        shared.close()
        assert freed == []  # still in use: nothing is freed under a running call
        assert shared.part("p") == 1  # what the running call needs is still there
        with pytest.raises(ClosedError):
            shared.use().__enter__()  # but no new call starts
    assert freed == [1]


class Owned(ScriptedLLM):
    """Stands for a runtime whose engine frees native memory at close()."""

    _engine: Any = PrivateAttr(default=None)

    def _setup(self) -> None:
        self._engine = types.SimpleNamespace(closes=[])
        self._engine.close = lambda: self._engine.closes.append(1)


def test_close_reaches_the_engine_once_and_copies_and_cache_hits_refuse():
    from langchain_core.caches import InMemoryCache

    llm = Owned(pieces=["a"], cache=InMemoryCache())
    assert llm.invoke("x") == "a"
    twin, deep = llm.model_copy(), copy.deepcopy(llm)
    with llm:
        pass
    llm.close()
    assert llm._engine.closes == [1]
    assert llm.closed
    assert twin.closed
    assert deep.closed
    for use in (lambda: llm.invoke("x"), lambda: twin.batch(["x"]), lambda: list(deep.stream("x"))):
        with pytest.raises(ClosedError, match="this Owned was closed"):
            use()  # "x" is in the cache: a closed instance refuses even a cache hit
    rebuilt = pickle.loads(pickle.dumps(llm))  # settings only: a new load, open
    assert not rebuilt.closed
    assert rebuilt.invoke("y") == "a"


# ------------------------------------------------------------------ copies
class HoldsAModel(ScriptedLLM):
    pipeline: Any = None  # a loaded object given as a field (HuggingFacePipeline's)
    _model: Any = PrivateAttr(default=None)
    _shared_fields: ClassVar[tuple[str, ...]] = ("pipeline",)

    def _setup(self) -> None:
        self._model = threading.Lock()  # stands for a native handle: cannot be copied


def test_copies_share_private_state_and_pickle_rebuilds():
    llm = HoldsAModel(pieces=["a", "b"], max_tokens=5, pipeline=threading.Lock())
    deep = copy.deepcopy(llm)
    assert deep._model is llm._model
    assert deep is not llm
    assert deep.pipeline is llm.pipeline
    assert deep.pieces == llm.pieces
    assert deep.pieces is not llm.pieces  # plain data is copied
    llm = ScriptedLLM(pieces=["a", "b"], max_tokens=5)
    restored = pickle.loads(pickle.dumps(llm))
    assert restored.invoke("x") == llm.invoke("x") == "ab"
    assert restored.pieces == ["a", "b"]


def test_copy_that_changes_a_load_setting_is_built_anew(monkeypatch):
    built = []
    original_setup = ScriptedLLM._setup
    monkeypatch.setattr(ScriptedLLM, "_setup", lambda self: (built.append(1), original_setup(self)))
    llm = ScriptedLLM(pieces=["a"])
    assert built == [1]
    llm.model_copy(update={"max_tokens": 3})  # a per-call field: shared
    assert built == [1]
    again = llm.model_copy(update={"pieces": ["z"]})  # read when loading: built anew
    assert built == [1, 1]
    assert again.invoke("x") == "z"


# ---------------------------------------------------------------- AMX guard
def fake_llama_cpp(info: bytes):
    return types.SimpleNamespace(llama_print_system_info=lambda: info)


@pytest.mark.parametrize(
    ("info", "cpu_amx", "warns"),
    [
        (b"CPU : AVX2 = 1 | AMX_INT8 = 1 | ", True, True),
        (b"CPU : AVX2 = 1 | AMX_INT8 = 1 | ", False, False),
        (b"CPU : AVX2 = 1 | AVX512 = 1 | ", True, False),
    ],
)
def test_amx_build_on_amx_cpu_warns_once_with_the_rebuild_command(
    monkeypatch, info, cpu_amx, warns
):
    monkeypatch.setattr(gguf, "_AMX_CHECKED", False)
    monkeypatch.setattr(gguf, "cpu_has_amx", lambda: cpu_amx)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        gguf.warn_if_amx_build(fake_llama_cpp(info))
        gguf.warn_if_amx_build(fake_llama_cpp(info))
    messages = [str(w.message) for w in seen]
    if warns:
        assert len(messages) == 1
        assert "-mno-amx-int8" in messages[0]
        assert "--no-cache-dir" in messages[0]
        assert "#20824" in messages[0]
    else:
        assert messages == []


# ------------------------------------------------------------- smoke check
def test_a_build_that_crashes_fails_the_step_naming_cause_and_fix(tmp_path, monkeypatch):
    from modelkit import native

    # A stand-in interpreter that dies as the AMX kernels do on the first decode.
    crash = tmp_path / "python"
    crash.write_text(
        f"#!{sys.executable}\nimport os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n"
    )
    crash.chmod(crash.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(native, "_gguf", lambda: tmp_path / "model.gguf")
    for amx, fix in (("1", "unset LOCALLLMS_AMX"), ("", "GGML_NATIVE=OFF")):
        monkeypatch.setenv("LOCALLLMS_AMX", amx)
        with pytest.raises(SystemExit) as e:
            native.smoke_library(str(crash))
        text = str(e.value.code)
        assert "SIGSEGV" in text
        assert "SMOKE CHECK FAILED" in text
        assert fix in text


def test_builds_differ_by_cpu_and_flags(monkeypatch):
    from modelkit import native

    monkeypatch.delenv("LOCALLLMS_AMX", raising=False)
    base = native.key("wheel")
    assert "-mno-amx-tile" in native.build_env()["CXXFLAGS"]
    monkeypatch.setattr(native, "cpu_flags", lambda: ["avx2", "amx_int8"])
    assert native.key("wheel") != base
    monkeypatch.setenv("LOCALLLMS_AMX", "1")
    assert "-mno-amx" not in native.build_env().get("CXXFLAGS", "")
    assert native.key("server") != native.key("wheel")


def test_amx_kernels_are_found_by_their_symbol(tmp_path):
    from modelkit import native

    with_amx = tmp_path / "libggml-cpu.so"
    with_amx.write_bytes(b"\x7fELF...ggml_backend_amx_mul_mat...")
    without = tmp_path / "libggml-base.so"
    without.write_bytes(b"\x7fELF...ggml_backend_cpu...")
    assert native.amx_kernels([with_amx, without]) == 1


# --------------------------------------------------------------- build once
def test_build_once_is_atomic_and_reused(tmp_path):
    from langchain_localllms.core.files import build_once

    target = tmp_path / "thing"
    calls = []

    def build(tmp):
        calls.append(tmp)
        (tmp / "done").write_text("x")

    def ready(p):
        return (p / "done").is_file()

    assert build_once(target, build, ready=ready) == target
    assert build_once(target, build, ready=ready) == target
    assert len(calls) == 1
    assert ready(target)

    def broken(tmp):
        (tmp / "half").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_once(tmp_path / "other", broken, ready=ready)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing"], "a half build was left"


def test_cache_root_ignores_an_empty_setting(monkeypatch, tmp_path):
    from pathlib import Path

    from langchain_localllms.core.files import cache_root

    monkeypatch.setenv("LOCALLLMS_CACHE", "")
    assert cache_root("ct2") == Path.home() / ".cache" / "langchain-localllms" / "ct2"
    monkeypatch.setenv("LOCALLLMS_CACHE", str(tmp_path))
    assert cache_root("openvino", "x") == tmp_path / "openvino" / "x"


async def test_an_async_caller_that_gives_up_stops_the_job_between_its_steps():
    # A job whose steps emit nothing (a long prompt being read) checks wanted().
    shared = SharedModel(object(), None, runtime="cancel")
    steps: list[int] = []

    def work(emit):
        while emit.wanted() and len(steps) < 1000:
            steps.append(1)
            time.sleep(0.005)
        emit("done")

    async def consume():
        async for _ in _native.iterate_in_thread(lambda: shared.stream(work)):
            pass

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(consume(), 0.1)
    assert len(steps) < 500  # it stopped long before its end
    assert not shared.thread.busy  # and the thread is free at once
