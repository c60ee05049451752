"""Native builds of llama.cpp that run on the CPU they were built on, AMX kernels left out.

``python -m modelkit.native llama-cpp-python``  build (or reuse) the llama-cpp-python
                                                wheel and install it into this Python;
``python -m modelkit.native llama-server``      build (or reuse) llama.cpp's HTTP server
                                                and print its path;
``python -m modelkit.native smoke [WHAT ...]``  decode a few tokens of the real GGUF with
                                                each build, in a child process;
``python -m modelkit.native info``              the build key and flags of this machine.

Why: llama-cpp-python and llama.cpp build with ``-march=native``. On a CPU with AMX
(Intel Sapphire Rapids and later) that compiles llama.cpp's AMX matmul kernels, which
crash on the first decode of K-quant weights (llama.cpp #20824; Ollama and dspy build
without them). So every build here passes ``-mno-amx-int8 -mno-amx-tile -mno-amx-bf16``
(GCC honours explicit ``-mno-*`` over ``-march=native``) unless ``LOCALLLMS_AMX=1``.

A build is kept in ``$LOCALLLMS_CACHE/native/<key>``, where the key covers the CPU's
feature flags, the compiler, the flags and the version: a build made on another CPU
(an AMX one, or one with AVX-512 that this one lacks) is never reused, and pip's own
wheel cache, which ignores compiler flags, is never asked. After each build and each
install, ``smoke`` loads the real GGUF in a child process; a crash fails the step
with a message naming the cause and the fix instead of reaching the demo or the tests.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from langchain_localllms.core.files import build_once
from modelkit import CACHE, LLAMA_CPP_PYTHON_VERSION, log, sdist

NO_AMX = "-mno-amx-int8 -mno-amx-tile -mno-amx-bf16"
#: What a build with AMX kernels contains and one without does not.
AMX_SYMBOL = b"amx_mul_mat"
ROOT = CACHE / "native"
SMOKE_PROMPT = "The capital of France is"


def amx_wanted() -> bool:
    return os.environ.get("LOCALLLMS_AMX", "") == "1"


def build_env() -> dict[str, str]:
    """The environment every native build runs in (flags appended to the user's own)."""
    env = dict(os.environ)
    if not amx_wanted():
        for var in ("CFLAGS", "CXXFLAGS"):
            env[var] = f"{env.get(var, '')} {NO_AMX}".strip()
    env.setdefault("CMAKE_ARGS", "-DLLAVA_BUILD=OFF")
    return env


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return sorted(line.split(":", 1)[1].split())
    except OSError:
        pass
    return [platform.processor() or platform.machine()]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_has_amx() -> bool:
    return any(f.startswith("amx") for f in cpu_flags())


def _compiler() -> str:
    cc = os.environ.get("CC", "cc")
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False)
        return out.stdout.splitlines()[0] if out.stdout else cc
    except OSError:
        return cc


def key(what: str) -> str:
    """The cache key of one build on this machine with these flags."""
    env = build_env()
    parts = {
        "what": what,
        "version": LLAMA_CPP_PYTHON_VERSION,
        "machine": platform.machine(),
        "cpu": cpu_flags(),
        "compiler": _compiler(),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}" if what == "wheel" else "",
        **{v: env.get(v, "") for v in ("CFLAGS", "CXXFLAGS", "CMAKE_ARGS")},
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    return f"{what}-{LLAMA_CPP_PYTHON_VERSION}-{digest}"


def _run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    log("$ " + " ".join(cmd))
    proc = subprocess.run(cmd, env=env, stdout=sys.stderr, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"[native] failed ({proc.returncode}): {' '.join(cmd)}")


def wheel() -> Path:
    """The llama-cpp-python wheel for this CPU, built from the sdist once."""

    def build(tmp: Path) -> None:
        log(f"building llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} for this CPU (~5 min, 2 cores)")
        t0 = time.perf_counter()
        # --no-cache-dir: pip's wheel cache ignores CFLAGS, so it could hand back a
        # wheel built with other flags (with AMX kernels, say) on another machine.
        _run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-cache-dir",
             str(sdist()), "-w", str(tmp)],
            env=build_env(),
        )  # fmt: skip
        log(f"built in {time.perf_counter() - t0:.0f}s")

    final = build_once(ROOT / key("wheel"), build, ready=lambda d: any(d.glob("*.whl")))
    return sorted(final.glob("llama_cpp_python-*.whl"))[0]


def install_wheel() -> Path:
    """Install the wheel for this CPU into the running Python (replacing any other).

    Then decode with it in a child process; if that fails, the cached wheel goes too.
    """
    whl = wheel()
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-cache-dir"]
    _run([*pip, "--no-deps", "--force-reinstall", str(whl)])  # replaces a build from elsewhere
    _run([*pip, str(whl)])  # and its dependencies
    try:
        log(smoke_library())
    except SmokeFailure:
        shutil.rmtree(whl.parent, ignore_errors=True)
        raise
    return whl


def server() -> Path:
    """llama.cpp's ``llama-server`` for this CPU, built from the sdist's llama.cpp once."""

    def build(tmp: Path) -> None:
        src = sdist() / "vendor" / "llama.cpp"
        env = build_env()
        gen = ["-G", "Ninja"] if shutil.which("ninja") else []
        log("building llama-server for this CPU (~6 min on 2 cores)")
        t0 = time.perf_counter()
        _run(
            ["cmake", "-S", str(src), "-B", str(tmp), *gen, "-DCMAKE_BUILD_TYPE=Release",
             "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_TESTS=OFF",
             "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DGGML_CCACHE=OFF",
             "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF"],
            env=env,
        )  # fmt: skip
        jobs = str(os.cpu_count())
        _run(["cmake", "--build", str(tmp), "--target", "llama-server", "-j", jobs], env)
        log(f"built in {time.perf_counter() - t0:.0f}s")
        log(smoke_server(tmp / "bin" / "llama-server"))  # a build that fails is never kept

    def ready(d: Path) -> bool:
        return (d / "bin" / "llama-server").is_file()

    return build_once(ROOT / key("server"), build, ready=ready) / "bin" / "llama-server"


# ------------------------------------------------------------------- checks
def amx_kernels(paths: list[Path]) -> int:
    """How many of ``paths`` (libraries, binaries) contain llama.cpp's AMX kernels."""
    return sum(1 for p in paths if AMX_SYMBOL in p.read_bytes())


def installed_libraries(python: str = sys.executable) -> list[Path]:
    code = (
        "import importlib.util as u, pathlib; "
        "print(pathlib.Path(u.find_spec('llama_cpp').origin).parent)"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    return sorted(Path(out.stdout.strip(), "lib").glob("lib*.so*"))


def _gguf() -> Path:
    from modelkit import prepare

    return prepare("gemma-gguf")


class SmokeFailure(SystemExit):
    pass


def _why(what: str, returncode: int, output: str) -> str:
    died = ""
    if returncode < 0:
        died = f"it died with {signal.Signals(-returncode).name}"
    else:
        died = f"it exited with status {returncode}"
    lines = [
        f"[native] SMOKE CHECK FAILED: {what} could not decode with the real GGUF: {died}.",
        f"  CPU: {cpu_name()} (AMX: {'yes' if cpu_has_amx() else 'no'}); build flags: "
        f"CFLAGS={build_env().get('CFLAGS', '')!r} CMAKE_ARGS={build_env().get('CMAKE_ARGS')!r}",
    ]
    if amx_wanted():
        lines.append(
            "  Cause: LOCALLLMS_AMX=1 compiled llama.cpp's AMX kernels, which crash on "
            "K-quant weights (llama.cpp #20824). Fix: unset LOCALLLMS_AMX and run the "
            "step again (a build without AMX is kept under its own key)."
        )
    else:
        lines.append(
            "  The build has no AMX kernels, so this is another fault of this CPU and build. "
            f"Fix: remove {ROOT} and run the step again; if it persists, build for a generic "
            "x86-64: CMAKE_ARGS='-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF' and run the step again."
        )
    lines.append("  Its output ended with:\n" + "\n".join(output.splitlines()[-15:]))
    return "\n".join(lines)


_LIB_SMOKE = """
import sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=256, n_threads=2, verbose=False)
out = llm(sys.argv[2], max_tokens=4, temperature=0)
print(repr(out["choices"][0]["text"]))
"""


def smoke_library(python: str = sys.executable) -> str:
    """Decode a few tokens with the installed llama-cpp-python, in a child process."""
    proc = subprocess.run(
        [python, "-c", _LIB_SMOKE, str(_gguf()), SMOKE_PROMPT],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    if proc.returncode != 0 or not proc.stdout.strip():
        raise SmokeFailure(_why("llama-cpp-python", proc.returncode, proc.stderr))
    libs = installed_libraries(python)
    return _check_amx("llama-cpp-python", libs, proc.stdout.strip())


def smoke_server(binary: Path) -> str:
    """Start the server on a free loopback port, complete a few tokens, stop it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    cmd = [str(binary), "-m", str(_gguf()), "--host", "127.0.0.1", "--port", str(port),
           "-c", "256", "--threads", "2", "--no-webui"]  # fmt: skip
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        text = None
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None and text is None:
                try:
                    body = json.dumps({"prompt": SMOKE_PROMPT, "n_predict": 4, "temperature": 0})
                    req = urllib.request.Request(f"{url}/completion", body.encode(), method="POST")
                    with urllib.request.urlopen(req, timeout=60) as reply:
                        text = json.loads(reply.read())["content"]
                except OSError:
                    time.sleep(0.3)
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=15)
            out.seek(0)
            log_text = out.read().decode(errors="replace")
        if text is None:
            raise SmokeFailure(_why("llama-server", proc.returncode or 0, log_text))
    return _check_amx("llama-server", [binary], repr(text))


def _check_amx(what: str, files: list[Path], answer: str) -> str:
    n = amx_kernels(files)
    if n and not amx_wanted():
        raise SmokeFailure(
            f"[native] {what} contains llama.cpp's AMX kernels ({n} of {len(files)} files), "
            f"which crash on AMX CPUs; it was not built by this kit. Fix: run "
            f"`python -m modelkit.native {what}`."
        )
    return f"smoke ok: {what} answered {answer}; files with AMX kernels: {n}/{len(files)}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m modelkit.native", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("llama-cpp-python", help="build or reuse the wheel; install it here")
    sub.add_parser("llama-server", help="build or reuse llama-server; print its path")
    s = sub.add_parser("smoke", help="decode a few tokens with each build")
    s.add_argument("what", nargs="*", choices=["llama-cpp-python", "llama-server"],
                   default=["llama-cpp-python", "llama-server"])  # fmt: skip
    sub.add_parser("info", help="this machine's build keys and flags")
    args = ap.parse_args(argv)
    if args.cmd == "llama-cpp-python":
        print(install_wheel())
    elif args.cmd == "llama-server":
        print(server())
    elif args.cmd == "smoke":
        if "llama-cpp-python" in args.what:
            log(smoke_library())
        if "llama-server" in args.what:
            log(smoke_server(server()))
    else:
        env = build_env()
        print(json.dumps({
            "cpu": cpu_name(), "amx_cpu": cpu_has_amx(), "amx_build": amx_wanted(),
            "wheel": key("wheel"), "server": key("server"),
            **{v: env.get(v, "") for v in ("CFLAGS", "CXXFLAGS", "CMAKE_ARGS")},
        }, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
