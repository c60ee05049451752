"""A llamafile (or any llama.cpp HTTP server), through its ``/completion`` route."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import BeforeValidator, Field, PrivateAttr

from langchain_localllms.core.http import Endpoint
from langchain_localllms.engines.gguf import gguf_architecture
from langchain_localllms.engines.llamaserver import (
    SAMPLING,
    LlamaServerEngine,
    constraint,
    json_schema_field,
)
from langchain_localllms.grammars import GrammarField
from langchain_localllms.llms._server import ServerLLM
from langchain_localllms.prompts import ModelInfo


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
    json_schema: Annotated[Any, BeforeValidator(json_schema_field)] = None
    """Constrain the output to JSON matching this schema (a dict, JSON text or a
    pydantic model); upstream llama.cpp only. Give this or grammar, not both."""
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    """More fields for the ``/completion`` body (e.g. ``dry_multiplier``), sent as
    they are. Fields of this class go in their own arguments."""

    schema_engine: ClassVar[str | None] = "llama.cpp server"
    tool_schema_engine: ClassVar[str | None] = "llama-cpp-python converter"
    call_fields: ClassVar[tuple[str, ...]] = (
        *SAMPLING, "grammar", "json_schema", "id_slot",
    )  # fmt: skip
    temperature_field: ClassVar[str | None] = "temperature"
    max_tokens_field: ClassVar[str | None] = "n_predict"

    _server_name: ClassVar[str] = "the llamafile server"
    _start_hint: ClassVar[str] = (
        "Start it with `./your-model.llamafile --server --nobrowser` (or "
        "`llama-server -m model.gguf`), or set base_url to where it listens."
    )
    _timeout_field: ClassVar[str] = "request_timeout"

    _engine: LlamaServerEngine = PrivateAttr()

    def _setup(self) -> None:
        super()._setup()
        reserved = set(type(self).model_fields) | {"prompt", "stream", "stop", "slot_id"}
        clash = sorted(set(self.model_kwargs) & reserved)
        if clash:
            msg = f"model_kwargs may not set {', '.join(clash)}: give them as arguments"
            raise ValueError(msg)
        constraint(self.grammar, self.json_schema)

    @property
    def engine(self) -> LlamaServerEngine:
        """The server's engine: ``/completion``, ``/props``, ``/tokenize``."""
        engine = super().engine
        assert isinstance(engine, LlamaServerEngine)
        return engine

    def _make_engine(self, endpoint: Endpoint) -> LlamaServerEngine:
        return LlamaServerEngine(endpoint, streaming=self.streaming, extra_body=self.model_kwargs)

    @property
    def _llm_type(self) -> str:
        return "llamafile"

    def _identity(self) -> dict[str, Any]:
        return {"model_kwargs": self.model_kwargs, **super()._identity()}

    # ------------------------------------------------------------------ extras
    def model_info(self) -> ModelInfo:
        """The chat template and model file the server reports (``GET /props``).

        The template is the one the server uses for chat: the model file's own, or
        llama.cpp's fallback (ChatML) when the file carries none. The architecture is
        read from the GGUF file's header where the server runs on this machine (the
        file at the reported ``model_path`` can be read), else it is None.
        """
        props = self._engine.props()
        settings = props.get("default_generation_settings") or {}
        path = props.get("model_path") or settings.get("model") or "llamafile"
        return ModelInfo(
            runtime=self._llm_type,
            model=str(path).rsplit("/", 1)[-1],
            architecture=gguf_architecture(str(path)),
            chat_template=props.get("chat_template") or None,
            bos_token=props.get("bos_token") or "",
            eos_token=props.get("eos_token") or "",
            adds_bos=True,  # the server tokenizes with the model's own start token
        )

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` in the served model's vocabulary (``POST /tokenize``)."""
        return self._engine.token_ids(text)


__all__ = ["Llamafile"]
