"""Ollama, through its ``/api/generate`` route."""

from __future__ import annotations

import base64
import contextlib
import logging
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AliasChoices, BeforeValidator, Field, PrivateAttr

from langchain_localllms._base import Call, Refused
from langchain_localllms._files import progress_bar
from langchain_localllms._http import Endpoint, Framing
from langchain_localllms._usage import Tally
from langchain_localllms.errors import (
    ContextOverflowError,
    IncompleteResponseError,
    NotFoundError,
    ServerError,
)
from langchain_localllms.grammars import Grammar, json_schema_of
from langchain_localllms.llms._server import ServerLLM
from langchain_localllms.prompts import ModelInfo
from langchain_localllms.runtimes.llamacpp import gguf_token_ids


def _format(value: Any) -> str | dict[str, Any] | None:
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


def _images(value: Any) -> list[str] | None:
    """Images as Ollama takes them: base64 text (bytes and paths are encoded here)."""
    if value is None:
        return None
    if isinstance(value, (str, bytes, Path)):
        msg = "images must be a list (of base64 strings, bytes or paths)"
        raise TypeError(msg)
    out = []
    for image in value:
        if isinstance(image, Path):
            image = image.read_bytes()
        if isinstance(image, bytes):
            image = base64.b64encode(image).decode("ascii")
        if not isinstance(image, str):
            msg = f"an image must be base64 text, bytes or a Path, got {type(image).__name__}"
            raise TypeError(msg)
        out.append(image)
    return out


class ChatRequest(str):
    """A conversation for ``POST /api/chat``, passed where a prompt goes.

    :class:`~langchain_localllms.ChatOllama` hands one to the engine instead of a
    prompt: the body then carries ``messages`` (and ``tools``) instead of ``prompt``.
    Its text is the messages' contents, joined: what the context check counts when
    Ollama says it cut the prompt.
    """

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    model: str | None

    def __new__(
        cls,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        model: str | None = None,
    ) -> ChatRequest:
        """The request's ``messages`` (Ollama's message dicts), ``tools`` and ``model``."""
        self = super().__new__(cls, "\n\n".join(str(m.get("content") or "") for m in messages))
        self.messages = messages
        self.tools = tools or None
        self.model = model
        return self


class Thinking(str):
    """A piece of the model's reasoning (``message.thinking`` of ``/api/chat``).

    Ollama splits it from the answer on the server, for models whose template has
    a thinking switch; it is never part of the answer's text.
    """

    __slots__ = ()


#: Fields of ``/api/generate`` that ``/api/chat`` does not take.
GENERATE_ONLY = ("system", "template", "raw", "suffix", "images")
#: Our fields that go at the top level of an ``/api/chat`` request.
_CHAT_TOP_LEVEL = ("format", "keep_alive", "think")


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


_log = logging.getLogger("langchain_localllms")


# ---------------------------------------------------------------------- pulls
@dataclass(frozen=True)
class PullProgress:
    """One status line of Ollama's ``POST /api/pull`` stream, as the server sent it.

    Ollama sends ``"pulling manifest"``, then for each layer of the model
    ``"pulling <12 hex digits>"`` with its ``digest`` (``"sha256:..."``), ``total``
    bytes and the bytes ``completed`` so far (absent until some arrived), then
    ``"verifying sha256 digest"``, ``"writing manifest"`` and ``"success"``.
    """

    status: str
    """Ollama's status text."""
    digest: str | None = None
    """The layer being pulled (``"sha256:..."``); None for the other steps."""
    total: int | None = None
    """The layer's size in bytes."""
    completed: int | None = None
    """Bytes of the layer on the server so far (None: none yet)."""

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> PullProgress:
        """The event of one NDJSON line of the pull stream."""

        def count(key: str) -> int | None:
            value = message.get(key)
            return value if isinstance(value, int) and not isinstance(value, bool) else None

        digest = message.get("digest")
        return cls(
            status=str(message.get("status") or ""),
            digest=digest if isinstance(digest, str) and digest else None,
            total=count("total"),
            completed=count("completed"),
        )

    @property
    def done(self) -> bool:
        """Whether this is the last line of a pull that worked (``"success"``)."""
        return self.status == "success"


def _pull_finished(message: dict[str, Any]) -> bool:
    return message.get("status") == "success"


class _PullBars:
    """One progress bar per layer (tqdm: shown on a terminal, quiet elsewhere).

    Ollama pulls the layers one after the other; a layer is complete when the next
    step begins (its last progress line may come before its last bytes), so its bar
    is then filled and closed.
    """

    def __init__(self, *, show: bool) -> None:
        self._show = show
        self._open: dict[str, Any] = {}

    def feed(self, event: PullProgress) -> None:
        if not self._show:
            return
        if event.digest is None:
            self.finish()
            return
        bar = self._open.get(event.digest)
        if bar is None:
            self.finish()
            short = event.digest.removeprefix("sha256:")[:12]
            bar = self._open[event.digest] = progress_bar(
                f"pulling {short}", total=event.total, unit="B"
            )
        if event.total and bar.total != event.total:
            bar.total = event.total
        if event.completed is not None and event.completed > bar.n:
            bar.update(event.completed - bar.n)

    def finish(self, *, filled: bool = True) -> None:
        """Close the open bars; ``filled``: the layers are complete."""
        for bar in self._open.values():
            if filled and bar.total and bar.n < bar.total:
                bar.update(bar.total - bar.n)
            bar.close()
        self._open.clear()


def _pull_error(model: str, where: str, error: ServerError) -> ServerError:
    """The error a failed pull raises: NotFoundError for a name the registry lacks."""
    text = error.server_message or str(error)
    if "file does not exist" in text or "not found" in text.lower():
        return NotFoundError(
            f"{where} could not pull {model!r}: {text}. Check the name and tag at "
            "https://ollama.com/library (Ollama pulls from its registry, over the "
            "internet).",
            server_message=text,
        )
    return ServerError(f"pulling {model!r} into {where} failed: {text}", server_message=text)


# --------------------------------------------------------------------- context
#: With num_ctx unset, the context the server runs the model with is asked (once per
#: instance) only after a prompt of at least this many tokens: Ollama gives no model
#: a smaller context unless told to (num_ctx, OLLAMA_CONTEXT_LENGTH, the Modelfile).
SERVED_CONTEXT_FLOOR = 256
#: A lookup that fails in these ways leaves what it looks for unknown (ServerError is
#: a RuntimeError; ValueError: a reply that is not JSON).
_LOOKUP_ERRORS = (RuntimeError, ConnectionError, TimeoutError, ValueError)


def _trained_context(info: dict[str, Any]) -> int | None:
    """``<arch>.context_length`` of ``/api/show``'s ``model_info``: the trained context."""
    model_info = info.get("model_info") or {}
    arch = model_info.get("general.architecture")
    value = model_info.get(f"{arch}.context_length") if arch else None
    if not isinstance(value, int):  # an architecture not named: any *.context_length
        value = next((v for k, v in model_info.items() if k.endswith(".context_length")), None)
    return value if isinstance(value, int) and value > 0 else None


def _modelfile_context(info: dict[str, Any]) -> int | None:
    """``num_ctx`` in ``/api/show``'s ``parameters`` (the Modelfile's PARAMETER lines)."""
    for line in str(info.get("parameters") or "").splitlines():
        key, _, value = line.strip().partition(" ")
        if key == "num_ctx":
            with contextlib.suppress(ValueError):
                return int(value.strip())
    return None


def _served_context(ps: Any, model: str) -> int | None:
    """``context_length`` of ``model`` in a ``GET /api/ps`` reply (Ollama 0.11+)."""
    models = ps.get("models") if isinstance(ps, dict) else None
    for entry in models if isinstance(models, list) else []:
        if not isinstance(entry, dict):
            continue
        names = {_full_name(str(entry.get(k) or "")) for k in ("name", "model")}
        value = entry.get("context_length")
        if _full_name(model) in names and isinstance(value, int) and value > 0:
            return value
    return None


def _full_name(model: str) -> str:
    """``name`` as Ollama resolves it: ``name:latest`` when no tag is given."""
    return model if ":" in model.rsplit("/", 1)[-1] else f"{model}:latest"


def overflowed(prompt_eval_count: int, context: int) -> bool:
    """Whether Ollama truncated a prompt, from its ``prompt_eval_count``.

    Ollama's runner cuts a prompt longer than the context to exactly the context
    (its Go runner) or one token less (its llama-server runner), keeping the first
    ``num_keep`` tokens and the end; it counts the whole prompt it kept, cached or
    not. A count that reaches ``context - 1`` therefore means the prompt was cut (or
    filled the context to the last token, leaving no room to answer).
    """
    return prompt_eval_count > 0 and prompt_eval_count >= context - 1


#: Our fields that go in ``options``: exactly the option keys Ollama knows.
_OPTIONS = (
    "num_keep", "seed", "num_predict", "top_k", "top_p", "min_p", "typical_p",
    "repeat_last_n", "temperature", "repeat_penalty", "presence_penalty",
    "frequency_penalty", "num_ctx", "num_batch", "num_gpu", "main_gpu", "use_mmap",
    "num_thread",
)  # fmt: skip
#: Our fields that go at the top level of the request.
_TOP_LEVEL = ("system", "template", "raw", "format", "keep_alive", "think", "suffix", "images")


class Ollama(ServerLLM):
    """A model served by `Ollama <https://ollama.com>`_, over its HTTP API.

    Speaks ``POST {base_url}/api/generate``: NDJSON streaming (or one reply with
    ``streaming=False``), sampling in ``options``, ``system``/``template``/``raw``,
    structured output through ``format``, ``keep_alive``, ``think``, ``suffix`` and
    ``images``. Usage and timings come from Ollama's counts and nanosecond
    durations. Connections are pooled, async calls are native, and
    ``batch``/``abatch`` send up to ``max_concurrency`` requests at once (Ollama runs
    ``OLLAMA_NUM_PARALLEL`` of them together).

    Stop sequences go to Ollama (``options.stop``): it ends the answer there and sends
    its exact token counts, also with ``streaming=False``. Its reply does not say
    whether a stop sequence or the end token ended it, so
    ``generation_info["stop_sequence"]`` is None then (``finish_reason`` is "stop"
    either way). A stop the server misses is still cut here, and named.

    Setup:
        Install Ollama from https://ollama.com/download, then:

        .. code-block:: bash

            ollama serve            # the desktop app does this for you
            ollama pull llama3.2    # any model of https://ollama.com/library

    Key init args:
        model: the model name, ``name[:tag]`` (``ollama list`` shows yours).
        base_url: where Ollama listens (``http://localhost:11434``); ``user:pass@``
            in it is sent as basic auth.
        num_predict: most tokens per answer (256; -1 means until the model stops).
        temperature, top_k, top_p, min_p, repeat_penalty, seed, num_ctx, ...: options;
            unset ones keep the model's defaults.
        format: ``"json"``, a JSON schema or a pydantic model.
        system, template, raw, keep_alive, think: as in Ollama's API.
        num_ctx: the context size; ``"auto"`` is the model's trained context.
        truncate: False (default): a prompt Ollama cut to fit its context raises
            ``ContextOverflowError``; True: Ollama's truncation, with a warning.
        pull: pull the model at construction if the server lacks it, with progress
            bars and ``on_progress`` events (also :meth:`pull` / :meth:`apull`).
        validate_model_on_init: check at construction that the server has the model.

    Lifecycle:
        :meth:`unload` frees the model's memory on the server now (``keep_alive: 0``).

    Instantiate:
        .. code-block:: python

            from langchain_localllms import Ollama

            llm = Ollama(model="llama3.2", temperature=0)

    Invoke:
        .. code-block:: python

            llm.invoke("The first man on the moon was ...")

    Stream:
        .. code-block:: python

            for piece in llm.stream("The first man on the moon was"):
                print(piece, end="", flush=True)

    Async:
        .. code-block:: python

            await llm.ainvoke("The first man on the moon was")
            await llm.abatch(["Tell me a joke.", "Tell me a fact."])
    """

    model: str
    """The model to run, ``name[:tag]`` as ``ollama list`` shows it (e.g. ``llama2:13b``)."""
    base_url: str = "http://localhost:11434"
    """Where Ollama listens; ``user:pass@`` in it is sent as basic auth (and never
    shown)."""
    timeout: float | None = Field(default=None, gt=0)
    """Seconds to wait for Ollama to connect and between two pieces of an answer
    (loading a large model takes a while); None waits as long as it takes."""
    auth: Any = None
    """Credentials for a protected server: ``(user, password)`` or an ``httpx`` auth
    (never shown)."""

    # ----------------------------------------------------------------- options
    num_predict: int | None = Field(default=256, ge=-2)
    """Most tokens to generate (-1: until the model stops, -2: until the context is
    full; None: the server's own default). Bounded by default: a base model may never
    stop on its own."""
    temperature: float | None = Field(default=None, ge=0)
    """Sampling temperature; 0 is greedy. None: the model's default (0.8)."""
    top_k: int | None = Field(default=None, ge=0)
    """Sample from the k most likely tokens (default 40)."""
    top_p: float | None = Field(default=None, ge=0, le=1)
    """Nucleus sampling (default 0.9)."""
    min_p: float | None = Field(default=None, ge=0, le=1)
    """Drop tokens less likely than min_p times the most likely one (default 0)."""
    typical_p: float | None = Field(default=None, ge=0, le=1)
    """Locally typical sampling (1: off)."""
    repeat_penalty: float | None = Field(default=None, ge=0)
    """Penalty for repeating recent tokens (default 1.1; 1: off)."""
    repeat_last_n: int | None = Field(default=None, ge=-1)
    """How many recent tokens the repeat penalty looks at (default 64, 0: off, -1:
    the context)."""
    presence_penalty: float | None = None
    """Penalty for any token that already appeared."""
    frequency_penalty: float | None = None
    """Penalty growing with how often a token already appeared."""
    seed: int | None = None
    """Sampling seed: the same seed and prompt give the same answer."""
    num_keep: int | None = None
    """Prompt tokens kept when the context overflows."""
    num_ctx: Annotated[int, Field(ge=1)] | Literal["auto"] | None = None
    """Context size in tokens (a change reloads the model). ``"auto"``: the context the
    model was trained for (``/api/show``'s ``<arch>.context_length``, asked once), sent
    as a number; Ollama allocates its KV cache for it, so a large one costs memory.
    None: the server's choice (``OLLAMA_CONTEXT_LENGTH``, the Modelfile, or its
    default of 2048-4096 tokens)."""
    num_batch: int | None = Field(default=None, ge=1)
    """Prompt tokens evaluated per step."""
    num_gpu: int | None = None
    """Layers to offload to the GPU (0: CPU only)."""
    main_gpu: int | None = None
    """The GPU that holds small tensors when several are used."""
    use_mmap: bool | None = None
    """Map the model file instead of reading it."""
    num_thread: int | None = Field(default=None, ge=1)
    """CPU threads (default: Ollama picks; the physical core count is best)."""

    # ---------------------------------------------------------- request fields
    system: str | None = None
    """System message (overrides the Modelfile's)."""
    template: str | None = None
    """Prompt template, in Ollama's Go template syntax (overrides the Modelfile's)."""
    raw: bool | None = None
    """Send the prompt as it is, with no template (then no ``context`` comes back)."""
    format: Annotated[Any, BeforeValidator(_format)] = None
    """Structured output: ``"json"``, or a JSON schema (a dict, a pydantic model, or
    a :class:`Grammar` made from a schema). Ollama takes no GBNF."""
    keep_alive: int | float | str | None = None
    """How long the model stays loaded after the call: ``"5m"``, seconds, ``0`` to
    unload at once, a negative value to keep it loaded."""
    think: bool | Literal["low", "medium", "high", "max"] | None = None
    """For reasoning models: think before answering; the thinking text arrives in
    ``generation_info["thinking"]``, apart from the answer."""
    suffix: str | None = None
    """Text after the completion, for fill-in-the-middle models."""
    images: Annotated[Any, BeforeValidator(_images)] = None
    """Images for multimodal models: base64 text, bytes or paths."""

    # -------------------------------------------------------- model and context
    truncate: bool = False
    """What to do when Ollama cut the prompt to fit its context (it does so without an
    error: it keeps the first ``num_keep`` tokens and the end, and drops the middle).
    False: raise :class:`~langchain_localllms.errors.ContextOverflowError` once the
    reply ends. True: accept Ollama's truncation, with a warning, and mark the answer
    ``generation_info["prompt_truncated"] = True``. Also a per-call option."""
    pull_if_missing: bool = Field(
        default=False, validation_alias=AliasChoices("pull", "pull_if_missing")
    )
    """``pull=True``: at construction, pull the model if the server lacks it
    (``POST /api/show`` answers 404), showing progress (see :meth:`pull`). False: a
    missing model is an error at its first use that says how to pull it."""
    validate_model_on_init: bool = False
    """Check at construction that the server has the model (as langchain-ollama's
    option does): a missing model is then a ``NotFoundError`` right away, naming the
    local models and how to pull it."""
    on_progress: Callable[[PullProgress], Any] | None = None
    """Called with each :class:`PullProgress` event of a pull (``pull=True`` or
    :meth:`pull`), on the calling thread (the event loop for :meth:`apull`: keep it
    quick)."""

    _shown: dict[str, Any] | None = PrivateAttr(default=None)
    _served: int | None = PrivateAttr(default=None)
    _served_asked: bool = PrivateAttr(default=False)
    _others: dict[str, frozenset[str]] = PrivateAttr(default_factory=dict)

    _schema_engine: ClassVar[str | None] = "llama.cpp server"
    _call_fields: ClassVar[tuple[str, ...]] = (*_OPTIONS, *_TOP_LEVEL, "truncate")
    _call_only: ClassVar[tuple[str, ...]] = ("grammar",)  # taken as format=, per call
    _temperature_field: ClassVar[str | None] = "temperature"
    _max_tokens_field: ClassVar[str | None] = "num_predict"

    _server_name: ClassVar[str] = "Ollama"
    _start_hint: ClassVar[str] = (
        "Start it with `ollama serve` (or the Ollama app), or set base_url to where it listens."
    )
    _timeout_field: ClassVar[str] = "timeout"
    _route: ClassVar[str] = "/api/generate"
    _stream_framing: ClassVar[Framing] = "ndjson"
    # langchain_community sends these; Ollama's server ignores unknown options.
    _refused: ClassVar[dict[str, Refused]] = dict.fromkeys(
        ("mirostat", "mirostat_eta", "mirostat_tau", "tfs_z"),
        Refused(
            f"Ollama's API no longer takes it and its server ignores it (its options are "
            f"{', '.join(_OPTIONS)})",
            no_effect=True,
        ),
    )

    @property
    def _llm_type(self) -> str:
        return "ollama"

    def _ls_model_name(self) -> str:
        return self.model

    def _identity(self) -> dict[str, Any]:
        return {"model": self.model, **super()._identity()}

    def _setup(self) -> None:
        super()._setup()
        if not (self.pull_if_missing or self.validate_model_on_init):
            return  # no request at construction
        try:
            self._shown = self.get_model_info()
        except NotFoundError as e:
            said = e.server_message.lower()
            if "model" not in said or "not found" not in said:
                raise  # a 404 from something that is not Ollama
            if not self.pull_if_missing:
                raise NotFoundError(
                    self._missing_message(), status_code=404, server_message=e.server_message
                ) from e
            self.pull()

    def _missing_message(self) -> str:
        local = ""
        with contextlib.suppress(RuntimeError, ConnectionError, TimeoutError, ValueError):
            tags = self._endpoint().request_json("/api/tags", method="GET")
            models = tags.get("models") if isinstance(tags, dict) else None
            names = [
                str(m.get("name") or m.get("model"))
                for m in (models if isinstance(models, list) else [])
                if isinstance(m, dict)
            ]
            local = f" Its models: {', '.join(names) or 'none'}."
        return (
            f"model {self.model!r} is not in {self._endpoint().where} "
            f"(validate_model_on_init=True): run `ollama pull {self.model}`, or pass "
            f"pull=True to pull it now.{local}"
        )

    # -------------------------------------------------------------------- pulls
    def pull(
        self,
        *,
        on_progress: Callable[[PullProgress], Any] | None = None,
        progress_bar: bool = True,
    ) -> None:
        """Pull the model into the server (``ollama pull``), streaming its progress.

        Each status line of ``POST /api/pull`` goes to ``on_progress`` (this argument,
        else the field) as a :class:`PullProgress`, and each layer gets a progress bar
        (tqdm's: shown on a terminal, quiet in CI and logs; ``progress_bar=False``
        turns them off). A model already pulled is checked against the registry and
        comes back at once; an interrupted pull resumes where it stopped.

        Raises:
            NotFoundError: The registry has no model of that name or tag.
            ServerError: The pull failed on the server (disk, network).
            IncompleteResponseError: The connection broke before Ollama said success.
            ConnectionError: Ollama is not running at ``base_url``.
        """
        self._check_open()
        callback = on_progress or self.on_progress
        bars = _PullBars(show=progress_bar)
        endpoint = self._pull_endpoint()
        messages = endpoint.stream(
            "/api/pull", {"model": self.model, "stream": True}, framing="ndjson",
            is_final=_pull_finished, describe=self._describe_status,
        )  # fmt: skip
        try:
            for message in messages:
                self._pull_event(message, callback, bars)
        except IncompleteResponseError as e:
            raise self._pull_cut(e) from e
        except ServerError as e:
            if e.status_code is not None:
                raise  # an HTTP error status, already described
            raise _pull_error(self.model, endpoint.where, e) from e
        finally:
            messages.close()
            bars.finish(filled=False)
        self._shown = None  # asked again when needed: the model changed

    async def apull(
        self,
        *,
        on_progress: Callable[[PullProgress], Any] | None = None,
        progress_bar: bool = True,
    ) -> None:
        """The async form of :meth:`pull` (same arguments and errors)."""
        self._check_open()
        callback = on_progress or self.on_progress
        bars = _PullBars(show=progress_bar)
        endpoint = self._pull_endpoint()
        messages = endpoint.astream(
            "/api/pull", {"model": self.model, "stream": True}, framing="ndjson",
            is_final=_pull_finished, describe=self._describe_status,
        )  # fmt: skip
        try:
            async for message in messages:
                self._pull_event(message, callback, bars)
        except IncompleteResponseError as e:
            raise self._pull_cut(e) from e
        except ServerError as e:
            if e.status_code is not None:
                raise
            raise _pull_error(self.model, endpoint.where, e) from e
        finally:
            await messages.aclose()
            bars.finish(filled=False)
        self._shown = None

    def _release(self) -> None:
        super()._release()
        self._pull_endpoint().release()

    def _pull_endpoint(self) -> Endpoint:
        """The server, with no read timeout for pulls.

        Ollama sends nothing while it verifies the digest of a large model, which can
        take minutes.
        """
        return Endpoint(
            self.base_url, server=self._server_name, start_hint=self._start_hint,
            timeout=None, headers=self.headers, auth=self.auth,
            client_kwargs=self.client_kwargs,
        )  # fmt: skip

    @staticmethod
    def _pull_event(
        message: dict[str, Any], callback: Callable[[PullProgress], Any] | None, bars: _PullBars
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

    # ------------------------------------------------------------------ unload
    def unload(self) -> None:
        """Ask Ollama to free the model's memory now, not after ``keep_alive``.

        Sends ``POST /api/generate`` with ``{"model": ..., "keep_alive": 0}`` (Ollama
        answers ``done_reason: "unload"``). The instance stays usable: its next call
        loads the model again. A model that is not loaded is no error.

        Raises:
            NotFoundError: The server does not have the model.
            ConnectionError: Ollama is not running at ``base_url``.
        """
        self._check_open()
        self._endpoint().request_json(
            self._route, {"model": self.model, "keep_alive": 0}, describe=self._describe_status
        )

    async def aunload(self) -> None:
        """The async form of :meth:`unload`."""
        self._check_open()
        await self._endpoint().arequest_json(
            self._route, {"model": self.model, "keep_alive": 0}, describe=self._describe_status
        )

    # ----------------------------------------------------------------- context
    def _info(self) -> dict[str, Any]:
        """``/api/show`` of the model, asked once per instance."""
        if self._shown is None:
            self._shown = self.get_model_info()
        return self._shown

    async def _ainfo(self) -> dict[str, Any]:
        if self._shown is None:
            reply = await self._endpoint().arequest_json(
                "/api/show", {"model": self.model}, describe=self._describe_status
            )
            self._shown = dict(reply)
        return self._shown

    def _auto_context(self) -> int:
        """The trained context, for ``num_ctx="auto"`` (``/api/show``, asked once)."""
        trained = _trained_context(self._info())
        if trained is None:
            msg = (
                f"num_ctx='auto' needs the context {self.model!r} was trained for, and "
                "Ollama's /api/show does not give it (no <arch>.context_length in "
                "model_info); give num_ctx as a number"
            )
            raise ValueError(msg)
        return trained

    def _asked_context(self, call: Call) -> int | None:
        """The context this call asks for (``num_ctx``), as the server applies it."""
        num_ctx = call.params.get("num_ctx")
        if num_ctx == "auto":
            return self._auto_context()
        if not isinstance(num_ctx, int):
            return None
        trained = _trained_context(self._shown) if self._shown else None
        return min(num_ctx, trained) if trained else num_ctx  # Ollama caps it so

    def _server_context(self) -> int | None:
        """The context the server runs the model with when num_ctx is not sent.

        ``GET /api/ps`` (the loaded model's ``context_length``), else the Modelfile's
        ``num_ctx``, else the trained context (a bound: Ollama never exceeds it). Asked
        once per instance; None where the server tells nothing.
        """
        if not self._served_asked:
            self._served_asked = True
            with contextlib.suppress(*_LOOKUP_ERRORS):
                ps = self._endpoint().request_json("/api/ps", method="GET")
                self._served = _served_context(ps, self.model)
            if self._served is None:
                with contextlib.suppress(*_LOOKUP_ERRORS):
                    info = self._info()
                    self._served = _modelfile_context(info) or _trained_context(info)
        return self._served

    async def _aserver_context(self) -> int | None:
        if not self._served_asked:
            self._served_asked = True
            with contextlib.suppress(*_LOOKUP_ERRORS):
                ps = await self._endpoint().arequest_json("/api/ps", method="GET")
                self._served = _served_context(ps, self.model)
            if self._served is None:
                with contextlib.suppress(*_LOOKUP_ERRORS):
                    info = await self._ainfo()
                    self._served = _modelfile_context(info) or _trained_context(info)
        return self._served

    def _pieces(self, prompt: str, call: Call, tally: Tally) -> Iterator[str]:
        yield from self._exchange(prompt, call, tally)
        context = self._asked_context(call)
        if context is None and tally.prompt_tokens >= SERVED_CONTEXT_FLOOR:
            context = self._server_context()
        self._check_fit(prompt, call, tally, context)

    async def _apieces(self, prompt: str, call: Call, tally: Tally) -> AsyncIterator[str]:
        if call.params.get("num_ctx") == "auto":
            await self._ainfo()  # the body is built from it, without blocking the loop
        async for piece in self._aexchange(prompt, call, tally):
            yield piece
        context = self._asked_context(call)  # no request: "auto" was resolved above
        if context is None and tally.prompt_tokens >= SERVED_CONTEXT_FLOOR:
            context = await self._aserver_context()
        if context is not None and overflowed(tally.prompt_tokens, context):
            with contextlib.suppress(*_LOOKUP_ERRORS):
                await self._ainfo()  # for the message: the model file, to count tokens
        self._check_fit(prompt, call, tally, context)

    def _exchange(self, prompt: str, call: Call, tally: Tally) -> Iterator[str]:
        """The server's pieces: ``/api/generate``, or ``/api/chat`` for a :class:`ChatRequest`.

        A chat reply's pieces are its ``content``, and its ``thinking`` as
        :class:`Thinking` pieces; its tool calls go to ``tally.extra["tool_calls"]``.
        """
        if not isinstance(prompt, ChatRequest):
            yield from super()._pieces(prompt, call, tally)
            return
        body, options = self._request(prompt, call)
        messages = self._endpoint().stream("/api/chat", body, **options)
        try:
            for message in messages:
                yield from self._take_chat(message, tally)
        finally:
            messages.close()  # stopped early: the connection closes, the server stops

    async def _aexchange(self, prompt: str, call: Call, tally: Tally) -> AsyncIterator[str]:
        if not isinstance(prompt, ChatRequest):
            async for piece in super()._apieces(prompt, call, tally):
                yield piece
            return
        body, options = self._request(prompt, call)
        messages = self._endpoint().astream("/api/chat", body, **options)
        try:
            async for message in messages:
                for piece in self._take_chat(message, tally):
                    yield piece
        finally:
            await messages.aclose()

    def _check_fit(self, prompt: str, call: Call, tally: Tally, context: int | None) -> None:
        """Raise (or warn, with ``truncate=True``) if Ollama cut the prompt."""
        counted = tally.prompt_tokens
        if context is None or not overflowed(counted, context):
            return
        own = None
        with contextlib.suppress(NotImplementedError, ImportError, OSError, *_LOOKUP_ERRORS):
            own = len(self.get_token_ids(prompt))
        alone = f"; the prompt alone is {own} tokens" if own is not None else ""
        trained = _trained_context(self._shown) if self._shown else None
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

    # ----------------------------------------------------------------- request
    def _body(self, prompt: str, call: Call) -> dict[str, Any]:
        p = call.params
        grammar = p.get("grammar")
        if grammar is not None:
            if p["format"] is not None:
                msg = "give format or grammar, not both"
                raise ValueError(msg)
            p = {**p, "format": _format(Grammar.coerce(grammar))}
        body: dict[str, Any]
        if isinstance(prompt, ChatRequest):
            given = [k for k in GENERATE_ONLY if p[k] is not None]
            if given:
                msg = (
                    f"Ollama's /api/chat takes no {', '.join(given)} (those are "
                    "/api/generate's): give the system text as a SystemMessage; the server "
                    "renders the model's own template"
                )
                raise TypeError(msg)
            body = {"model": prompt.model or self.model, "messages": prompt.messages}
            body["stream"] = self.streaming
            if prompt.tools:
                body["tools"] = prompt.tools
            body.update({k: p[k] for k in _CHAT_TOP_LEVEL if p[k] is not None})
        else:
            body = {"model": self.model, "prompt": prompt, "stream": self.streaming}
            body.update({k: p[k] for k in _TOP_LEVEL if p[k] is not None})
        options = {k: p[k] for k in _OPTIONS if p[k] is not None}
        if options.get("num_ctx") == "auto":
            options["num_ctx"] = self._auto_context()
        if call.stops:
            options["stop"] = list(call.stops)  # Ollama stops there: exact usage
        if options:
            body["options"] = options
        return body

    # ------------------------------------------------------------------- reply
    def _is_final(self, message: dict[str, Any]) -> bool:
        return message.get("done") is True

    def _take(self, message: dict[str, Any], tally: Tally) -> str:
        thinking = message.get("thinking")
        if thinking:
            tally.extra["thinking"] = tally.extra.get("thinking", "") + thinking
        piece = message.get("response") or ""
        if self._is_final(message):
            _finish(message, tally)
        elif piece:
            tally.completion_tokens += 1  # one token per streamed message
        return str(piece)

    def _take_chat(self, message: dict[str, Any], tally: Tally) -> list[str]:
        """The pieces of one ``/api/chat`` message: :class:`Thinking`, then content."""
        said = message.get("message") or {}
        pieces: list[str] = []
        thinking = said.get("thinking") or ""
        if thinking:
            tally.extra["thinking"] = tally.extra.get("thinking", "") + thinking
            pieces.append(Thinking(thinking))
        calls = said.get("tool_calls")
        if isinstance(calls, list) and calls:
            tally.extra.setdefault("tool_calls", []).extend(calls)
        content = str(said.get("content") or "")
        if self._is_final(message):
            _finish(message, tally)
        elif content or thinking:
            tally.completion_tokens += 1  # one token per streamed message
        if content:
            pieces.append(content)
        return pieces

    def _describe_status(self, status: int, text: str) -> str | None:
        url = self._endpoint().url
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

    # ------------------------------------------------------------------ extras
    def get_model_info(self) -> dict[str, Any]:
        """Ollama's details of the model, from ``POST /api/show``.

        The reply holds ``template`` (the prompt template), ``parameters``,
        ``details``, ``model_info`` and ``capabilities``.

        Raises:
            NotFoundError: The model is not pulled (the message says how to pull it).
            ConnectionError: Ollama is not running at ``base_url``.
        """
        info = self._endpoint().request_json(
            "/api/show", {"model": self.model}, describe=self._describe_status
        )
        return dict(info)

    def capabilities(self, model: str | None = None) -> frozenset[str]:
        """What the model can do (``completion``, ``tools``, ``thinking``, ...).

        From ``/api/show``'s ``capabilities`` (or its template, on servers before
        0.6), asked once per instance and model; ``model`` is another model on the
        same server (None: this instance's).

        Raises:
            NotFoundError: The model is not pulled (the message says how to pull it).
            ConnectionError: Ollama is not running at ``base_url``.
        """
        if model is None or _full_name(model) == _full_name(self.model):
            return capabilities_of(self._info())
        if model not in self._others:
            info = self._endpoint().request_json(
                "/api/show", {"model": model}, describe=self._describe_status
            )
            self._others[model] = capabilities_of(dict(info))
        return self._others[model]

    async def acapabilities(self, model: str | None = None) -> frozenset[str]:
        """The async form of :meth:`capabilities`."""
        if model is None or _full_name(model) == _full_name(self.model):
            return capabilities_of(await self._ainfo())
        if model not in self._others:
            info = await self._endpoint().arequest_json(
                "/api/show", {"model": model}, describe=self._describe_status
            )
            self._others[model] = capabilities_of(dict(info))
        return self._others[model]

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` in the model's own vocabulary.

        Ollama's API has no tokenizer, so the GGUF the server runs is read here: its
        path is the ``FROM`` line of ``/api/show``'s modelfile, on this machine when the
        server is. Elsewhere this is an error, never a download of another vocabulary.
        """
        modelfile = str(self._info().get("modelfile") or "")  # asked once per instance
        source = next(
            (line[5:].strip() for line in modelfile.splitlines() if line.startswith("FROM ")), ""
        )
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

    def model_info(self) -> ModelInfo:
        """The model's family from ``/api/show``.

        Ollama wraps each prompt in the model's own template on the server (a Go
        template, unless ``raw=True``), so there is no chat template to render here:
        ``chat_template`` is None and prompts go as they are.

        ``context_length`` is the context the model runs with: ``num_ctx`` as the
        server applies it (capped at the trained context; ``"auto"`` is the trained
        context), else what the server uses without it (``/api/ps`` of the loaded
        model, or the Modelfile's ``num_ctx``), else None.
        """
        info = self._info()
        details = info.get("details") or {}
        arch = (info.get("model_info") or {}).get("general.architecture")
        context = self._asked_context(Call(params={"num_ctx": self.num_ctx}))
        if context is None:
            with contextlib.suppress(*_LOOKUP_ERRORS):
                ps = self._endpoint().request_json("/api/ps", method="GET")
                context = _served_context(ps, self.model)
            context = context or _modelfile_context(info)
        return ModelInfo(
            runtime=self._llm_type,
            model=self.model,
            architecture=arch or details.get("family"),
            context_length=context,
        )


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


__all__ = ["ChatRequest", "Ollama", "PullProgress", "Thinking", "capabilities_of"]
