"""GPT4All's engine in this process, from a local GGUF file (nothing is downloaded)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, PrivateAttr, model_validator
from typing_extensions import override

from langchain_localllms.core.events import Tally
from langchain_localllms.core.files import cpu_count, model_file
from langchain_localllms.core.requests import Call, Refused
from langchain_localllms.engines.gguf import gguf_metadata, gguf_special_tokens
from langchain_localllms.engines.gpt4all import GPT4AllEngine
from langchain_localllms.llms._base import LocalLLM
from langchain_localllms.prompts import ModelInfo


class GPT4All(LocalLLM):
    """A GGUF model run by GPT4All's bundled llama.cpp engine.

    GPT4All 2.8 bundles a llama.cpp from 2024: it loads Llama-family GGUF files but
    not newer architectures such as Gemma 3 (that raises a ``ValueError`` naming the
    file and the reason; ``LlamaCpp`` runs such models).

    Setup:
        .. code-block:: bash

            pip install "langchain-localllms[gpt4all]"

    Key init args:
        model: path of the ``.gguf`` file.
        n_threads, device, n_ctx: how the engine runs it.
        max_tokens, temp, top_k, top_p, min_p, repeat_penalty: sampling.

    Instantiate:
        .. code-block:: python

            from langchain_localllms import GPT4All

            llm = GPT4All(model="/models/llama-3.2-1b-instruct-q4_0.gguf", temp=0)

    Invoke:
        .. code-block:: python

            llm.invoke("The first man on the moon was ... Let's think step by step")

    Stream:
        .. code-block:: python

            for piece in llm.stream("The first man on the moon was"):
                print(piece, end="", flush=True)

    Async:
        .. code-block:: python

            await llm.ainvoke("The first man on the moon was")
    """

    model: str
    """Path of the GGUF model file."""
    n_threads: int | None = Field(default=None, ge=1)
    """CPU threads; default: every CPU this process may use."""
    device: str = "cpu"
    """``"cpu"``, ``"gpu"``, ``"kompute"``, ``"cuda"``, ``"amd"``, ``"nvidia"`` or a
    device name from ``gpt4all.GPT4All.list_gpus()``."""
    backend: Literal["cpu", "kompute", "cuda", "metal"] | None = None
    """The compute backend the model must end up on; an error if it does not."""
    n_ctx: int = Field(default=2048, ge=8)
    """Context size in tokens."""
    ngl: int = Field(default=100, ge=0)
    """Layers offloaded to the GPU when ``device`` is one."""
    allow_download: Literal[False] = False
    """Always False: models load from local files only; nothing is fetched."""
    verbose: bool = False
    """Let GPT4All print its debug messages."""
    streaming: bool = True
    """Send each token to ``on_llm_new_token`` during ``invoke``/``generate`` too
    (False: callbacks get the answer at its end; ``stream()`` always streams)."""

    max_tokens: int = Field(default=200, ge=1)
    """Most tokens to generate (``n_predict`` is accepted as another name)."""
    temp: float = Field(default=0.7, ge=0)
    """Sampling temperature; 0 is greedy."""
    top_k: int = Field(default=40, ge=1)
    """Top-k sampling (1 is greedy)."""
    top_p: float = Field(default=0.4, gt=0, le=1)
    """Nucleus sampling."""
    min_p: float = Field(default=0.0, ge=0, le=1)
    """Min-p sampling."""
    repeat_penalty: float = Field(default=1.18, ge=0)
    """Penalty for repeating recent tokens (1: off)."""
    repeat_last_n: int = Field(default=64, ge=0)
    """How many recent tokens the repeat penalty looks at."""
    n_batch: int = Field(default=128, ge=1)
    """Prompt tokens evaluated per step (GPT4All's own default of 8 is slow)."""
    echo: bool = False
    """Return the prompt in front of the answer."""

    call_fields: ClassVar[tuple[str, ...]] = (
        "max_tokens", "temp", "top_k", "top_p", "min_p", "repeat_penalty",
        "repeat_last_n", "n_batch", "echo",
    )  # fmt: skip
    temperature_field: ClassVar[str | None] = "temp"
    # langchain_community's parameters, each with the choice made for it.
    _streaming_gates_tokens: ClassVar[bool] = True
    _refused: ClassVar[dict[str, Refused]] = {
        "seed": Refused(
            "the GPT4All engine cannot be seeded; sampling with temp > 0 differs per call "
            "(temp=0 is repeatable)",
            accept=(0,),  # langchain_community's default, which never seeded anything
            no_effect=True,
        ),
        # langchain_community's defaults (accepted silently) never reached gpt4all either.
        "n_parts": Refused("the GPT4All engine has no such setting", accept=(-1,), no_effect=True),
        "f16_kv": Refused(
            "the GPT4All engine picks its KV cache type", accept=(False,), no_effect=True
        ),
        "use_mlock": Refused(
            "the GPT4All engine has no such setting", accept=(False,), no_effect=True
        ),
        "logits_all": Refused(
            "the GPT4All engine has no such setting", accept=(False,), no_effect=True
        ),
        "vocab_only": Refused(
            "it loads no weights, so nothing could be generated", accept=(False,), error=ValueError
        ),
        "embedding": Refused(
            "this class generates text; for embeddings use an embeddings class",
            accept=(False,),
            error=ValueError,
        ),
        "client": Refused("give model; this class loads the model itself (then `llm.model`)"),
    }

    _engine: GPT4AllEngine | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _n_predict_alias(cls, values: Any) -> Any:
        if isinstance(values, dict) and "n_predict" in values:
            values = dict(values)
            n = values.pop("n_predict")
            if n is not None:
                if values.get("max_tokens", n) != n:
                    msg = "give max_tokens or n_predict (the same thing), not both"
                    raise ValueError(msg)
                values["max_tokens"] = n
        return values

    @property
    def engine(self) -> GPT4AllEngine:
        """The runtime engine this LLM runs on (no LangChain in it)."""
        engine = super().engine
        assert isinstance(engine, GPT4AllEngine)
        return engine

    def _setup(self) -> None:
        path = model_file(self.model, kind="GGUF model", magic=b"GGUF")
        self._engine = GPT4AllEngine(
            path,
            n_threads=self.n_threads or cpu_count(),
            device=self.device,
            n_ctx=self.n_ctx,
            ngl=self.ngl,
            verbose=self.verbose,
        )
        backend = self._engine.model.backend
        if self.backend is not None and backend != self.backend:
            msg = f"the model runs on {backend!r}, not backend={self.backend!r}"
            raise ValueError(msg)

    @property
    def _llm_type(self) -> str:
        return "gpt4all"

    @property
    def client(self) -> Any:
        """The underlying ``gpt4all.GPT4All``."""
        assert self._engine is not None  # set by _setup
        return self._engine.model

    @override
    def ls_model_name(self) -> str:
        return Path(self.model).name

    def _identity(self) -> dict[str, Any]:
        return {
            "model": str(Path(self.model).expanduser().resolve()),
            "n_ctx": self.n_ctx,
            **super()._identity(),
        }

    def model_info(self) -> ModelInfo:
        """Architecture, name and chat template from the GGUF metadata.

        llama.cpp reads them from the file (vocabulary only): gpt4all's bindings cannot.
        """
        path = Path(self.model)
        md = gguf_metadata(path)
        return ModelInfo(
            runtime=self._llm_type,
            model=md.get("general.name") or path.name,
            architecture=md.get("general.architecture"),
            chat_template=md.get("tokenizer.chat_template"),
            context_length=self.n_ctx,
            **gguf_special_tokens(path),
        )

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` in the model's vocabulary.

        llama.cpp reads it from the GGUF file: gpt4all's own bindings cannot tokenize.
        """
        return self.engine.token_ids(text)

    def _pieces(self, prompt: str, call: Call, tally: Tally) -> Iterator[str]:
        assert self._engine is not None  # set by _setup
        yield from self._engine.pieces(prompt, call, tally)
