"""A llamafile (or any llama.cpp HTTP server), through its ``/completion`` route."""

from __future__ import annotations

import struct
from typing import Annotated, Any, ClassVar

from pydantic import BeforeValidator, Field

from langchain_localllms._base import Call
from langchain_localllms._http import Framing
from langchain_localllms._usage import Tally
from langchain_localllms.grammars import Grammar, GrammarField, json_schema_of
from langchain_localllms.grammars.schemas import prepare
from langchain_localllms.llms._server import ServerLLM
from langchain_localllms.prompts import ModelInfo


def _json_schema(value: Any) -> dict[str, Any] | None:
    """A JSON schema from a dict, JSON text, a pydantic model or a schema Grammar."""
    if value is None:
        return None
    refused = "json_schema needs a JSON schema; a GBNF grammar goes in grammar="
    return json_schema_of(value, field="json_schema", gbnf_refused=refused)


#: Fields sent as they are in the /completion body when set (None: server default).
_SAMPLING = (
    "n_predict", "temperature", "top_k", "top_p", "min_p", "tfs_z", "typical_p",
    "repeat_penalty", "repeat_last_n", "penalize_nl", "presence_penalty",
    "frequency_penalty", "mirostat", "mirostat_tau", "mirostat_eta", "seed", "n_keep",
    "ignore_eos", "logit_bias", "n_probs", "cache_prompt",
)  # fmt: skip


class Llamafile(ServerLLM):
    """A llamafile, or any llama.cpp HTTP server (``llama-server``), over HTTP.

    Speaks ``POST {base_url}/completion`` of both the upstream llama.cpp server and
    the llamafile fork: streamed Server-Sent Events, usage and timings from the
    server's ``timings``, stop sequences applied by the server (and named in
    ``generation_info["stop_sequence"]``). Connections are pooled, async calls are
    native (no thread per call), and ``batch``/``abatch`` send one request per
    server slot at once (``--parallel N``, read from ``/props``), so the server
    decodes them together.

    Setup:
        Download a llamafile, make it executable and start its server:

        .. code-block:: bash

            chmod +x TinyLlama-1.1B-Chat-v1.0.Q5_K_M.llamafile
            ./TinyLlama-1.1B-Chat-v1.0.Q5_K_M.llamafile --server --nobrowser
            # or llama.cpp's own: llama-server -m model.gguf --parallel 4

    Key init args:
        base_url: where the server listens (``http://localhost:8080``).
        n_predict: most tokens per answer (256; -1 means until the model stops).
        temperature, top_k, top_p, min_p, repeat_penalty, seed, ...: sampling; unset
            ones keep the server's defaults.
        grammar / json_schema: constrain the output (GBNF, JSON schema, pydantic).
        max_concurrency: requests of a batch sent at once (default: the server's
            slot count, or 4 if it does not report one).
        request_timeout: seconds to wait for the server (None: no limit).

    Instantiate:
        .. code-block:: python

            from langchain_localllms import Llamafile

            llm = Llamafile(temperature=0, n_predict=64)

    Invoke:
        .. code-block:: python

            llm.invoke("The first man on the moon was ... Let's think step by step.")

    Stream:
        .. code-block:: python

            for piece in llm.stream("The first man on the moon was"):
                print(piece, end="", flush=True)

    Async:
        .. code-block:: python

            await llm.ainvoke("The first man on the moon was")
            await llm.abatch(["Tell me a joke.", "Tell me a fact."])
    """

    base_url: str = "http://localhost:8080"
    """Where the llamafile / llama.cpp server listens; ``user:pass@`` in it is sent as
    basic auth (and never shown)."""
    request_timeout: float | None = Field(default=None, gt=0)
    """Seconds to wait for the server to connect and between two pieces of an answer;
    None waits as long as generation takes."""

    n_predict: int = Field(default=256, ge=-1)
    """Most tokens to generate per answer; -1: until the model stops or the context is
    full. Bounded by default: a base model may never stop on its own."""
    temperature: float | None = Field(default=None, ge=0)
    """Sampling temperature; 0 is greedy. None: the server's default (0.8)."""
    top_k: int | None = Field(default=None, ge=0)
    """Sample from the k most likely tokens (0: all). Server default 40."""
    top_p: float | None = Field(default=None, ge=0, le=1)
    """Nucleus sampling: the smallest set of tokens whose probabilities sum to p.
    Server default 0.95."""
    min_p: float | None = Field(default=None, ge=0, le=1)
    """Drop tokens less likely than min_p times the most likely one. Server default
    0.05."""
    tfs_z: float | None = Field(default=None, ge=0)
    """Tail-free sampling (1: off). Only the llamafile fork has it; llama.cpp ignores it."""
    typical_p: float | None = Field(default=None, ge=0, le=1)
    """Locally typical sampling (1: off)."""
    repeat_penalty: float | None = Field(default=None, ge=0)
    """Penalty for repeating recent tokens (1: off). Server default 1.0 (llama.cpp) or
    1.1 (llamafile)."""
    repeat_last_n: int | None = Field(default=None, ge=-1)
    """How many recent tokens the repeat penalty looks at (0: off, -1: the context)."""
    penalize_nl: bool | None = None
    """Apply the repeat penalty to newlines too. Only the llamafile fork has it."""
    presence_penalty: float | None = None
    """Penalty for any token that already appeared (0: off)."""
    frequency_penalty: float | None = None
    """Penalty growing with how often a token already appeared (0: off)."""
    mirostat: int | None = Field(default=None, ge=0, le=2)
    """Mirostat sampling: 0 off, 1 Mirostat, 2 Mirostat 2.0."""
    mirostat_tau: float | None = None
    """Mirostat target entropy (server default 5.0)."""
    mirostat_eta: float | None = None
    """Mirostat learning rate (server default 0.1)."""
    seed: int | None = None
    """Sampling seed; -1 or None: a random one per request."""
    n_keep: int | None = Field(default=None, ge=-1)
    """Prompt tokens kept when the context overflows (-1: all)."""
    ignore_eos: bool | None = None
    """Keep generating past the end-of-text token (until n_predict)."""
    logit_bias: list[Any] | dict[str, float] | None = None
    """Bias of token likelihoods, as the server takes it: ``[[token_id, bias], ...]``
    (``false`` as bias bans a token)."""
    n_probs: int | None = Field(default=None, ge=0)
    """Also return the top-n token probabilities of each step, in
    ``generation_info["completion_probabilities"]``."""
    cache_prompt: bool | None = None
    """Reuse the KV cache of a previous request with the same prompt prefix. Server
    default: on in llama.cpp, off in llamafile."""
    id_slot: int | None = None
    """Run on this server slot (sent as ``id_slot`` and the fork's ``slot_id``);
    None: the server picks one."""
    grammar: GrammarField = None
    """Constrain the output: GBNF text, a :class:`Grammar`, a JSON-schema dict or a
    pydantic model. GBNF is sent as ``grammar``; a schema as ``json_schema``, which
    the llamafile fork lacks: there, send ``Grammar.from_json_schema(s).gbnf``
    (converted here by llama-cpp-python)."""
    json_schema: Annotated[Any, BeforeValidator(_json_schema)] = None
    """Constrain the output to JSON matching this schema (a dict, JSON text or a
    pydantic model); upstream llama.cpp only. Give this or grammar, not both."""
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    """More fields for the ``/completion`` body (e.g. ``dry_multiplier``), sent as
    they are. Fields of this class go in their own arguments."""

    _schema_engine: ClassVar[str | None] = "llama.cpp server"
    _tool_schema_engine: ClassVar[str | None] = "llama-cpp-python converter"
    _call_fields: ClassVar[tuple[str, ...]] = (
        *_SAMPLING, "grammar", "json_schema", "id_slot",
    )  # fmt: skip
    _temperature_field: ClassVar[str | None] = "temperature"
    _max_tokens_field: ClassVar[str | None] = "n_predict"

    _server_name: ClassVar[str] = "the llamafile server"
    _start_hint: ClassVar[str] = (
        "Start it with `./your-model.llamafile --server --nobrowser` (or "
        "`llama-server -m model.gguf`), or set base_url to where it listens."
    )
    _timeout_field: ClassVar[str] = "request_timeout"
    _route: ClassVar[str] = "/completion"
    _stream_framing: ClassVar[Framing] = "sse"
    #: llama.cpp's server closes the connection after every streamed reply; saying so
    #: keeps a dead connection out of the pool.
    _stream_headers: ClassVar[dict[str, str] | None] = {"Connection": "close"}
    _slots_probe: ClassVar[tuple[str, str] | None] = ("/props", "total_slots")

    def _setup(self) -> None:
        super()._setup()
        reserved = set(type(self).model_fields) | {"prompt", "stream", "stop", "slot_id"}
        clash = sorted(set(self.model_kwargs) & reserved)
        if clash:
            msg = f"model_kwargs may not set {', '.join(clash)}: give them as arguments"
            raise ValueError(msg)
        self._constraint(self.grammar, self.json_schema)

    @property
    def _llm_type(self) -> str:
        return "llamafile"

    def _identity(self) -> dict[str, Any]:
        return {"model_kwargs": self.model_kwargs, **super()._identity()}

    # ----------------------------------------------------------------- request
    @staticmethod
    def _constraint(grammar: Any, json_schema: Any) -> dict[str, Any]:
        if grammar is not None and json_schema is not None:
            msg = "give grammar or json_schema, not both"
            raise ValueError(msg)
        if json_schema is not None:
            return {"json_schema": _json_schema(json_schema)}
        if grammar is None:
            return {}
        g: Grammar = grammar
        if g.schema is None:
            return {"grammar": g.gbnf}
        # What the server's converter cannot enforce is refused, or left out where the
        # grammar is lenient (strict=False): the answer is validated against it after.
        return {
            "json_schema": prepare(g.schema, "llama.cpp server", strict=not g.lenient, warn=False)
        }

    def _body(self, prompt: str, call: Call) -> dict[str, Any]:
        p = call.params
        body: dict[str, Any] = {"prompt": prompt, "stream": self.streaming}
        body.update({k: p[k] for k in _SAMPLING if p[k] is not None})
        if call.stops:
            body["stop"] = call.stops
        body.update(self._constraint(p["grammar"], p["json_schema"]))
        if p["id_slot"] is not None:
            body["id_slot"] = body["slot_id"] = p["id_slot"]
        body.update(self.model_kwargs)
        return body

    # ------------------------------------------------------------------- reply
    def _is_final(self, message: dict[str, Any]) -> bool:
        return message.get("stop") is True

    def _take(self, message: dict[str, Any], tally: Tally) -> str:
        content = message.get("content") or ""
        predicted = message.get("tokens_predicted")
        if isinstance(predicted, int):
            tally.completion_tokens = predicted
        elif content and not self._is_final(message):
            tally.completion_tokens += 1  # the fork's pieces carry no count: one token each
        if isinstance(message.get("tokens_evaluated"), int):
            tally.prompt_tokens = message["tokens_evaluated"]
        probs = message.get("completion_probabilities")
        if probs:
            tally.extra.setdefault("completion_probabilities", []).extend(probs)
        if self._is_final(message):
            _finish(message, tally)
        return str(content)

    def _describe_status(self, status: int, text: str) -> str | None:
        url = self._endpoint().url
        if status == 404:
            return (
                f"{url} has no /completion route (HTTP 404: {text}). Is it "
                "a llamafile or llama.cpp server? (Ollama listens on port 11434 and "
                "speaks /api/generate: use langchain_localllms.Ollama for it.)"
            )
        if status == 503:
            return (
                f"the llamafile server at {url} is not ready (HTTP 503: "
                f"{text}); it is still loading the model, try again in a moment"
            )
        return None

    # ------------------------------------------------------------------ extras
    def model_info(self) -> ModelInfo:
        """The chat template and model file the server reports (``GET /props``).

        The template is the one the server uses for chat: the model file's own, or
        llama.cpp's fallback (ChatML) when the file carries none. The architecture is
        read from the GGUF file's header where the server runs on this machine (the
        file at the reported ``model_path`` can be read), else it is None.
        """
        props = self._endpoint().request_json("/props", method="GET")
        settings = props.get("default_generation_settings") or {}
        path = props.get("model_path") or settings.get("model") or "llamafile"
        return ModelInfo(
            runtime=self._llm_type,
            model=str(path).rsplit("/", 1)[-1],
            architecture=_gguf_architecture(str(path)),
            chat_template=props.get("chat_template") or None,
            bos_token=props.get("bos_token") or "",
            eos_token=props.get("eos_token") or "",
            adds_bos=True,  # the server tokenizes with the model's own start token
        )

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` in the served model's vocabulary (``POST /tokenize``)."""
        reply = self._endpoint().request_json("/tokenize", {"content": text})
        return [int(t) for t in reply["tokens"]]


#: Sizes of GGUF's fixed-size metadata value types (by type id).
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _gguf_architecture(path: str) -> str | None:
    """``general.architecture`` from a GGUF file's header; None if it cannot be read.

    Reads the metadata up to that key (llama.cpp writes it first), never the weights.
    """
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF" or struct.unpack("<I", f.read(4))[0] < 2:
                return None
            _, n_kv = struct.unpack("<QQ", f.read(16))

            def string() -> bytes:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > 1 << 20:
                    raise ValueError(n)
                return f.read(n)

            for _ in range(min(n_kv, 64)):
                key = string()
                (kind,) = struct.unpack("<I", f.read(4))
                if kind == _GGUF_STRING:
                    value = string()
                    if key == b"general.architecture":
                        return value.decode("utf-8")
                elif kind in _GGUF_SIZES:
                    f.seek(_GGUF_SIZES[kind], 1)
                elif kind == _GGUF_ARRAY:
                    item, count = struct.unpack("<IQ", f.read(12))
                    if item not in _GGUF_SIZES:
                        return None  # an array of strings (the vocabulary): stop here
                    f.seek(_GGUF_SIZES[item] * count, 1)
                else:
                    return None
    except (OSError, ValueError, struct.error, UnicodeDecodeError):
        return None
    return None


def _finish(message: dict[str, Any], tally: Tally) -> None:
    """Usage, timings and the stop reason from the final message (both dialects)."""
    timings = message.get("timings") or {}
    prompt = message.get("tokens_evaluated", timings.get("prompt_n"))
    predicted = message.get("tokens_predicted", timings.get("predicted_n"))
    if isinstance(prompt, int):
        tally.prompt_tokens = prompt
    if isinstance(predicted, int):
        tally.completion_tokens = predicted
    if isinstance(timings.get("prompt_ms"), (int, float)):
        tally.prompt_ms = float(timings["prompt_ms"])
    if isinstance(timings.get("predicted_ms"), (int, float)):
        tally.completion_ms = float(timings["predicted_ms"])
    stop_type = message.get("stop_type")
    if stop_type is not None:  # upstream llama.cpp: none | eos | limit | word
        limit, word = stop_type == "limit", stop_type == "word"
    else:  # the llamafile fork
        limit, word = bool(message.get("stopped_limit")), bool(message.get("stopped_word"))
    tally.finish_reason = "length" if limit else "stop"
    if word and message.get("stopping_word"):
        tally.stop_sequence = str(message["stopping_word"])
    if message.get("model"):
        tally.extra["model"] = message["model"]
    if message.get("truncated"):
        tally.extra["prompt_truncated"] = True


__all__ = ["Llamafile"]
