"""Real servers for the integration tests and the docs pages.

* :func:`llama_server` — llama.cpp's own HTTP server (``llama-server``, what a
  llamafile embeds), built from the llama-cpp-python sdist by
  ``python -m modelkit.native llama-server``, serving the Gemma GGUF with 4 parallel slots.
* :func:`ollama_server` — a loopback server speaking Ollama's HTTP API as
  ``/work/shared/CONTRACTS.md`` gives it (status codes, NDJSON framing, final metrics
  in nanoseconds, ``{"error"}`` lines, 404 for an unknown model, ``/api/show``,
  ``/api/tags``, ``/api/version``, and ``/api/pull``, ``/api/ps``, ``num_ctx`` and
  truncation as :class:`OllamaLoopback` documents them), generating real tokens with
  llama-cpp-python on the Gemma GGUF. No Ollama binary can be installed on these
  machines; with a real one, set ``OLLAMA_BASE_URL`` and the tests in
  ``test_ollama.py`` also run against it.
* :func:`ollama_chat_server` — a second loopback Ollama for ``/api/chat``: the same
  GGUF served as ``gemma3:270m`` with the Ollama library's gemma3 chat template,
  and as two models made with ``ollama create`` from it, one whose template has a
  thinking switch (``gemma3-think:270m``) and one whose template takes tools
  (``gemma3-tools:270m``). Apart from the first server, whose ``gemma3:270m`` keeps
  the plain-completion template the LLM tests pin.

Each server starts once per process (the first call) and stops when it exits.
"""

from __future__ import annotations

import atexit
import base64
import codecs
import ctypes
import hashlib
import json
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
#: The name the loopback Ollama serves Gemma-3-270M under.
GEMMA = "gemma3:270m"
#: Names the chat loopback also serves Gemma under (templates with thinking / tools).
GEMMA_THINK = "gemma3-think:270m"
GEMMA_TOOLS = "gemma3-tools:270m"
_STARTED: dict[str, Any] = {}
_START_LOCK = threading.Lock()


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gemma_gguf() -> Path:
    """The Gemma-3-270M GGUF of the model kit (built on first use)."""
    import modelkit

    return Path(modelkit.prepare("gemma-gguf"))


def _once(name: str, start: Any) -> Any:
    with _START_LOCK:
        if name not in _STARTED:
            server = start()
            atexit.register(server.stop)
            _STARTED[name] = server
        return _STARTED[name]


def llama_server() -> LlamaServer:
    """The llama.cpp server of this process (started on first call, 4 slots)."""
    return _once("llama-server", lambda: LlamaServer(gemma_gguf()))


def ollama_server() -> OllamaLoopback:
    """The loopback Ollama server of this process, serving Gemma as ``gemma3:270m``
    (which its registry also has: pulling it again checks the layers, as Ollama does)."""
    return _once(
        "ollama", lambda: OllamaLoopback({GEMMA: gemma_gguf()}, library={GEMMA: gemma_gguf()})
    )


def ollama_chat_server() -> OllamaLoopback:
    """The loopback Ollama of this process for chat: Gemma as ``gemma3:270m`` with the
    library's gemma3 template, and as ``gemma3-think:270m`` / ``gemma3-tools:270m``."""
    templates = {GEMMA: GEMMA3_TEMPLATE, GEMMA_THINK: GEMMA3_THINK_TEMPLATE}
    templates[GEMMA_TOOLS] = GEMMA3_TOOLS_TEMPLATE
    return _once(
        "ollama-chat",
        lambda: OllamaLoopback(dict.fromkeys(templates, gemma_gguf()), templates=templates),
    )


def one_shot_server(reply: bytes) -> str:
    """A loopback server that reads one request, sends ``reply`` (raw bytes: status
    line, headers, body) and drops the connection: a server that dies mid-answer."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
                while len(body) < length:
                    body += conn.recv(65536)
                conn.sendall(reply)
                conn.shutdown(socket.SHUT_RDWR)

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{port}"


def chunked(*chunks: bytes) -> bytes:
    """HTTP/1.1 chunked framing of ``chunks`` (without the final empty chunk)."""
    return b"".join(f"{len(c):X}\r\n".encode() + c + b"\r\n" for c in chunks)


# ------------------------------------------------------------------ llama-server
def llama_server_binary() -> Path:
    """Path of ``llama-server``, built for this CPU (once, cached) by ``modelkit.native``."""
    out = subprocess.run(
        [sys.executable, "-m", "modelkit.native", "llama-server"],
        capture_output=True, text=True, check=False, cwd=ROOT,
    )  # fmt: skip
    if out.returncode != 0:
        msg = f"building llama-server failed:\n{out.stderr[-3000:]}"
        raise RuntimeError(msg)
    return Path(out.stdout.strip().splitlines()[-1])


class LlamaServer:
    """``llama-server`` on a free loopback port; ``url`` is its base URL.

    Args:
        model: The GGUF file to serve.
        parallel: Server slots (requests decoded together).
        ctx: Context of all slots together (each gets ``ctx / parallel``).
        threads: CPU threads.
    """

    def __init__(self, model: Path, *, parallel: int = 4, ctx: int = 4096, threads: int = 2):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.parallel = parallel
        self.log = Path(tempfile.mkstemp(prefix="llama-server-", suffix=".log")[1])
        cmd = [
            str(llama_server_binary()), "-m", str(model), "--host", "127.0.0.1",
            "--port", str(self.port), "--parallel", str(parallel), "-c", str(ctx),
            "--threads", str(threads), "--no-webui",
        ]  # fmt: skip
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready(timeout=180)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                msg = f"llama-server exited with {self.proc.returncode}:\n{self.log_tail()}"
                raise RuntimeError(msg)
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        msg = f"llama-server was not ready within {timeout} s:\n{self.log_tail()}"
        raise RuntimeError(msg)

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------- Ollama loopback
_DEFAULT_TEMPLATE = "{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}"
_IF = re.compile(r"\{\{-?\s*if\s+\.(\w+)\s*-?\}\}(.*?)\{\{-?\s*end\s*-?\}\}", re.S)
_VAR = re.compile(r"\{\{-?\s*\.(\w+)\s*-?\}\}")
#: The option keys Ollama knows (CONTRACTS.md); others are ignored with a warning.
KNOWN_OPTIONS = frozenset(
    [
        "num_keep",
        "seed",
        "num_predict",
        "top_k",
        "top_p",
        "min_p",
        "typical_p",
        "repeat_last_n",
        "temperature",
        "repeat_penalty",
        "presence_penalty",
        "frequency_penalty",
        "stop",
        "num_ctx",
        "num_batch",
        "num_gpu",
        "main_gpu",
        "use_mmap",
        "num_thread",
    ]
)


def render_template(template: str, values: dict[str, str]) -> str:
    """The subset of Go templates a plain-completion Modelfile uses:
    ``{{ .Name }}`` and ``{{ if .Name }}...{{ end }}`` (no nesting)."""
    out = _IF.sub(lambda m: m.group(2) if values.get(m.group(1)) else "", template)
    out = _VAR.sub(lambda m: values.get(m.group(1), ""), out)
    if "{{" in out:
        msg = "template: this loopback server renders only {{ .Var }} and {{ if .Var }}...{{ end }}"
        raise ValueError(msg)
    return out


# Ollama's gemma3 template (its repository's template/gemma3-instruct.gotmpl, what the
# library's gemma3 models carry); the loopback renders it with the Python port in
# :func:`_render_gemma3`, not with a Go template engine.
GEMMA3_TEMPLATE = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<start_of_turn>user
{{- if and (eq $i 1) $.System }}
{{ $.System }}
{{ end }}
{{ .Content }}<end_of_turn>
{{ else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}<end_of_turn>
{{ end }}
{{- if $last }}<start_of_turn>model
{{ end }}
{{- end }}
"""
#: gemma3's template with a thinking switch, as a Modelfile for ``ollama create`` would
#: give it: ``.Thinking`` between ``<think>`` tags (Ollama infers the tags from it and
#: lists the model as ``thinking``) and the thought opened when ``.Think`` is set.
GEMMA3_THINK_TEMPLATE = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<start_of_turn>user
{{- if and (eq $i 1) $.System }}
{{ $.System }}
{{ end }}
{{ .Content }}<end_of_turn>
{{ else if eq .Role "assistant" }}<start_of_turn>model
{{ if .Thinking }}<think>{{ .Thinking }}</think>
{{ end }}{{ .Content }}<end_of_turn>
{{ end }}
{{- if $last }}<start_of_turn>model
{{ if $.Think }}<think>
{{ end }}{{ end }}
{{- end }}
"""
#: gemma3's template with tools: listed in the last user turn, calls written as JSON
#: objects (so Ollama's tool parser looks for "{"), results as user turns.
GEMMA3_TOOLS_TEMPLATE = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<start_of_turn>user
{{- if and (eq $i 1) $.System }}
{{ $.System }}
{{ end }}
{{- if and $last $.Tools }}
You can call these functions:
{{- range $.Tools }}
{{ json .Function }}
{{- end }}
To call one, answer with nothing but a JSON object {"name": the function's name, \
"arguments": its arguments}.
{{ end }}
{{ .Content }}<end_of_turn>
{{ else if eq .Role "assistant" }}<start_of_turn>model
{{ if .ToolCalls }}{{ range .ToolCalls }}{"name": "{{ .Function.Name }}", \
"arguments": {{ json .Function.Arguments }}}{{ end }}{{ else }}{{ .Content }}{{ end }}<end_of_turn>
{{ else if eq .Role "tool" }}<start_of_turn>user
{{ .Content }}<end_of_turn>
{{ end }}
{{- if $last }}<start_of_turn>model
{{ end }}
{{- end }}
"""
_TOOLS_HOW = (
    'To call one, answer with nothing but a JSON object {"name": the function\'s name, '
    '"arguments": its arguments}.'
)
_THINKING = re.compile(
    r"\{\{-?\s*if \.Thinking\s*-?\}\}(.*?)\{\{-?\s*\.Thinking\s*-?\}\}(.*?)\{\{-?\s*end", re.S
)


def template_capabilities(template: str) -> list[str]:
    """What Ollama lists for a model with this template (``server/images.go``
    ``Capabilities``): ``tools`` when it uses ``.Tools``, ``thinking`` when it wraps
    ``.Thinking`` in tags (``thinking.InferTags``). The Gemma-3-270M GGUF has no
    vision tower (no ``vision.block_count``), so no ``vision``."""
    caps = ["completion"]
    if ".Tools" in template:
        caps.append("tools")
    if think_tags(template):
        caps.append("thinking")
    return caps


def think_tags(template: str) -> tuple[str, str] | None:
    """The tags around ``.Thinking`` in a template (Ollama's ``thinking.InferTags``)."""
    m = _THINKING.search(template)
    if not m or not m.group(1).strip() or not m.group(2).strip():
        return None
    return m.group(1).strip(), m.group(2).strip()


def _collate(messages: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """Ollama's ``template.collate``: consecutive messages of one role (but tool) are
    merged with a blank line between; the system messages are also ``.System``."""
    system: list[str] = []
    out: list[dict[str, Any]] = []
    for m in messages:
        if m["role"] == "system":
            system.append(m["content"])
        if out and out[-1]["role"] == m["role"] and m["role"] != "tool":
            out[-1] = {**out[-1], "content": out[-1]["content"] + "\n\n" + m["content"]}
        else:
            out.append(dict(m))
    return "\n\n".join(system), out


def _go_json(value: Any) -> str:
    """The ``json`` template function: Go's compact ``json.Marshal``."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _render_gemma3(
    template: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]], think: bool
) -> str:
    """The three gemma3 templates above, rendered as Go's text/template would."""
    system, turns = _collate(messages)
    out = []
    for i, m in enumerate(turns):
        last = i == len(turns) - 1
        if m["role"] == "user":
            out.append("<start_of_turn>user")
            if i == 1 and system:
                out.append(f"\n{system}\n")
            if template is GEMMA3_TOOLS_TEMPLATE and last and tools:
                listing = "".join("\n" + _go_json(t.get("function")) for t in tools)
                out.append(f"\nYou can call these functions:{listing}\n{_TOOLS_HOW}\n")
            out.append(f"\n{m['content']}<end_of_turn>\n")
        elif m["role"] == "assistant":
            out.append("<start_of_turn>model\n")
            calls = m.get("tool_calls") or []
            if template is GEMMA3_TOOLS_TEMPLATE and calls:
                for call in calls:
                    function = call.get("function") or {}
                    args = _go_json(function.get("arguments") or {})
                    out.append(f'{{"name": "{function.get("name")}", "arguments": {args}}}')
            else:
                if template is GEMMA3_THINK_TEMPLATE and m.get("thinking"):
                    out.append(f"<think>{m['thinking']}</think>\n")
                out.append(m["content"])
            out.append("<end_of_turn>\n")
        elif m["role"] == "tool" and template is GEMMA3_TOOLS_TEMPLATE:
            out.append(f"<start_of_turn>user\n{m['content']}<end_of_turn>\n")
        if last:
            out.append("<start_of_turn>model\n")
            if template is GEMMA3_THINK_TEMPLATE and think:
                out.append("<think>\n")
    return "".join(out) + "\n"


def _render_legacy(template: str, messages: list[dict[str, Any]]) -> str:
    """A template without ``.Messages`` (``template.Execute``'s legacy path): rendered
    once per user/assistant exchange with ``.System``/``.Prompt``/``.Response``, the
    last one cut at ``.Response``; tool messages are not shown."""
    if ".Response" not in template:
        template += "{{ .Response }}"
    head = re.split(r"\{\{-?\s*\.Response\s*-?\}\}", template, maxsplit=1)[0]
    _, turns = _collate(messages)
    out, values = [], {"System": "", "Prompt": "", "Response": ""}
    for m in turns:
        role = m["role"]
        if (role == "system" and (values["Prompt"] or values["Response"])) or (
            role == "user" and values["Response"]
        ):
            out.append(render_template(template, values))
            values = {"System": "", "Prompt": "", "Response": ""}
        key = {"system": "System", "user": "Prompt", "assistant": "Response"}.get(role)
        if key:
            values[key] = m["content"]
    out.append(render_template(head, values))
    return "".join(out)


class _ThinkingParser:
    """Ollama's ``thinking.Parser``: splits a thought in tags off the start of the text
    as it streams (a tag split across pieces is held back until it is whole)."""

    def __init__(self, opening: str, closing: str) -> None:
        self.opening, self.closing = opening, closing
        self.state = "looking"
        self.acc = ""

    def add(self, content: str) -> tuple[str, str]:
        """``(thinking, content)`` of what can be said so far."""
        self.acc += content
        thinking, rest, more = [], [], True
        while more:
            t, r, more = self._eat()
            thinking.append(t)
            rest.append(r)
        return "".join(thinking), "".join(rest)

    def _eat(self) -> tuple[str, str, bool]:
        trimmed = self.acc.lstrip()
        if self.state == "looking":
            if trimmed.startswith(self.opening):
                after = trimmed[len(self.opening) :].lstrip()
                self.acc = after
                self.state = "started" if not after else "thinking"
                return "", "", True
            if self.opening.startswith(trimmed):
                return "", "", False
            self.state, untrimmed, self.acc = "done", self.acc, ""
            return "", untrimmed, False
        if self.state == "started":
            if not trimmed:
                return "", "", False
            self.state, self.acc = "thinking", trimmed
            return "", "", True
        if self.state == "thinking":
            acc = self.acc
            if self.closing in acc:
                at = acc.index(self.closing)
                remaining = acc[at + len(self.closing) :].lstrip()
                self.acc = ""
                self.state = "done" if remaining else "done-eating-whitespace"
                return acc[:at], remaining, False
            held = next(
                (n for n in range(min(len(acc), len(self.closing)), 0, -1)
                 if acc.endswith(self.closing[:n])),
                0,
            )  # fmt: skip
            self.acc = acc[len(acc) - held :]
            return acc[: len(acc) - held], "", False
        if self.state == "done-eating-whitespace":
            if trimmed:
                self.state = "done"
            self.acc = ""
            return "", trimmed, False
        acc, self.acc = self.acc, ""
        return "", acc, False


class _ToolParser:
    """Ollama's tool-call parser (``tools/tools.go``) for a template whose calls are
    JSON objects, so the tag it looks for is ``{``: text before a ``{`` is content; a
    whole JSON object naming a tool, with ``arguments`` (or ``parameters``), is a
    call (``function.index`` counts them, and the server gives each an ``id``); any
    other object is flushed as content."""

    def __init__(self, tools: list[dict[str, Any]]) -> None:
        self.names = {str((t.get("function") or {}).get("name")) for t in tools}
        self.buffer = ""
        self.parsing = False
        self.n = 0

    def add(self, text: str) -> tuple[list[dict[str, Any]], str]:
        self.buffer += text
        content = ""
        if not self.parsing:
            at = self.buffer.find("{")
            if at < 0:
                content, self.buffer = self.buffer, ""
                return [], content
            content, self.buffer, self.parsing = self.buffer[:at], self.buffer[at:], True
        calls = []
        while self.buffer.startswith("{"):
            end = _object_end(self.buffer)
            if end is None:
                break  # not whole yet
            call = self._call(self.buffer[:end])
            if call is None:  # an object that is no call: content after all
                content, self.buffer, self.parsing = content + self.buffer, "", False
                break
            calls.append(call)
            self.buffer = self.buffer[end:].lstrip()
        return calls, content

    def content(self) -> str:
        """What is left at the end: nothing once a call was made (``Parser.Content``)."""
        return "" if self.n else self.buffer

    def _call(self, text: str) -> dict[str, Any] | None:
        try:
            data = json.loads(text)
        except ValueError:
            return None
        args = data.get("arguments", data.get("parameters")) if isinstance(data, dict) else None
        if data.get("name") not in self.names or not isinstance(args, dict):
            return None
        call_id = "call_" + "".join(random.choices("abcdefghijklmnopqrstuvwxyz0123456789", k=8))
        call = {
            "id": call_id,
            "function": {"index": self.n, "name": data["name"], "arguments": args},
        }
        self.n += 1
        return call


def _object_end(text: str) -> int | None:
    """Where the JSON object at the start of ``text`` ends (None: not whole yet)."""
    depth, quoted, escaped = 0, False, False
    for i, c in enumerate(text):
        if escaped:
            escaped = False
        elif quoted:
            escaped = c == "\\"
            quoted = c != '"'
        elif c == '"':
            quoted = True
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


class _Fail(Exception):
    """An error reply: HTTP status and Ollama's ``{"error": ...}`` text."""

    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error


class OllamaLoopback:
    """A loopback server that speaks Ollama's HTTP API, backed by llama-cpp-python.

    Like Ollama with ``OLLAMA_NUM_PARALLEL=1``, it generates one answer at a time and
    queues the others. Tests can look at ``requests`` (what arrived), ``warnings``
    (options it ignored), ``log`` (what Ollama logs and never tells the client, such
    as ``truncating input prompt``), ``reused`` (how many prompt tokens each
    generation found in the KV cache), make the next
    generation fail with :meth:`inject`, and demand basic auth with ``require_auth``.

    What it does as Ollama does (sources: Ollama's ``docs/api.md``, and its source:
    ``server/images.go`` ``PullModel``, ``server/download.go``,
    ``runner/ollamarunner/runner.go`` ``NewSequence`` / ``completion``, ``api/types.go``):

    * **Context.** A model runs with ``options.num_ctx`` tokens of context, else the
      server's default (``n_ctx`` here, ``OLLAMA_CONTEXT_LENGTH`` there), capped at
      the context the GGUF was trained for; a different ``num_ctx`` reloads it.
      ``GET /api/ps`` lists the loaded models with that ``context_length`` (Ollama
      0.11+), and ``/api/show``'s ``model_info`` has ``<arch>.context_length``.
    * **Truncation, without an error.** A prompt longer than the context keeps its
      first ``num_keep`` tokens (option, default 4, plus the BOS token) and its end:
      ``inputs[:keep] + inputs[keep + discard:]`` with ``discard = len - num_ctx``, so
      exactly ``num_ctx`` tokens remain, and Ollama logs a warning the client never
      sees. When generation fills the context, it shifts: half of what follows the
      kept tokens is dropped and decoding goes on (llama-cpp-python re-evaluates the
      rest; Ollama shifts its KV cache in place).
    * **prompt_eval_count** is the whole prompt after truncation, also when part of it
      was reused from the KV cache (Ollama's runner counts ``numPromptInputs`` before
      it loads the cache slot). Ollama before its Go runner (0.1.x) reported only the
      newly evaluated tokens, or nothing, for a cached prompt (ollama#2068, #3427).
    * **Pull.** ``POST /api/pull`` ``{"model", "stream"}`` streams NDJSON:
      ``{"status": "pulling manifest"}``, then per layer (model, template, params,
      license, config) ``{"status": "pulling <digest[7:19]>", "digest": "sha256:...",
      "total": N, "completed": M}`` repeated (``completed`` left out while 0, as Go's
      ``omitempty`` does; a layer already present is one line with completed ==
      total), then ``verifying sha256 digest``, ``writing manifest``, ``success``. A
      name the registry lacks: ``{"error": "pull model manifest: file does not exist"}``
      after the first line, HTTP status 200 (the error is in the stream). Names the
      loopback can pull are ``library``; pulling copies the GGUF into a blob store,
      in chunks, and serves it under the name (``/api/show``'s ``FROM`` names the blob).
    * **Unload.** An empty prompt with ``keep_alive`` 0 frees the model and answers
      one JSON object with ``done_reason: "unload"``.
    * **format** samples as Ollama's sampler does (``sample/samplers.go``): the token
      is drawn without the grammar, and only when the grammar rejects it is the
      grammar applied to every candidate and the token drawn again. Greedy answers
      are the same as with the grammar applied first, and come several times faster.

    ``POST /api/chat`` (sources: ``docs/api.md``; ``server/routes.go`` ``ChatHandler``,
    ``template/template.go``, ``thinking/parser.go``, ``thinking/template.go``,
    ``tools/tools.go``, ``server/images.go`` ``Capabilities`` / ``CheckCapabilities``):

    * **Request.** ``{"model", "messages": [{"role", "content", "thinking",
      "tool_calls": [{"function": {"name", "arguments": {...}}}], "tool_name"}],
      "tools", "format", "think", "options", "stream", "keep_alive"}``.
    * **The model's template renders the conversation**: messages of one role in a
      row are merged, system messages are also ``.System``. The templates served
      here are rendered by Python ports (:func:`_render_gemma3` for the gemma3
      templates, :func:`_render_legacy` for one without ``.Messages``, which shows no
      tool messages), not by a Go template engine.
    * **Capabilities**, listed by ``/api/show`` and checked per request:
      ``completion``; ``tools`` when the template uses ``.Tools``; ``thinking`` when
      it wraps ``.Thinking`` in tags. ``tools`` to a model without them is HTTP 400
      ``"registry.ollama.ai/library/<name> does not support tools"``; ``think`` true
      (or a level) to one without thinking is HTTP 400 ``"\"<model>\" does not
      support thinking"`` (false is fine); a thinking model thinks when ``think`` is
      not sent.
    * **Thinking** (``think`` on): the thought is split off the generated text by
      Ollama's thinking parser, with the tags of the template; when the prompt ends
      with the opening tag the text starts inside the thought. Thought text goes to
      ``message.thinking``, the rest to ``message.content``. Not emulated: Ollama's
      second pass that applies ``format`` only once a thinking model's thought ends
      (here ``format`` constrains from the first token).
    * **Tools**: with ``tools``, Ollama's parser turns generated JSON objects that
      name a tool into ``message.tool_calls`` (``{"id": "call_...", "function":
      {"index", "name", "arguments"}}``) and takes them out of ``content``.
    * **format** (``"json"`` or a JSON schema) constrains decoding, as on
      ``/api/generate``.
    * **Reply**: NDJSON messages ``{"model", "created_at", "message": {"role":
      "assistant", "content", ...}, "done": false}``, then ``"done": true`` with
      ``done_reason`` and the metrics (no ``context``); with ``"stream": false``, one
      object with the whole message. An empty ``messages`` loads the model
      (``done_reason: "load"``), or with ``keep_alive`` 0 unloads it (``"unload"``).
      Models of one GGUF share its loaded runner (Ollama's scheduler keys runners by
      model file).

    Args:
        models: Model names (``name:tag``) and the GGUF files behind them.
        templates: Each model's template (its Modelfile's ``TEMPLATE``); models not
            named get a plain-completion one (``.System``, then ``.Prompt``).
        library: Names the loopback's "registry" has, and the GGUF files behind them.
        n_ctx: The server's default context size (Ollama's ``OLLAMA_CONTEXT_LENGTH``).
        threads: CPU threads for generation.
    """

    def __init__(
        self,
        models: dict[str, Path],
        *,
        templates: dict[str, str] | None = None,
        library: dict[str, Path] | None = None,
        n_ctx: int = 2048,
        threads: int = 2,
    ):
        self.models = {_full_name(k): Path(v) for k, v in models.items()}
        self.templates = {_full_name(k): v for k, v in (templates or {}).items()}
        self.library = {_full_name(k): Path(v) for k, v in (library or {}).items()}
        self.n_ctx = n_ctx
        self.threads = threads
        self.requests: list[dict[str, Any]] = []
        self.warnings: list[str] = []
        self.log: list[str] = []
        self.reused: list[int] = []
        self.require_auth: tuple[str, str] | None = None
        self._faults: list[tuple[str, int]] = []
        self._loaded: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._blobs = Path(tempfile.mkdtemp(prefix="ollama-loopback-blobs-"))
        self._digests: dict[tuple[str, int, int], str] = {}
        self._meta: dict[str, dict[str, str]] = {}
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.app = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._loaded.clear()
        shutil.rmtree(self._blobs, ignore_errors=True)

    def inject(self, fault: str, *, after: int = 2) -> None:
        """Make the next generation fail after ``after`` pieces: ``"error"`` sends an
        ``{"error": ...}`` line (status 200, as Ollama does when a runner fails),
        ``"cut"`` drops the connection without finishing the reply."""
        if fault not in ("error", "cut"):
            msg = f"unknown fault {fault!r}"
            raise ValueError(msg)
        self._faults.append((fault, after))

    # ------------------------------------------------------------------- routes
    def tags(self) -> dict[str, Any]:
        return {"models": [self._summary(name) for name in self.models]}

    def show(self, body: dict[str, Any]) -> dict[str, Any]:
        name = self._model(body.get("model") or body.get("name"))
        template = self._template(name)
        return {
            "license": "Gemma Terms of Use",
            "modelfile": f"FROM {self.models[name]}\nTEMPLATE {json.dumps(template)}\n",
            "parameters": "",
            "template": template,
            "details": self._details(),
            "model_info": {
                "general.architecture": "gemma3",
                "general.parameter_count": 268098176,
                "gemma3.context_length": self._trained(name),
            },
            "capabilities": template_capabilities(template),
            "modified_at": _now(),
        }

    def ps(self) -> dict[str, Any]:
        """``GET /api/ps``: the loaded models, with the context each runs with."""
        running = []
        for name, (_, ctx) in list(self._loaded.items()):
            running.append(
                {
                    **self._summary(name),
                    "expires_at": _now(),
                    "size_vram": 0,
                    "context_length": ctx,
                }
            )
        return {"models": running}

    def pull(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The status lines of one ``/api/pull`` (see the class docstring)."""
        model = body.get("model") or body.get("name")
        if not model or not isinstance(model, str) or not re.fullmatch(r"[\w./:-]+", model):
            raise _Fail(400, "invalid model name")
        name = _full_name(model)
        yield {"status": "pulling manifest"}
        source = self.library.get(name)
        if source is None:
            yield {"error": "pull model manifest: file does not exist"}
            return
        template = json.dumps(_DEFAULT_TEMPLATE).encode()
        small = {
            "template": template,
            "params": b"{}",
            "license": b"Gemma Terms of Use",
        }
        layers: list[tuple[str, int, Any]] = [(self._digest(source), source.stat().st_size, source)]
        for data in [*small.values(), json.dumps({"model_format": "gguf"}).encode()]:
            layers.append(("sha256:" + hashlib.sha256(data).hexdigest(), len(data), data))
        for digest, size, content in layers:
            yield from self._fetch(digest, size, content)
        yield {"status": "verifying sha256 digest"}
        digest = layers[0][0]
        weights = self._stored(digest)
        if weights is None or self._digest(weights) != digest:
            self._blob(digest).unlink(missing_ok=True)
            yield {"error": f"digest mismatch, file must be downloaded again: {digest}"}
            return
        yield {"status": "writing manifest"}
        self.models[name] = weights
        yield {"status": "success"}

    def _stored(self, digest: str) -> Path | None:
        """Where the store holds the layer: its blob, or a served model's file."""
        blob = self._blob(digest)
        if blob.is_file():
            return blob
        return next((p for p in set(self.models.values()) if self._digest(p) == digest), None)

    def _fetch(self, digest: str, size: int, content: Any) -> Iterator[dict[str, Any]]:
        """Progress lines of one layer; copies it into the blob store in chunks."""
        status = f"pulling {digest[7:19]}"
        blob = self._blob(digest)
        if blob.is_file() or self._stored(digest) is not None:  # present: one line
            yield {"status": status, "digest": digest, "total": size, "completed": size}
            return
        yield {"status": status, "digest": digest, "total": size}  # completed: 0, omitted
        part = blob.with_name(blob.name + "-partial")
        done = 0
        with part.open("wb") as out:
            if isinstance(content, Path):
                with content.open("rb") as f:
                    while chunk := f.read(8 << 20):
                        out.write(chunk)
                        done += len(chunk)
                        yield {"status": status, "digest": digest, "total": size, "completed": done}
            else:
                out.write(content)
                done = len(content)
                yield {"status": status, "digest": digest, "total": size, "completed": done}
        part.rename(blob)

    def _blob(self, digest: str) -> Path:
        return self._blobs / digest.replace(":", "-")

    def _digest(self, path: Path) -> str:
        """``sha256:<hex>`` of a file's content (hashed once per file version)."""
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._digests:
            h = hashlib.sha256()
            with path.open("rb") as f:
                while chunk := f.read(8 << 20):
                    h.update(chunk)
            self._digests[key] = "sha256:" + h.hexdigest()
        return self._digests[key]

    def _trained(self, name: str) -> int:
        """The context the model's GGUF was trained for (its metadata)."""
        path = str(self.models[name])
        if path not in self._meta:
            import llama_cpp

            vocab = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
            self._meta[path] = dict(vocab.metadata)
            vocab.close()
        meta = self._meta[path]
        return int(meta.get(f"{meta.get('general.architecture')}.context_length") or self.n_ctx)

    def generate(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The messages of one ``/api/generate`` reply (the last has ``done: true``)."""
        name = self._model(body.get("model"))
        prompt = body.get("prompt") or ""
        if not isinstance(prompt, str):
            raise _Fail(400, "json: cannot unmarshal prompt into a string")
        if body.get("think") and "thinking" not in template_capabilities(self._template(name)):
            raise _Fail(400, f'"{body["model"]}" does not support thinking')
        if body.get("think"):
            raise _Fail(501, "this loopback emulates think on /api/chat only")
        if body.get("suffix"):
            raise _Fail(400, f"{name} does not support insert")
        if body.get("images"):
            raise _Fail(400, f"{name} does not support image input")
        options = self._options(body)
        grammar = self._grammar(body.get("format"))
        if not prompt:
            unload = body.get("keep_alive") in (0, "0", "0s", "0m")
            if unload:
                self._loaded.pop(name, None)
            yield {
                "model": body["model"], "created_at": _now(), "response": "", "done": True,
                "done_reason": "unload" if unload else "load",
            }  # fmt: skip
            return
        raw = bool(body.get("raw"))
        text = prompt
        template = self._template(name)
        if not raw and not body.get("template") and ".Messages" in template:
            # Ollama's chat-like flow: the system text and the prompt as two messages.
            turns = [{"role": "system", "content": body["system"]}] if body.get("system") else []
            text = self._chat_prompt(name, [*turns, {"role": "user", "content": prompt}], [], False)
        elif not raw:
            try:
                text = render_template(
                    body.get("template") or template,
                    {"System": body.get("system") or "", "Prompt": prompt},
                )
            except ValueError as e:
                raise _Fail(400, str(e)) from e
        fault = self._faults.pop(0) if self._faults else None
        with self._lock:
            yield from self._run(name, body["model"], text, options, grammar, raw, fault)
        if body.get("keep_alive") in (0, "0", "0s", "0m"):
            self._loaded.pop(name, None)

    def chat(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The messages of one ``/api/chat`` reply (see the class docstring)."""
        name = self._model(body.get("model"))
        messages = body.get("messages") or []
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise _Fail(400, "json: cannot unmarshal messages into []api.Message")
        turns = []
        for m in messages:
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content", ""), str):
                raise _Fail(400, "json: cannot unmarshal message into api.Message")
            turns.append({**m, "content": m.get("content") or ""})
        tools = body.get("tools") or []
        if not isinstance(tools, list):
            raise _Fail(400, "json: cannot unmarshal tools into api.Tools")
        template = self._template(name)
        caps = template_capabilities(template)
        if tools and "tools" not in caps:
            raise _Fail(400, f"registry.ollama.ai/library/{name} does not support tools")
        think = body.get("think")
        if "thinking" in caps and think is None:
            think = True  # a thinking model thinks unless told not to
        elif "thinking" not in caps and think not in (None, False):
            raise _Fail(400, f'"{body["model"]}" does not support thinking')
        options = self._options(body)
        grammar = self._grammar(body.get("format"))
        model = body["model"]
        if not turns:
            unload = body.get("keep_alive") in (0, "0", "0s", "0m")
            if unload:
                self._loaded.pop(name, None)
            yield {
                "model": model, "created_at": _now(),
                "message": {"role": "assistant", "content": ""}, "done": True,
                "done_reason": "unload" if unload else "load",
            }  # fmt: skip
            return
        prompt = self._chat_prompt(name, turns, tools, bool(think))
        tags = think_tags(template) if think else None
        thoughts = _ThinkingParser(*tags) if tags else None
        if thoughts is not None and prompt.strip().endswith(thoughts.opening):
            thoughts.add(thoughts.opening)  # the template opened the thought
        calls = _ToolParser(tools) if tools else None
        fault = self._faults.pop(0) if self._faults else None
        with self._lock:
            for out in self._run(name, model, prompt, options, grammar, True, fault):
                if "__fault__" in out:
                    yield out
                    return
                done = bool(out.get("done"))
                content, thinking, found = out.get("response", ""), "", []
                if thoughts is not None:
                    thinking, content = thoughts.add(content)
                if calls is not None:
                    found, content = calls.add(content)
                    if done:
                        content += calls.content()
                if not (content or thinking or found or done):
                    continue  # nothing to say yet
                said: dict[str, Any] = {"role": "assistant", "content": content}
                if thinking:
                    said["thinking"] = thinking
                if found:
                    said["tool_calls"] = found
                reply = {k: v for k, v in out.items() if k not in ("response", "context")}
                yield {**reply, "message": said}
        if body.get("keep_alive") in (0, "0", "0s", "0m"):
            self._loaded.pop(name, None)

    # ------------------------------------------------------------------ helpers
    def _template(self, name: str) -> str:
        return self.templates.get(name, _DEFAULT_TEMPLATE)

    def _chat_prompt(
        self, name: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]], think: bool
    ) -> str:
        template = self._template(name)
        if template in (GEMMA3_TEMPLATE, GEMMA3_THINK_TEMPLATE, GEMMA3_TOOLS_TEMPLATE):
            template = next(
                t for t in (GEMMA3_TEMPLATE, GEMMA3_THINK_TEMPLATE, GEMMA3_TOOLS_TEMPLATE)
                if t == template
            )  # fmt: skip
            return _render_gemma3(template, messages, tools, think)
        if ".Messages" in template:
            msg = "template: this loopback renders only the gemma3 chat templates it defines"
            raise _Fail(500, msg)
        try:
            return _render_legacy(template, messages)
        except ValueError as e:
            raise _Fail(500, str(e)) from e

    def _options(self, body: dict[str, Any]) -> dict[str, Any]:
        options = body.get("options") or {}
        if not isinstance(options, dict):
            raise _Fail(400, "json: cannot unmarshal options into an object")
        for key in sorted(set(options) - KNOWN_OPTIONS):
            self.warnings.append(f"invalid option provided: {key}")
        # Ollama skips null options (langchain_community's client sends every one).
        return {k: v for k, v in options.items() if v is not None}

    def _model(self, model: Any) -> str:
        if not model or not isinstance(model, str):
            raise _Fail(400, "model is required")
        name = _full_name(model)
        if name not in self.models:
            raise _Fail(404, f"model '{model}' not found")
        return name

    def _details(self) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": "gemma3",
            "families": ["gemma3"],
            "parameter_size": "268.10M",
            "quantization_level": "Q4_K_M",
        }

    def _summary(self, name: str) -> dict[str, Any]:
        path = self.models[name]
        size = path.stat().st_size
        return {
            "name": name,
            "model": name,
            "modified_at": _now(),
            "size": size,
            "digest": hashlib.sha256(f"{path}:{size}".encode()).hexdigest(),
            "details": self._details(),
        }

    def _grammar(self, fmt: Any) -> Any:
        if fmt is None or fmt == "":
            return None
        from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

        if fmt == "json":
            return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
        if not isinstance(fmt, dict):
            raise _Fail(
                400, f'invalid format: {json.dumps(fmt)}; expected "json" or a valid JSON schema'
            )
        try:
            return LlamaGrammar.from_json_schema(json.dumps(fmt), verbose=False)
        except Exception as e:
            raise _Fail(400, f"invalid JSON schema in format: {e}") from e

    def _context(self, name: str, options: dict[str, Any]) -> int:
        """The context the model runs with: num_ctx, else the default; at most trained."""
        asked = int(options.get("num_ctx") or self.n_ctx)
        return max(min(asked, self._trained(name)), 8)

    def _llama(self, name: str, ctx: int) -> tuple[Any, int]:
        """The loaded model and the nanoseconds its loading took now (0: was loaded).

        A model loaded with another context is loaded again, as Ollama reloads it."""
        if name in self._loaded and self._loaded[name][1] == ctx:
            return self._loaded[name][0], 0
        self._loaded.pop(name, None)
        for other, (llama, other_ctx) in list(self._loaded.items()):
            if self.models[other] == self.models[name] and other_ctx == ctx:
                self._loaded[name] = (llama, ctx)  # one runner per model file
                return llama, 0
        import llama_cpp

        t0 = time.perf_counter_ns()
        llama = llama_cpp.Llama(
            model_path=str(self.models[name]), n_ctx=ctx, n_threads=self.threads,
            n_threads_batch=self.threads, verbose=False,
        )  # fmt: skip
        _sample_as_ollama(llama)
        self._loaded[name] = (llama, ctx)
        return llama, time.perf_counter_ns() - t0

    def _run(
        self,
        name: str,
        model: str,
        text: str,
        options: dict[str, Any],
        grammar: Any,
        raw: bool,
        fault: tuple[str, int] | None,
    ) -> Iterator[dict[str, Any]]:
        import llama_cpp

        start = time.perf_counter_ns()
        ctx = self._context(name, options)
        llama, load_ns = self._llama(name, ctx)
        tokens = llama.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        # Ollama's runner: num_keep (default 4) plus the BOS token, at most num_ctx - 1.
        keep = min(int(options.get("num_keep", 4)) + 1, ctx - 1)
        if len(tokens) > ctx:  # cut to exactly num_ctx tokens, with no error
            discard = len(tokens) - ctx
            tokens = tokens[:keep] + tokens[keep + discard :]
            self.log.append(f"truncating input prompt limit={ctx} keep={keep}")
            del self.log[:-50]
        self.reused.append(_common_prefix(llama, tokens))
        del self.reused[:-50]
        limit = int(options.get("num_predict", -1))
        if limit < 0:
            limit = ctx - len(tokens)
        seed = options.get("seed")
        llama.set_seed(int(seed) if seed is not None and seed >= 0 else random.randrange(2**31))
        stops = _Stops(options.get("stop") or [])
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        steps = _decode(
            llama,
            tokens,
            ctx,
            keep,
            top_k=int(options.get("top_k", 40)),
            top_p=float(options.get("top_p", 0.9)),
            min_p=float(options.get("min_p", 0.0)),
            typical_p=float(options.get("typical_p", 1.0)),
            temp=float(options.get("temperature", 0.8)),
            repeat_penalty=float(options.get("repeat_penalty", 1.1)),
            presence_penalty=float(options.get("presence_penalty", 0.0)),
            frequency_penalty=float(options.get("frequency_penalty", 0.0)),
            grammar=grammar,
        )
        generated: list[int] = []
        first_ns = None
        reason = "length"
        pieces = 0
        try:
            while len(generated) < limit:
                token = next(steps, None)
                if first_ns is None:
                    first_ns = time.perf_counter_ns()
                if token is None or llama_cpp.llama_vocab_is_eog(llama._model.vocab, token):
                    reason = "stop"
                    break
                generated.append(token)
                piece = stops.add(decoder.decode(llama.detokenize([token])))
                if piece:
                    if fault is not None and pieces >= fault[1]:
                        yield {"__fault__": fault[0]}
                        return
                    pieces += 1
                    yield {"model": model, "created_at": _now(), "response": piece, "done": False}
                if stops.stopped:
                    reason = "stop"
                    break
            tail = "" if stops.stopped else stops.add(decoder.decode(b"", final=True), end=True)
            if tail:
                yield {"model": model, "created_at": _now(), "response": tail, "done": False}
        finally:
            steps.close()
        end = time.perf_counter_ns()
        first_ns = first_ns or end
        final: dict[str, Any] = {
            "model": model,
            "created_at": _now(),
            "response": "",
            "done": True,
            "done_reason": reason,
            "total_duration": end - start,
            "load_duration": load_ns,
            "prompt_eval_count": len(tokens),
            "prompt_eval_duration": max(first_ns - start - load_ns, 1),
            "eval_count": len(generated),
            "eval_duration": max(end - first_ns, 1),
        }
        if not raw:
            final["context"] = [int(t) for t in tokens] + generated
        yield final


def _common_prefix(llama: Any, tokens: list[int]) -> int:
    """Prompt tokens already in the model's KV cache (llama-cpp-python reuses them)."""
    cached = list(llama._input_ids[: llama.n_tokens])
    n = 0
    for a, b in zip(cached, tokens, strict=False):
        if a != b:
            break
        n += 1
    return n


class _GrammarLast:
    """Ollama's sampler with a grammar (``sample/samplers.go`` ``Sampler.Sample``): the
    token is sampled without the grammar, and only when the grammar rejects it is the
    grammar applied to the whole vocabulary and the token sampled again. (llama.cpp's
    chain applies the grammar to all 262k candidates every step.) The two chains keep
    the same history, so greedy decoding picks what the grammar-first chain picks."""

    def __init__(self, free: Any, full: Any, model: Any, grammar: Any, last_n: int) -> None:
        import llama_cpp

        self._llama_cpp = llama_cpp
        self.free, self.full, self.last_n = free, full, last_n
        self.check = llama_cpp.llama_sampler_init_grammar(
            model.vocab, grammar._grammar.encode("utf-8"), grammar._root.encode("utf-8")
        )
        self.history: list[int] = []

    def sample(self, ctx: Any, idx: int = -1) -> int:
        lc = self._llama_cpp
        token = self.free.sample(ctx, idx)
        one = (lc.llama_token_data * 1)(lc.llama_token_data(token, 0.0, 0.0))
        candidates = lc.llama_token_data_array(
            ctypes.cast(one, lc.llama_token_data_p), 1, -1, False
        )
        lc.llama_sampler_apply(self.check, ctypes.byref(candidates))
        if one[0].logit != float("-inf"):
            self.full.accept(token)
        else:  # rejected: the grammar on every candidate, and sample again
            token = self.full.sample(ctx, idx)
            self.free.reset()  # it took the rejected token: give it the true history
            for t in self.history[-self.last_n :]:
                self.free.accept(t)
            self.free.accept(token)
        lc.llama_sampler_accept(self.check, token)
        self.history.append(token)
        return token

    def accept(self, token: int) -> None:
        self.free.accept(token)
        self.full.accept(token)
        self._llama_cpp.llama_sampler_accept(self.check, token)
        self.history.append(token)

    def close(self) -> None:
        if self.check is not None:
            self._llama_cpp.llama_sampler_free(self.check)
            self.check = None
        self.free.close()
        self.full.close()

    def __del__(self) -> None:
        self.close()


def _sample_as_ollama(llama: Any) -> None:
    """Make ``llama`` sample under a grammar as Ollama does (:class:`_GrammarLast`)."""
    init = llama._init_sampler

    def init_sampler(**kwargs: Any) -> Any:
        grammar = kwargs.get("grammar")
        if grammar is None:
            return init(**kwargs)
        free = init(**{**kwargs, "grammar": None})
        return _GrammarLast(free, init(**kwargs), llama._model, grammar, llama.last_n_tokens_size)

    llama._init_sampler = init_sampler


def _decode(llama: Any, tokens: list[int], ctx: int, keep: int, **sampling: Any) -> Iterator[int]:
    """Tokens generated after ``tokens``, shifting the context as Ollama's runner does.

    When the context is full, half of what follows the first ``keep`` tokens is
    dropped and generation goes on (Ollama's ``shiftContext``); llama-cpp-python
    evaluates the shifted window again where Ollama moves its KV cache.
    """
    window = list(tokens)
    while True:
        steps = llama.generate(list(window), **sampling)
        try:
            for token in steps:
                yield token
                window.append(token)
                if len(window) >= ctx:
                    discard = (len(window) - keep) // 2
                    window = window[:keep] + window[keep + discard :]
                    break
            else:
                return
        finally:
            steps.close()


class _Stops:
    """The server's own stop handling: text is sent once no stop can start in it.

    Simpler than a client's (it always holds back the longest stop's length less one
    character), and written apart from the package so the test double does not share
    the code it tests.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.sent = 0
        self.stopped = False

    def add(self, piece: str, *, end: bool = False) -> str:
        self.text += piece
        hits = [i for i in (self.text.find(s) for s in self.stops) if i != -1]
        if hits:
            self.stopped = True
            upto = min(hits)
        else:
            upto = len(self.text) if end else max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent : upto], max(self.sent, upto)
        return out


def _full_name(model: str) -> str:
    return model if ":" in model.rsplit("/", 1)[-1] else f"{model}:latest"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "OllamaLoopback"

    @property
    def app(self) -> OllamaLoopback:
        return self.server.app  # type: ignore[attr-defined,no-any-return]

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # ---------------------------------------------------------------- plumbing
    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json; charset=utf-8")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _record(self, body: Any) -> None:
        self.app.requests.append(
            {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body}
        )
        del self.app.requests[:-50]

    def _authorized(self) -> bool:
        need = self.app.require_auth
        if need is None:
            return True
        token = base64.b64encode(f"{need[0]}:{need[1]}".encode()).decode()
        if self.headers.get("Authorization") == f"Basic {token}":
            return True
        self._send(401, b"Unauthorized", "text/plain; charset=utf-8")
        return False

    # ------------------------------------------------------------------ routes
    def do_GET(self) -> None:
        self._record(None)
        if not self._authorized():
            return
        if self.path == "/":
            self._send(200, b"Ollama is running", "text/plain; charset=utf-8")
        elif self.path == "/api/version":
            self._json(200, {"version": "0.12.0"})
        elif self.path == "/api/tags":
            self._json(200, self.app.tags())
        elif self.path == "/api/ps":
            self._json(200, self.app.ps())
        else:
            self._send(404, b"404 page not found", "text/plain; charset=utf-8")

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            self._record(raw)
            self._json(400, {"error": "invalid character in request body"})
            return
        self._record(body)
        if not self._authorized():
            return
        try:
            if self.path == "/api/show":
                self._json(200, self.app.show(body))
            elif self.path == "/api/generate":
                self._generate(body)
            elif self.path == "/api/chat":
                self._chat(body)
            elif self.path == "/api/pull":
                self._pull(body)
            else:
                self._send(404, b"404 page not found", "text/plain; charset=utf-8")
        except _Fail as e:
            self._json(e.status, {"error": e.error})

    def _pull(self, body: dict[str, Any]) -> None:
        """``/api/pull``: NDJSON status lines; with ``"stream": false`` one object (and
        HTTP 500 for an error), as Ollama's PullHandler answers."""
        lines = self.app.pull(body)
        first = next(lines)  # a bad name fails here, with its HTTP status
        if body.get("stream") is False:
            last = first
            for last in _chain(first, lines):
                if "error" in last:
                    self._json(500, last)
                    return
            self._json(200, last)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for line in _chain(first, lines):
                self._chunk(json.dumps(line).encode() + b"\n")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:  # the client went away; a later pull resumes
            self.close_connection = True
        finally:
            lines.close()

    def _generate(self, body: dict[str, Any]) -> None:
        messages = self.app.generate(body)
        first = next(messages)  # errors in the request surface here, before any reply
        try:
            if first.get("done") or body.get("stream") is False:
                self._whole(first, messages)
            else:
                self._stream(first, messages)
        except OSError:  # the client went away: stop generating, as Ollama does
            self.close_connection = True
        finally:
            messages.close()  # ends generation and frees the model for the next request

    def _chat(self, body: dict[str, Any]) -> None:
        messages = self.app.chat(body)
        first = next(messages)  # errors in the request surface here, before any reply
        try:
            if first.get("done") or body.get("stream") is False:
                self._whole_chat(first, messages)
            else:
                self._stream(first, messages)
        except OSError:
            self.close_connection = True
        finally:
            messages.close()

    def _whole_chat(self, first: dict[str, Any], messages: Iterator[dict[str, Any]]) -> None:
        """``"stream": false`` on ``/api/chat``: one object holding the whole message."""
        said: dict[str, Any] = {"role": "assistant", "content": ""}
        final = None
        for message in _chain(first, messages):
            if "__fault__" in message:
                self._json(500, {"error": "an error was encountered while running the model"})
                return
            part = message.get("message") or {}
            said["content"] += part.get("content") or ""
            if part.get("thinking"):
                said["thinking"] = said.get("thinking", "") + part["thinking"]
            if part.get("tool_calls"):
                said["tool_calls"] = [*said.get("tool_calls", []), *part["tool_calls"]]
            final = message
        assert final is not None
        self._json(200, {**final, "message": said})

    def _whole(self, first: dict[str, Any], messages: Iterator[dict[str, Any]]) -> None:
        """``"stream": false``: one JSON object holding the whole answer."""
        text, final = "", None
        for message in _chain(first, messages):
            if "__fault__" in message:
                self._json(500, {"error": "an error was encountered while running the model"})
                return
            text += message.get("response", "")
            final = message
        assert final is not None
        self._json(200, {**final, "response": text})

    def _stream(self, first: dict[str, Any], messages: Iterator[dict[str, Any]]) -> None:
        """NDJSON in HTTP chunks, one message per line, as Ollama streams."""
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for message in _chain(first, messages):
            if message.get("__fault__") == "cut":  # die mid-answer: no final chunk
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            if message.get("__fault__") == "error":  # Ollama: an error line, status 200
                message = {"error": "an error was encountered while running the model: EOF"}
            self._chunk(json.dumps(message).encode() + b"\n")
            if "error" in message:
                break
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def _chain(first: dict[str, Any], rest: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    yield first
    yield from rest
