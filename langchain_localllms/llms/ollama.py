"""Ollama, through its ``/api/generate`` route."""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AliasChoices, BeforeValidator, Field, PrivateAttr
from typing_extensions import override

from langchain_localllms.core.errors import (
    NotFoundError,
)
from langchain_localllms.core.http import Endpoint
from langchain_localllms.core.requests import Refused
from langchain_localllms.engines.ollama import (
    OPTIONS,
    TOP_LEVEL,
    OllamaEngine,
    PullProgress,
    format_field,
)
from langchain_localllms.engines.server import LOOKUP_ERRORS
from langchain_localllms.llms._server import ServerLLM
from langchain_localllms.prompts import ModelInfo


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
    format: Annotated[Any, BeforeValidator(format_field)] = None
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
    False: raise :class:`~langchain_localllms.core.errors.ContextOverflowError` once the
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

    _engine: OllamaEngine = PrivateAttr()

    schema_engine: ClassVar[str | None] = "llama.cpp server"
    call_fields: ClassVar[tuple[str, ...]] = (*OPTIONS, *TOP_LEVEL, "truncate")
    call_only: ClassVar[tuple[str, ...]] = ("grammar",)  # taken as format=, per call
    temperature_field: ClassVar[str | None] = "temperature"
    max_tokens_field: ClassVar[str | None] = "num_predict"

    _server_name: ClassVar[str] = "Ollama"
    _start_hint: ClassVar[str] = (
        "Start it with `ollama serve` (or the Ollama app), or set base_url to where it listens."
    )
    _timeout_field: ClassVar[str] = "timeout"
    # langchain_community sends these; Ollama's server ignores unknown options.
    _refused: ClassVar[dict[str, Refused]] = dict.fromkeys(
        ("mirostat", "mirostat_eta", "mirostat_tau", "tfs_z"),
        Refused(
            f"Ollama's API no longer takes it and its server ignores it (its options are "
            f"{', '.join(OPTIONS)})",
            no_effect=True,
        ),
    )

    @property
    def _llm_type(self) -> str:
        return "ollama"

    @override
    def ls_model_name(self) -> str:
        return self.model

    def _identity(self) -> dict[str, Any]:
        return {"model": self.model, **super()._identity()}

    def _setup(self) -> None:
        super()._setup()
        if not (self.pull_if_missing or self.validate_model_on_init):
            return  # no request at construction
        try:
            self._engine.info()
        except NotFoundError as e:
            said = e.server_message.lower()
            if "model" not in said or "not found" not in said:
                raise  # a 404 from something that is not Ollama
            if not self.pull_if_missing:
                raise NotFoundError(
                    self._missing_message(), status_code=404, server_message=e.server_message
                ) from e
            self.pull()

    @property
    def engine(self) -> OllamaEngine:
        """Ollama's engine: generate and chat requests, pulls, model details."""
        engine = super().engine
        assert isinstance(engine, OllamaEngine)
        return engine

    def _make_engine(self, endpoint: Endpoint) -> OllamaEngine:
        pulls = self._endpoint(timeout=None)  # silent while Ollama verifies a digest
        return OllamaEngine(endpoint, pulls, self.model, streaming=self.streaming)

    def _missing_message(self) -> str:
        local = ""
        with contextlib.suppress(*LOOKUP_ERRORS):
            local = f" Its models: {', '.join(self._engine.local_models()) or 'none'}."
        return (
            f"model {self.model!r} is not in {self._engine.endpoint.where} "
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
        self._engine.pull(on_progress or self.on_progress, show=progress_bar)

    async def apull(
        self,
        *,
        on_progress: Callable[[PullProgress], Any] | None = None,
        progress_bar: bool = True,
    ) -> None:
        """The async form of :meth:`pull` (same arguments and errors)."""
        self._check_open()
        await self._engine.apull(on_progress or self.on_progress, show=progress_bar)

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
        self._engine.unload()

    async def aunload(self) -> None:
        """The async form of :meth:`unload`."""
        self._check_open()
        await self._engine.aunload()

    # ------------------------------------------------------------------ extras
    def get_model_info(self) -> dict[str, Any]:
        """Ollama's details of the model, from ``POST /api/show``.

        The reply holds ``template`` (the prompt template), ``parameters``,
        ``details``, ``model_info`` and ``capabilities``.

        Raises:
            NotFoundError: The model is not pulled (the message says how to pull it).
            ConnectionError: Ollama is not running at ``base_url``.
        """
        return self._engine.show()

    def capabilities(self, model: str | None = None) -> frozenset[str]:
        """What the model can do (``completion``, ``tools``, ``thinking``, ...).

        From ``/api/show``'s ``capabilities`` (or its template, on servers before
        0.6), asked once per instance and model; ``model`` is another model on the
        same server (None: this instance's).

        Raises:
            NotFoundError: The model is not pulled (the message says how to pull it).
            ConnectionError: Ollama is not running at ``base_url``.
        """
        return self._engine.capabilities(model)

    async def acapabilities(self, model: str | None = None) -> frozenset[str]:
        """The async form of :meth:`capabilities`."""
        return await self._engine.acapabilities(model)

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` in the model's own vocabulary.

        Ollama's API has no tokenizer, so the GGUF the server runs is read here: its
        path is the ``FROM`` line of ``/api/show``'s modelfile, on this machine when the
        server is. Elsewhere this is an error, never a download of another vocabulary.
        """
        return self._engine.token_ids(text)

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
        info = self._engine.info()
        details = info.get("details") or {}
        arch = (info.get("model_info") or {}).get("general.architecture")
        context = self._engine.asked_context(self.num_ctx) or self._engine.loaded_context()
        return ModelInfo(
            runtime=self._llm_type,
            model=self.model,
            architecture=arch or details.get("family"),
            context_length=context,
        )


__all__ = ["Ollama", "PullProgress"]
