"""Ollama, through its ``/api/generate`` route."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, Field

from langchain_localllms._base import Call, Refused
from langchain_localllms._http import Framing
from langchain_localllms._usage import Tally
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
    num_ctx: int | None = Field(default=None, ge=1)
    """Context size in tokens (a change reloads the model)."""
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

    _call_fields: ClassVar[tuple[str, ...]] = (*_OPTIONS, *_TOP_LEVEL)
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

    # ----------------------------------------------------------------- request
    def _body(self, prompt: str, call: Call) -> dict[str, Any]:
        p = call.params
        body: dict[str, Any] = {"model": self.model, "prompt": prompt, "stream": self.streaming}
        grammar = p.get("grammar")
        if grammar is not None:
            if p["format"] is not None:
                msg = "give format or grammar, not both"
                raise ValueError(msg)
            p = {**p, "format": _format(Grammar.coerce(grammar))}
        body.update({k: p[k] for k in _TOP_LEVEL if p[k] is not None})
        options = {k: p[k] for k in _OPTIONS if p[k] is not None}
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

    def _describe_status(self, status: int, text: str) -> str | None:
        url = self._endpoint().url
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

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` in the model's own vocabulary.

        Ollama's API has no tokenizer, so the GGUF the server runs is read here: its
        path is the ``FROM`` line of ``/api/show``'s modelfile, on this machine when the
        server is. Elsewhere this is an error, never a download of another vocabulary.
        """
        modelfile = str(self.get_model_info().get("modelfile") or "")
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
        """
        info = self.get_model_info()
        details = info.get("details") or {}
        arch = (info.get("model_info") or {}).get("general.architecture")
        return ModelInfo(
            runtime=self._llm_type, model=self.model, architecture=arch or details.get("family")
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


__all__ = ["Ollama"]
