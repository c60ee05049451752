"""The llama.cpp HTTP server (``llama-server``, and the llamafile fork), over ``/completion``.

Both dialects: the upstream server's ``stop_type`` / ``timings`` and the fork's
``stopped_*`` flags; constraints as ``grammar`` (GBNF) or ``json_schema`` (what the
server's converter enforces: :mod:`langchain_localllms.grammars.schemas`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from typing_extensions import override

from langchain_localllms.core.events import Tally
from langchain_localllms.core.http import Endpoint, Framing
from langchain_localllms.core.requests import Call
from langchain_localllms.engines.server import ServerEngine
from langchain_localllms.grammars import Grammar, json_schema_of
from langchain_localllms.grammars.schemas import prepare

#: Fields sent as they are in the /completion body when set (None: server default).
SAMPLING = (
    "n_predict", "temperature", "top_k", "top_p", "min_p", "tfs_z", "typical_p",
    "repeat_penalty", "repeat_last_n", "penalize_nl", "presence_penalty",
    "frequency_penalty", "mirostat", "mirostat_tau", "mirostat_eta", "seed", "n_keep",
    "ignore_eos", "logit_bias", "n_probs", "cache_prompt",
)  # fmt: skip


def json_schema_field(value: Any) -> dict[str, Any] | None:
    """A JSON schema from a dict, JSON text, a pydantic model or a schema Grammar."""
    if value is None:
        return None
    refused = "json_schema needs a JSON schema; a GBNF grammar goes in grammar="
    return json_schema_of(value, field="json_schema", gbnf_refused=refused)


def constraint(grammar: Any, json_schema: Any) -> dict[str, Any]:
    """The body fields of a grammar or a JSON schema (give one, not both)."""
    if grammar is not None and json_schema is not None:
        msg = "give grammar or json_schema, not both"
        raise ValueError(msg)
    if json_schema is not None:
        return {"json_schema": json_schema_field(json_schema)}
    if grammar is None:
        return {}
    g: Grammar = grammar
    if g.schema is None:
        return {"grammar": g.gbnf}
    # What the server's converter cannot enforce is refused, or left out where the
    # grammar is lenient (strict=False): the answer is validated against it after.
    return {"json_schema": prepare(g.schema, "llama.cpp server", strict=not g.lenient, warn=False)}


class LlamaServerEngine(ServerEngine):
    """One llama.cpp server (or llamafile): ``/completion``, ``/props``, ``/tokenize``.

    Args:
        endpoint: Where the server is.
        streaming: Ask for Server-Sent Events (False: one reply).
        extra_body: More ``/completion`` fields, sent as they are.
    """

    route: ClassVar[str] = "/completion"
    framing: ClassVar[Framing] = "sse"
    #: llama.cpp's server closes the connection after every streamed reply; saying so
    #: keeps a dead connection out of the pool.
    stream_headers: ClassVar[dict[str, str] | None] = {"Connection": "close"}
    slots_probe: ClassVar[tuple[str, str] | None] = ("/props", "total_slots")

    def __init__(
        self, endpoint: Endpoint, *, streaming: bool = True, extra_body: Mapping[str, Any] = {}
    ) -> None:
        super().__init__(endpoint, streaming=streaming)
        self.extra_body = dict(extra_body)

    @override
    def body(self, prompt: str, call: Call) -> dict[str, Any]:
        p = call.params
        body: dict[str, Any] = {"prompt": prompt, "stream": self.streaming}
        body.update({k: p[k] for k in SAMPLING if p[k] is not None})
        if call.stops:
            body["stop"] = call.stops
        body.update(constraint(p["grammar"], p["json_schema"]))
        if p["id_slot"] is not None:
            body["id_slot"] = body["slot_id"] = p["id_slot"]
        body.update(self.extra_body)
        return body

    @override
    def is_final(self, message: dict[str, Any]) -> bool:
        return message.get("stop") is True

    @override
    def take(self, message: dict[str, Any], tally: Tally) -> str:
        content = message.get("content") or ""
        predicted = message.get("tokens_predicted")
        if isinstance(predicted, int):
            tally.completion_tokens = predicted
        elif content and not self.is_final(message):
            tally.completion_tokens += 1  # the fork's pieces carry no count: one token each
        if isinstance(message.get("tokens_evaluated"), int):
            tally.prompt_tokens = message["tokens_evaluated"]
        probs = message.get("completion_probabilities")
        if probs:
            tally.extra.setdefault("completion_probabilities", []).extend(probs)
        if self.is_final(message):
            _finish(message, tally)
        return str(content)

    @override
    def describe_status(self, status: int, text: str) -> str | None:
        url = self.endpoint.url
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

    def props(self) -> dict[str, Any]:
        """``GET /props``: the chat template, the model file, slots."""
        return dict(self.endpoint.request_json("/props", method="GET"))

    def token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` in the served model's vocabulary (``POST /tokenize``)."""
        reply = self.endpoint.request_json("/tokenize", {"content": text})
        return [int(t) for t in reply["tokens"]]


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
