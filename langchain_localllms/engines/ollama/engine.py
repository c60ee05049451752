"""Ollama's HTTP API: generate, chat, pulls, and what the server tells about a model.

``/api/generate`` and ``/api/chat``; ``/api/pull``; ``/api/show``, ``/api/ps`` and
``/api/tags``.

Ollama has no tokenizer route: where the server runs on this machine, token counts
are read from the GGUF it runs (:func:`~langchain_localllms.engines.gguf.gguf_token_ids`).
Ollama cuts a prompt longer than its context without an error; the engine reads
that from ``prompt_eval_count`` and raises :class:`ContextOverflowError` (or warns,
with ``truncate``).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

from typing_extensions import override

from langchain_localllms.core.errors import (
    ContextOverflowError,
    IncompleteResponseError,
    ServerError,
)
from langchain_localllms.core.events import Tally, Thinking, ToolCallPiece
from langchain_localllms.core.http import Endpoint, Framing
from langchain_localllms.core.requests import Call, ChatRequest
from langchain_localllms.engines.gguf import gguf_token_ids
from langchain_localllms.engines.ollama.context import (
    SERVED_CONTEXT_FLOOR,
    full_name,
    modelfile_context,
    overflowed,
    served_context,
    trained_context,
)
from langchain_localllms.engines.ollama.pull import (
    PullBars,
    PullProgress,
    pull_error,
    pull_finished,
)
from langchain_localllms.engines.server import LOOKUP_ERRORS, ServerEngine
from langchain_localllms.grammars import Grammar, json_schema_of

_log = logging.getLogger("langchain_localllms")

#: Fields of ``/api/generate`` that ``/api/chat`` does not take.
GENERATE_ONLY = ("system", "template", "raw", "suffix", "images")
#: Our fields that go at the top level of an ``/api/chat`` request.
CHAT_TOP_LEVEL = ("format", "keep_alive", "think")


def capabilities_of(info: dict[str, Any]) -> frozenset[str]:
    """What a model can do, from its ``/api/show`` reply.

    Ollama 0.6+ lists ``capabilities`` (``completion``, ``tools``, ``thinking``,
    ``vision``, ``insert``, ``embedding``). Older servers do not: then they are
    read from the template as Ollama itself infers them (``.Tools`` for tools,
    ``.Thinking`` for thinking).
    """
    listed = info.get("capabilities")
    if isinstance(listed, list):
        return frozenset(str(c) for c in listed)
    template = str(info.get("template") or "")
    found = {"completion"}
    if ".Tools" in template:
        found.add("tools")
    if ".Thinking" in template:
        found.add("thinking")
    return frozenset(found)


#: Our fields that go in ``options``: exactly the option keys Ollama knows.
OPTIONS = (
    "num_keep", "seed", "num_predict", "top_k", "top_p", "min_p", "typical_p",
    "repeat_last_n", "temperature", "repeat_penalty", "presence_penalty",
    "frequency_penalty", "num_ctx", "num_batch", "num_gpu", "main_gpu", "use_mmap",
    "num_thread",
)  # fmt: skip
#: Our fields that go at the top level of the request.
TOP_LEVEL = ("system", "template", "raw", "format", "keep_alive", "think", "suffix", "images")


def format_field(value: Any) -> str | dict[str, Any] | None:
    """Ollama's ``format``: ``"json"`` or a JSON schema.

    The schema may come as a dict, JSON text, a pydantic model or a schema
    :class:`Grammar`; a GBNF grammar is refused (Ollama takes none).
    """
    if value is None or value == "":
        return None
    if value == "json":
        return "json"
    return json_schema_of(
        value,
        field="format ('json' or a JSON schema)",
        gbnf_refused=(
            "Ollama takes no GBNF grammar, only format='json' or a JSON schema "
            "(a dict, a pydantic model, or Grammar.from_json_schema / from_pydantic)"
        ),
    )


class OllamaEngine(ServerEngine):
    """One model on an Ollama server: generate and chat, pulls, and what it tells.

    Args:
        endpoint: Where Ollama is.
        pull_endpoint: The same server without a read timeout (pulls are silent while
            Ollama verifies a large model's digest).
        model: The model, ``name[:tag]``.
        streaming: Ask for NDJSON streaming (False: one reply).
    """

    route: ClassVar[str] = "/api/generate"
    framing: ClassVar[Framing] = "ndjson"

    def __init__(
        self, endpoint: Endpoint, pull_endpoint: Endpoint, model: str, *, streaming: bool = True
    ) -> None:
        super().__init__(endpoint, streaming=streaming)
        self.pull_endpoint = pull_endpoint
        self.model = model
        self._shown: dict[str, Any] | None = None
        self._served: int | None = None
        self._served_asked = False
        self._others: dict[str, frozenset[str]] = {}

    @override
    def close(self) -> None:
        super().close()
        self.pull_endpoint.release()

    # -------------------------------------------------------------- the model
    def show(self, model: str | None = None) -> dict[str, Any]:
        """``POST /api/show`` of the model (asked each time)."""
        reply = self.endpoint.request_json(
            "/api/show", {"model": model or self.model}, describe=self.describe_status
        )
        return dict(reply)

    def info(self) -> dict[str, Any]:
        """``/api/show`` of the model, asked once."""
        if self._shown is None:
            self._shown = self.show()
        return self._shown

    async def ainfo(self) -> dict[str, Any]:
        """The async form of :meth:`info`."""
        if self._shown is None:
            reply = await self.endpoint.arequest_json(
                "/api/show", {"model": self.model}, describe=self.describe_status
            )
            self._shown = dict(reply)
        return self._shown

    def forget(self) -> None:
        """Ask the model's details again when next needed (the model changed)."""
        self._shown = None

    def capabilities(self, model: str | None = None) -> frozenset[str]:
        """What the model (or another of the server) can do, asked once per model."""
        if model is None or full_name(model) == full_name(self.model):
            return capabilities_of(self.info())
        if model not in self._others:
            self._others[model] = capabilities_of(self.show(model))
        return self._others[model]

    async def acapabilities(self, model: str | None = None) -> frozenset[str]:
        """The async form of :meth:`capabilities`."""
        if model is None or full_name(model) == full_name(self.model):
            return capabilities_of(await self.ainfo())
        if model not in self._others:
            info = await self.endpoint.arequest_json(
                "/api/show", {"model": model}, describe=self.describe_status
            )
            self._others[model] = capabilities_of(dict(info))
        return self._others[model]

    def local_models(self) -> list[str]:
        """The names of the models the server has (``GET /api/tags``)."""
        tags = self.endpoint.request_json("/api/tags", method="GET")
        models = tags.get("models") if isinstance(tags, dict) else None
        return [
            str(m.get("name") or m.get("model"))
            for m in (models if isinstance(models, list) else [])
            if isinstance(m, dict)
        ]

    def model_file(self) -> str:
        """The ``FROM`` line of the model's modelfile: its GGUF path on the server."""
        modelfile = str(self.info().get("modelfile") or "")
        return next(
            (line[5:].strip() for line in modelfile.splitlines() if line.startswith("FROM ")), ""
        )

    # ------------------------------------------------------------------ unload
    def unload(self) -> None:
        """``keep_alive: 0``: the server frees the model's memory now."""
        self.endpoint.request_json(
            self.route, {"model": self.model, "keep_alive": 0}, describe=self.describe_status
        )

    async def aunload(self) -> None:
        """The async form of :meth:`unload`."""
        await self.endpoint.arequest_json(
            self.route, {"model": self.model, "keep_alive": 0}, describe=self.describe_status
        )

    # -------------------------------------------------------------------- pulls
    def pull(self, callback: Callable[[PullProgress], Any] | None, *, show: bool) -> None:
        """Pull the model into the server (``POST /api/pull``), streaming its progress."""
        bars = PullBars(show=show)
        messages = self.pull_endpoint.stream(
            "/api/pull", {"model": self.model, "stream": True}, framing="ndjson",
            is_final=pull_finished, describe=self.describe_status,
        )  # fmt: skip
        try:
            for message in messages:
                self._pull_event(message, callback, bars)
        except IncompleteResponseError as e:
            raise self._pull_cut(e) from e
        except ServerError as e:
            if e.status_code is not None:
                raise  # an HTTP error status, already described
            raise pull_error(self.model, self.pull_endpoint.where, e) from e
        finally:
            messages.close()
            bars.finish(filled=False)
        self.forget()

    async def apull(self, callback: Callable[[PullProgress], Any] | None, *, show: bool) -> None:
        """The async form of :meth:`pull`."""
        bars = PullBars(show=show)
        messages = self.pull_endpoint.astream(
            "/api/pull", {"model": self.model, "stream": True}, framing="ndjson",
            is_final=pull_finished, describe=self.describe_status,
        )  # fmt: skip
        try:
            async for message in messages:
                self._pull_event(message, callback, bars)
        except IncompleteResponseError as e:
            raise self._pull_cut(e) from e
        except ServerError as e:
            if e.status_code is not None:
                raise
            raise pull_error(self.model, self.pull_endpoint.where, e) from e
        finally:
            await messages.aclose()
            bars.finish(filled=False)
        self.forget()

    @staticmethod
    def _pull_event(
        message: dict[str, Any], callback: Callable[[PullProgress], Any] | None, bars: PullBars
    ) -> None:
        event = PullProgress.from_message(message)
        if event.digest is None:
            _log.info("ollama pull: %s", event.status)
        bars.feed(event)
        if event.done:
            bars.finish()
        if callback is not None:
            callback(event)

    def _pull_cut(self, error: IncompleteResponseError) -> IncompleteResponseError:
        return IncompleteResponseError(
            f"the pull of {self.model!r} broke off before Ollama said success ({error}); "
            "pull again: Ollama resumes where it stopped"
        )

    # ----------------------------------------------------------------- context
    def auto_context(self) -> int:
        """The trained context, for ``num_ctx="auto"`` (``/api/show``, asked once)."""
        trained = trained_context(self.info())
        if trained is None:
            msg = (
                f"num_ctx='auto' needs the context {self.model!r} was trained for, and "
                "Ollama's /api/show does not give it (no <arch>.context_length in "
                "model_info); give num_ctx as a number"
            )
            raise ValueError(msg)
        return trained

    def trained(self) -> int | None:
        """The trained context, if the model's details were asked already."""
        return trained_context(self._shown) if self._shown else None

    def asked_context(self, num_ctx: Any) -> int | None:
        """The context ``num_ctx`` asks for, as the server applies it."""
        if num_ctx == "auto":
            return self.auto_context()
        if not isinstance(num_ctx, int):
            return None
        trained = self.trained()
        return min(num_ctx, trained) if trained else num_ctx  # Ollama caps it so

    def server_context(self) -> int | None:
        """The context the server runs the model with when num_ctx is not sent.

        ``GET /api/ps`` (the loaded model's ``context_length``), else the Modelfile's
        ``num_ctx``, else the trained context (a bound: Ollama never exceeds it). Asked
        once; None where the server tells nothing.
        """
        if not self._served_asked:
            self._served_asked = True
            with contextlib.suppress(*LOOKUP_ERRORS):
                ps = self.endpoint.request_json("/api/ps", method="GET")
                self._served = served_context(ps, self.model)
            if self._served is None:
                with contextlib.suppress(*LOOKUP_ERRORS):
                    info = self.info()
                    self._served = modelfile_context(info) or trained_context(info)
        return self._served

    async def aserver_context(self) -> int | None:
        """The async form of :meth:`server_context`."""
        if not self._served_asked:
            self._served_asked = True
            with contextlib.suppress(*LOOKUP_ERRORS):
                ps = await self.endpoint.arequest_json("/api/ps", method="GET")
                self._served = served_context(ps, self.model)
            if self._served is None:
                with contextlib.suppress(*LOOKUP_ERRORS):
                    info = await self.ainfo()
                    self._served = modelfile_context(info) or trained_context(info)
        return self._served

    def loaded_context(self) -> int | None:
        """The context of the loaded model (``/api/ps``), else the Modelfile's."""
        context = None
        with contextlib.suppress(*LOOKUP_ERRORS):
            ps = self.endpoint.request_json("/api/ps", method="GET")
            context = served_context(ps, self.model)
        return context or modelfile_context(self.info())

    # -------------------------------------------------------------- generation
    def pieces(self, prompt: str, call: Call, tally: Tally) -> Iterator[str]:
        """``/api/generate``'s pieces; the context is checked once the reply ends."""
        yield from super().pieces(prompt, call, tally)
        self._check(prompt, call, tally, self._context(call, tally))

    @override
    async def apieces(self, prompt: str, call: Call, tally: Tally) -> AsyncIterator[str]:
        if call.params.get("num_ctx") == "auto":
            await self.ainfo()  # the body is built from it, without blocking the loop
        async for piece in super().apieces(prompt, call, tally):
            yield piece
        await self._acheck(prompt, call, tally)

    def chat(self, request: ChatRequest, call: Call, tally: Tally) -> Iterator[str | ToolCallPiece]:
        """``/api/chat``'s pieces: content, :class:`Thinking`, :class:`ToolCallPiece`."""
        body = self.chat_body(request, call)
        yield from self.exchange("/api/chat", body, lambda m: self.take_chat(m, tally))
        self._check(request.text, call, tally, self._context(call, tally))

    async def achat(
        self, request: ChatRequest, call: Call, tally: Tally
    ) -> AsyncIterator[str | ToolCallPiece]:
        """The async form of :meth:`chat`."""
        if call.params.get("num_ctx") == "auto":
            await self.ainfo()
        body = self.chat_body(request, call)
        async for piece in self.aexchange("/api/chat", body, lambda m: self.take_chat(m, tally)):
            yield piece
        await self._acheck(request.text, call, tally)

    def _context(self, call: Call, tally: Tally) -> int | None:
        context = self.asked_context(call.params.get("num_ctx"))
        if context is None and tally.prompt_tokens >= SERVED_CONTEXT_FLOOR:
            context = self.server_context()
        return context

    async def _acheck(self, text: str, call: Call, tally: Tally) -> None:
        context = self.asked_context(call.params.get("num_ctx"))  # "auto" was resolved
        if context is None and tally.prompt_tokens >= SERVED_CONTEXT_FLOOR:
            context = await self.aserver_context()
        if context is not None and overflowed(tally.prompt_tokens, context):
            with contextlib.suppress(*LOOKUP_ERRORS):
                await self.ainfo()  # for the message: the model file, to count tokens
        self._check(text, call, tally, context)

    def _check(self, text: str, call: Call, tally: Tally, context: int | None) -> None:
        """Raise (or warn, with ``truncate=True``) if Ollama cut the prompt."""
        counted = tally.prompt_tokens
        if context is None or not overflowed(counted, context):
            return
        own = None
        with contextlib.suppress(NotImplementedError, ImportError, OSError, *LOOKUP_ERRORS):
            own = len(self.token_ids(text))
        alone = f"; the prompt alone is {own} tokens" if own is not None else ""
        trained = self.trained()
        auto = f" (num_ctx='auto': {trained}, the model's trained context)" if trained else ""
        what = (
            f"Ollama cut the prompt to fit the model's context: it kept {counted} tokens "
            f"of a context of {context} (num_ctx){alone}. Ollama keeps the first "
            "num_keep tokens and the end of a prompt that is too long, and drops the rest "
            "without an error."
        )
        if call.params.get("truncate"):
            tally.extra["prompt_truncated"] = True
            warnings.warn(f"{what} (truncate=True)", UserWarning, stacklevel=2)
            return
        msg = (
            f"{what} Raise num_ctx{auto}, shorten the prompt, or pass truncate=True to "
            "accept Ollama's truncation with a warning."
        )
        raise ContextOverflowError(msg, prompt_tokens=own or counted, context=context)

    def token_ids(self, text: str) -> list[int]:
        """Token ids of ``text``, read from the GGUF the server runs (on this machine)."""
        source = self.model_file()
        path = Path(source).expanduser() if source else None
        if path is None or not path.is_file():
            msg = (
                f"cannot count tokens of Ollama model {self.model!r}: Ollama's API has no "
                f"tokenizer, and the model file it runs ({source or 'not named'}) is not on "
                "this machine. Count with LlamaCpp(model_path=<the same GGUF>)"
                ".get_num_tokens(text)."
            )
            raise NotImplementedError(msg)
        return gguf_token_ids(path, text)

    # ----------------------------------------------------------------- request
    @override
    def body(self, prompt: str, call: Call) -> dict[str, Any]:
        p = call.params
        body = {"model": self.model, "prompt": prompt, "stream": self.streaming}
        body.update({k: p[k] for k in TOP_LEVEL if p[k] is not None})
        return self._with_options(body, call)

    def chat_body(self, request: ChatRequest, call: Call) -> dict[str, Any]:
        """The ``/api/chat`` body of a conversation."""
        p = call.params
        given = [k for k in GENERATE_ONLY if p.get(k) is not None]
        if given:
            msg = (
                f"Ollama's /api/chat takes no {', '.join(given)} (those are "
                "/api/generate's): give the system text as a SystemMessage; the server "
                "renders the model's own template"
            )
            raise TypeError(msg)
        body: dict[str, Any] = {
            "model": request.model or self.model,
            "messages": request.messages,
            "stream": self.streaming,
        }
        if request.tools:
            body["tools"] = request.tools
        body.update({k: p[k] for k in CHAT_TOP_LEVEL if p.get(k) is not None})
        return self._with_options(body, call)

    def _with_options(self, body: dict[str, Any], call: Call) -> dict[str, Any]:
        grammar = call.params.get("grammar")
        if grammar is not None:
            if call.params.get("format") is not None:
                msg = "give format or grammar, not both"
                raise ValueError(msg)
            body["format"] = format_field(Grammar.coerce(grammar))
        options = {k: call.params[k] for k in OPTIONS if call.params.get(k) is not None}
        if options.get("num_ctx") == "auto":
            options["num_ctx"] = self.auto_context()
        if call.stops:
            options["stop"] = list(call.stops)  # Ollama stops there: exact usage
        if options:
            body["options"] = options
        return body

    # ------------------------------------------------------------------- reply
    @override
    def is_final(self, message: dict[str, Any]) -> bool:
        return message.get("done") is True

    @override
    def take(self, message: dict[str, Any], tally: Tally) -> str:
        thinking = message.get("thinking")
        if thinking:
            tally.extra["thinking"] = tally.extra.get("thinking", "") + thinking
        piece = message.get("response") or ""
        if self.is_final(message):
            _finish(message, tally)
        elif piece:
            tally.completion_tokens += 1  # one token per streamed message
        return str(piece)

    def take_chat(self, message: dict[str, Any], tally: Tally) -> list[str | ToolCallPiece]:
        """The pieces of one ``/api/chat`` message.

        :class:`Thinking`, its tool calls (:class:`ToolCallPiece`), then content.
        """
        said = message.get("message") or {}
        pieces: list[str | ToolCallPiece] = []
        thinking = said.get("thinking") or ""
        if thinking:
            tally.extra["thinking"] = tally.extra.get("thinking", "") + thinking
            pieces.append(Thinking(thinking))
        calls = said.get("tool_calls")
        for raw in calls if isinstance(calls, list) else []:
            if isinstance(raw, dict):
                function = raw.get("function") or {}
                call_id = str(raw["id"]) if raw.get("id") else None
                name = str(function.get("name") or "")
                pieces.append(ToolCallPiece(name, function.get("arguments"), call_id))
        content = str(said.get("content") or "")
        if self.is_final(message):
            _finish(message, tally)
        elif content or thinking:
            tally.completion_tokens += 1  # one token per streamed message
        if content:
            pieces.append(content)
        return pieces

    @override
    def describe_status(self, status: int, text: str) -> str | None:
        url = self.endpoint.url
        if status == 400 and "does not support thinking" in text:
            return (
                f"{text} (Ollama at {url}): this model has no thinking switch in its "
                "template; leave reasoning (ChatOllama) / think (Ollama) unset or False"
            )
        if status == 400 and "does not support tools" in text:
            return (
                f"{text} (Ollama at {url}): the model's template has no tools; "
                "ChatOllama offers tools to such a model in its system prompt instead"
            )
        if status == 404 and "model" in text.lower() and "not found" in text.lower():
            return (
                f"model {self.model!r} not found at {url}: run `ollama pull {self.model}` "
                f"(or check the name with `ollama list`). Ollama said: {text}"
            )
        if status == 404:
            return (
                f"{url} has no Ollama API (HTTP 404: {text}). Is base_url an Ollama "
                "server? (A llamafile or llama.cpp server listens on port 8080: use "
                "langchain_localllms.Llamafile for it.)"
            )
        return None


def _finish(message: dict[str, Any], tally: Tally) -> None:
    """Usage, timings (nanoseconds -> ms) and the reason from the last message."""
    if isinstance(message.get("prompt_eval_count"), int):
        tally.prompt_tokens = message["prompt_eval_count"]
    if isinstance(message.get("eval_count"), int):
        tally.completion_tokens = message["eval_count"]
    if isinstance(message.get("prompt_eval_duration"), (int, float)):
        tally.prompt_ms = message["prompt_eval_duration"] / 1e6
    if isinstance(message.get("eval_duration"), (int, float)):
        tally.completion_ms = message["eval_duration"] / 1e6
    tally.finish_reason = "length" if message.get("done_reason") == "length" else "stop"
    if message.get("model"):
        tally.extra["model"] = message["model"]
    if isinstance(message.get("load_duration"), (int, float)):
        tally.extra["load_ms"] = round(message["load_duration"] / 1e6, 3)
