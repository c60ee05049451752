"""llama.cpp in this process, through llama-cpp-python."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, PrivateAttr, model_validator
from typing_extensions import override

from langchain_localllms.core.events import Row, Tally
from langchain_localllms.core.files import cpu_count, model_file
from langchain_localllms.core.hub import hub_file
from langchain_localllms.core.requests import Call, Refused
from langchain_localllms.engines.gguf import auto_context
from langchain_localllms.engines.llamacpp import LlamaCppEngine
from langchain_localllms.grammars import Grammar, GrammarField
from langchain_localllms.llms._base import LocalLLM
from langchain_localllms.prompts import ModelInfo

_log = logging.getLogger(__name__)

_F16, _F32 = 1, 0  # ggml type ids of the KV cache
#: Fields passed to ``llama_cpp.Llama`` under their own name.
_LOAD_FIELDS = frozenset({
    "n_ctx", "n_batch", "n_threads", "n_threads_batch", "seed", "use_mlock", "use_mmap",
    "logits_all", "last_n_tokens_size", "verbose", "n_gpu_layers", "lora_base", "lora_path",
    "rope_freq_base", "rope_freq_scale",
})  # fmt: skip


class LlamaCpp(LocalLLM):
    """A GGUF model run by llama.cpp in this process.

    Setup:
        .. code-block:: bash

            pip install "langchain-localllms[llamacpp]"

    Key init args:
        model_path: the ``.gguf`` file.
        n_ctx, n_batch, n_threads, n_gpu_layers: how llama.cpp runs it.
        n_parallel: prompts of a batch decoded together (continuous batching).
        cache_prompt: skip the prefill of a prefix shared with the last prompt.
        temperature, top_p, top_k, min_p, repeat_penalty, max_tokens, seed: sampling.
        grammar / grammar_path: constrain the output (GBNF, JSON schema, pydantic).

    Instantiate:
        .. code-block:: python

            from langchain_localllms import LlamaCpp

            llm = LlamaCpp(model_path="gemma-3-270m-Q4_K_M.gguf", temperature=0)

    Invoke:
        .. code-block:: python

            llm.invoke("The first man on the moon was")

    Stream:
        .. code-block:: python

            for piece in llm.stream("The first man on the moon was"):
                print(piece, end="", flush=True)

    Async:
        .. code-block:: python

            await llm.ainvoke("The first man on the moon was")
    """

    model_path: str
    """Path of the GGUF model file."""
    n_ctx: Annotated[int, Field(ge=0)] | Literal["auto"] = 2048
    """Context size in tokens (prompt + answer). ``"auto"``: the model's trained
    context, capped so the KV cache takes at most half the memory available
    (``model_info().context_length`` says what was chosen); 0: the trained context,
    whatever its memory."""
    n_batch: int = Field(default=512, ge=1)
    """Prompt tokens evaluated per step (larger is faster for long prompts). A prompt is
    evaluated in chunks of at most 256 tokens at fixed positions (as fast here), the
    unit in which a later prompt reuses a shared prefix (``cache_prompt``)."""
    n_threads: int | None = Field(default=None, ge=1)
    """Threads for decoding; default: every CPU this process may use."""
    n_threads_batch: int | None = Field(default=None, ge=1)
    """Threads for prompt evaluation; default: as ``n_threads``."""
    n_gpu_layers: int | None = None
    """Layers to offload to a GPU (-1: all). Harmless on a CPU-only build."""
    seed: int = -1
    """Sampling seed; -1 picks a random one per call."""
    f16_kv: bool = True
    """Keep the KV cache in float16 (False: float32, exact but twice the memory)."""
    use_mlock: bool = False
    """Lock the model in RAM."""
    use_mmap: bool = True
    """Map the model file instead of reading it."""
    logits_all: bool = False
    """Keep logits of every position (needed only for prompt log-probabilities)."""
    lora_base: str | None = None
    """Base model for the LoRA adapter, if it needs one."""
    lora_path: str | None = None
    """A LoRA adapter to apply."""
    rope_freq_base: float | None = None
    """RoPE base frequency; default: the model's own."""
    rope_freq_scale: float | None = None
    """RoPE frequency scale; default: the model's own."""
    last_n_tokens_size: int = Field(default=64, ge=0)
    """How many recent tokens the repeat penalty looks at."""
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    """More keyword arguments for ``llama_cpp.Llama`` (checked against its signature)."""
    verbose: bool = False
    """Let llama.cpp print its loading and timing logs."""
    streaming: bool = True
    """Send each token to ``on_llm_new_token`` during ``invoke``/``generate`` too
    (False: callbacks get the answer at its end; ``stream()`` always streams)."""
    n_parallel: int = Field(default=16, ge=1, le=256)
    """Prompts of a ``batch``/``abatch`` decoded together, as sequences of one llama.cpp
    context (1: one prompt at a time). Each sequence has a KV cache of its own, sized
    for the batch's longest prompt and answer (at most ``n_ctx``); fewer sequences run
    at once where they would take more than half the memory available."""
    exact_batches: bool = False
    """Decode a batch so that every prompt gets exactly its single-call answer: load the
    weights without llama.cpp's repacked CPU layouts (``CPU_REPACK`` of q4_0, q4_K,
    iq4_nl), and advance at most 4 sequences per ``llama_decode``. llama.cpp's batched
    arithmetic otherwise rounds some rows differently, which can change a greedy
    answer after a few tokens. False (the default): the repacked layouts and every
    sequence in each ``llama_decode``, for throughput."""
    cache_prompt: bool = True
    """Keep the KV cache of the last prompt, so that a prompt sharing a prefix with it
    skips that prefix's prefill (the answer is the same as without: only KV computed
    exactly as a cold prefill computes it is reused)."""

    max_tokens: int | None = Field(default=256, ge=-1)
    """Most tokens to generate; None, 0 or -1: until the context is full."""
    temperature: float = Field(default=0.8, ge=0)
    """Sampling temperature; 0 is greedy."""
    top_p: float = Field(default=0.95, gt=0, le=1)
    """Nucleus sampling."""
    top_k: int = Field(default=40, ge=0)
    """Top-k sampling (0: off)."""
    min_p: float = Field(default=0.05, ge=0, le=1)
    """Min-p sampling."""
    typical_p: float = Field(default=1.0, gt=0, le=1)
    """Locally typical sampling (1: off)."""
    repeat_penalty: float = Field(default=1.1, ge=0)
    """Penalty for repeating recent tokens (1: off)."""
    frequency_penalty: float = 0.0
    """Penalty growing with how often a token already appeared."""
    presence_penalty: float = 0.0
    """Penalty for any token that already appeared."""
    mirostat_mode: int = Field(default=0, ge=0, le=2)
    """Mirostat sampling (0 off, 1 or 2)."""
    mirostat_tau: float = 5.0
    """Mirostat target entropy."""
    mirostat_eta: float = 0.1
    """Mirostat learning rate."""
    echo: bool = False
    """Return the prompt in front of the answer."""
    grammar: GrammarField = None
    """Constrain the output: GBNF text, a :class:`Grammar`, a JSON schema dict or a
    pydantic model class."""
    grammar_path: str | Path | None = None
    """A ``.gbnf`` file to constrain the output with."""

    schema_engine: ClassVar[str | None] = "llguidance"
    call_fields: ClassVar[tuple[str, ...]] = (
        "max_tokens", "temperature", "top_p", "top_k", "min_p", "typical_p",
        "repeat_penalty", "frequency_penalty", "presence_penalty", "mirostat_mode",
        "mirostat_tau", "mirostat_eta", "seed", "echo", "grammar",
    )  # fmt: skip

    _streaming_gates_tokens: ClassVar[bool] = True
    _live_fields: ClassVar[tuple[str, ...]] = ("n_parallel", "cache_prompt")
    _refused: ClassVar[dict[str, Refused]] = {
        "suffix": Refused(
            "fill-in-the-middle is not implemented; leave it unset", error=ValueError
        ),
        "logprobs": Refused(
            "token log-probabilities are not implemented; leave it unset", error=ValueError
        ),
        # langchain_community's parameters, each with the choice made for it:
        "n_parts": Refused(
            "llama.cpp no longer splits models into parts", accept=(-1,), no_effect=True
        ),
        "vocab_only": Refused(
            "it loads no weights, so nothing could be generated", accept=(False,), error=ValueError
        ),
        "client": Refused(
            "give model_path; this class loads the model itself (then `llm.client` is it)"
        ),
    }

    _engine: LlamaCppEngine | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _fields_from_model_kwargs(cls, values: Any) -> Any:
        """``model_kwargs`` keys that have a field of their own become that field.

        So the field (and the cache key) says what llama.cpp runs with.
        """
        if not isinstance(values, dict) or not isinstance(values.get("model_kwargs"), dict):
            return values
        extra = dict(values["model_kwargs"])
        values = dict(values)
        for name in sorted(_LOAD_FIELDS & extra.keys()):
            value = extra.pop(name)
            if name in values and values[name] != value:
                msg = (
                    f"{name} is given twice, as {name}={values[name]!r} and in model_kwargs as "
                    f"{value!r}; give it once"
                )
                raise ValueError(msg)
            values[name] = value
        values["model_kwargs"] = extra
        return values

    @classmethod
    def from_pretrained(
        cls,
        repo_id: str,
        filename: str = "*Q4_K_M.gguf",
        revision: str | None = None,
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        local_files_only: bool | None = None,
        **kwargs: Any,
    ) -> LlamaCpp:
        """Load a GGUF of a Hugging Face Hub repo from the Hub cache, offline first.

        ``filename`` is a path in the repo or a glob over them (``fnmatch``, as
        ``llama_cpp.Llama.from_pretrained`` matches). The cached snapshot of
        ``revision`` is looked at first, without the network; only a file that is not
        cached is downloaded into the cache, and never with ``local_files_only=True``
        or ``HF_HUB_OFFLINE=1``. A split GGUF (``*-00001-of-00003.gguf``) comes with
        all its parts.

        Args:
            repo_id: ``org/name`` on the Hub.
            filename: The file, or a pattern that matches exactly one file (or the
                parts of one split GGUF), e.g. ``"*Q4_K_M.gguf"``.
            revision: A branch, tag or commit hash (default ``main``).
            cache_dir: The Hub cache (default: huggingface_hub's: ``HF_HUB_CACHE``,
                else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``).
            local_files_only: Never use the network (None: as ``HF_HUB_OFFLINE`` says).
            **kwargs: Any other argument of :class:`LlamaCpp` (``n_ctx``,
                ``temperature``, ...).

        Returns:
            A :class:`LlamaCpp` whose ``model_path`` is the file in the cached snapshot.

        Raises:
            FileNotFoundError: No file matches, or it is not cached and may not (or could
                not) be downloaded; the message names the repo, the pattern, the cache
                folder and the ``hf download`` command that fetches it.
            ValueError: The pattern matches several files (the message lists them).
        """
        if "model_path" in kwargs:
            msg = "from_pretrained sets model_path itself (the file in the cache); do not pass it"
            raise TypeError(msg)
        path = hub_file(
            repo_id,
            filename,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            feature="LlamaCpp.from_pretrained",
            extra="llamacpp",
        )
        return cls(model_path=str(path), **kwargs)

    def _setup(self) -> None:
        if self.grammar_path is not None:
            if self.grammar is not None:
                msg = "give grammar or grammar_path, not both"
                raise ValueError(msg)
            self.grammar = Grammar.from_file(self.grammar_path)
        path = model_file(self.model_path, kind="GGUF model", magic=b"GGUF")
        threads = self.n_threads or cpu_count()
        n_ctx = self.n_ctx
        if n_ctx == "auto":
            n_ctx, why = auto_context(path, kv_bytes=2 if self.f16_kv else 4)
            _log.info("LlamaCpp %s: n_ctx='auto' chose %s", path.name, why)
        kwargs: dict[str, Any] = {
            "n_ctx": n_ctx,
            "n_batch": min(self.n_batch, n_ctx) if n_ctx else self.n_batch,
            "n_threads": threads,
            "n_threads_batch": self.n_threads_batch or threads,
            "seed": self.seed if self.seed >= 0 else None,  # None: a random one
            "use_mlock": self.use_mlock,
            "use_mmap": self.use_mmap,
            "logits_all": self.logits_all,
            "last_n_tokens_size": self.last_n_tokens_size,
            "type_k": _F16 if self.f16_kv else _F32,
            "type_v": _F16 if self.f16_kv else _F32,
            "verbose": self.verbose,
        }
        optional = {
            "n_gpu_layers": self.n_gpu_layers,
            "lora_base": self.lora_base,
            "lora_path": self.lora_path,
            "rope_freq_base": self.rope_freq_base,
            "rope_freq_scale": self.rope_freq_scale,
        }
        kwargs.update({k: v for k, v in optional.items() if v is not None})
        kwargs.update(self.model_kwargs)
        self._engine = LlamaCppEngine(path, kwargs, repack=not self.exact_batches)

    @property
    def _llm_type(self) -> str:
        return "llamacpp"

    @property
    def client(self) -> Any:
        """The underlying ``llama_cpp.Llama``."""
        return self.engine.llm

    @property
    def engine(self) -> LlamaCppEngine:
        """The runtime engine this LLM runs on (no LangChain in it)."""
        engine = super().engine
        assert isinstance(engine, LlamaCppEngine)
        return engine

    @property
    def gguf_metadata(self) -> dict[str, str]:
        """The GGUF metadata of the model (architecture, chat template, ...)."""
        return dict(self.client.metadata)

    @override
    def ls_model_name(self) -> str:
        return Path(self.model_path).name

    def model_info(self) -> ModelInfo:
        """Architecture, name and chat template from the GGUF metadata."""
        md = self.client.metadata
        return ModelInfo(
            runtime=self._llm_type,
            model=md.get("general.name") or Path(self.model_path).name,
            architecture=md.get("general.architecture"),
            chat_template=md.get("tokenizer.chat_template"),
            context_length=self.client.n_ctx(),
            **self.engine.special_tokens(),
        )

    def _identity(self) -> dict[str, Any]:
        return {
            "model_path": str(Path(self.model_path).expanduser().resolve()),
            "n_ctx": self.n_ctx,
            "f16_kv": self.f16_kv,
            "exact_batches": self.exact_batches,
            "lora_path": self.lora_path,
            "rope_freq_base": self.rope_freq_base,
            "rope_freq_scale": self.rope_freq_scale,
            "model_kwargs": self.model_kwargs,
            **super()._identity(),
        }

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` in this model's vocabulary."""
        return self.engine.token_ids(text)

    def _pieces(self, prompt: str, call: Call, tally: Tally) -> Iterator[str]:
        engine = self.engine
        yield from engine.pieces(
            prompt, call, tally, reuse=self.cache_prompt, parallel=self.n_parallel
        )

    def _generate_batch(self, prompts: list[str], call: Call) -> list[Row] | None:
        if self.n_parallel <= 1:
            return None  # one at a time through the stream, with token callbacks
        return self.engine.rows(prompts, call, parallel=self.n_parallel, reuse=self.cache_prompt)
