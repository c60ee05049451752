"""GPT4All's engine in this process, from a local GGUF file (nothing is downloaded)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, PrivateAttr, model_validator

from langchain_localllms._base import Call, LocalLLM, Refused
from langchain_localllms._files import cpu_count, model_file
from langchain_localllms._imports import require
from langchain_localllms._native import Emit, SharedModel
from langchain_localllms._usage import Tally

_TOKEN = object()  # one generated token (its text, if any, follows)


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
    """Send each token to ``on_llm_new_token`` during ``invoke``/``generate`` too."""

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

    _call_fields: ClassVar[tuple[str, ...]] = (
        "max_tokens", "temp", "top_k", "top_p", "min_p", "repeat_penalty",
        "repeat_last_n", "n_batch",
    )  # fmt: skip
    _temperature_field: ClassVar[str | None] = "temp"
    _refused: ClassVar[dict[str, Refused]] = {
        **dict.fromkeys(
            ("seed", "n_parts", "f16_kv", "logits_all", "vocab_only", "use_mlock", "embedding"),
            Refused("the GPT4All engine has no such setting; remove it"),
        ),
        "echo": Refused("the GPT4All engine cannot return the prompt; prepend it yourself"),
    }

    _shared: SharedModel[Any] | None = PrivateAttr(default=None)

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

    def _setup(self) -> None:
        path = model_file(self.model, kind="GGUF model", magic=b"GGUF")
        gpt4all = require("gpt4all", feature="GPT4All")
        try:
            model = gpt4all.GPT4All(
                model_name=path.name,
                model_path=str(path.parent),
                allow_download=False,
                n_threads=self.n_threads or cpu_count(),
                device=self.device,
                n_ctx=self.n_ctx,
                ngl=self.ngl,
                verbose=self.verbose,
            )
        except (RuntimeError, ValueError) as e:
            msg = (
                f"GPT4All could not load {path}: {e}. Its bundled llama.cpp (gpt4all "
                f"{getattr(gpt4all, '__version__', '2.8')}) knows Llama-family models, "
                "not newer architectures; LlamaCpp from this package runs them."
            )
            raise ValueError(msg) from e
        self._shared = SharedModel(model, model.close, name="gpt4all-generate")
        if self.backend is not None and model.backend != self.backend:
            msg = f"the model runs on {model.backend!r}, not backend={self.backend!r}"
            raise ValueError(msg)

    @property
    def _llm_type(self) -> str:
        return "gpt4all"

    @property
    def client(self) -> Any:
        """The underlying ``gpt4all.GPT4All``."""
        assert self._shared is not None  # set by _setup
        return self._shared.model

    def _ls_model_name(self) -> str:
        return Path(self.model).name

    def _identity(self) -> dict[str, Any]:
        return {
            "model": str(Path(self.model).expanduser().resolve()),
            "n_ctx": self.n_ctx,
            **super()._identity(),
        }

    def _pieces(self, prompt: str, call: Call, tally: Tally) -> Iterator[str]:
        if not prompt:
            msg = "the prompt is empty; GPT4All needs some text to continue"
            raise ValueError(msg)
        p = call.params
        assert self._shared is not None
        engine = self._shared.model.model  # gpt4all's LLModel
        raw_decoder = type(engine)._callback_decoder
        counts = {"prompt": 0, "decoded": 0}

        def work(emit: Emit) -> None:
            def count_prompt(token_id: int) -> bool:
                counts["prompt"] += 1
                return True

            def count_completion(callback: Any) -> Any:
                # Every generated token passes here, also those whose bytes gpt4all
                # holds back until a UTF-8 character is complete: one item each, so
                # the reader counts exactly the tokens it took.
                decode = raw_decoder(engine, callback)

                def raw(token_id: int, response: bytes) -> bool:
                    counts["decoded"] += 1
                    if not emit(_TOKEN):
                        return False
                    return bool(decode(token_id, response)) and counts["decoded"] < p["max_tokens"]

                return raw

            def on_text(token_id: int, text: str) -> bool:
                return emit(text)

            engine._prompt_callback = count_prompt
            engine._callback_decoder = count_completion
            try:
                engine.prompt_model(
                    prompt,
                    "%1",
                    on_text,
                    n_predict=p["max_tokens"],
                    temp=p["temp"],
                    top_k=1 if p["temp"] == 0 else p["top_k"],
                    top_p=p["top_p"],
                    min_p=p["min_p"],
                    repeat_penalty=p["repeat_penalty"],
                    repeat_last_n=p["repeat_last_n"],
                    n_batch=p["n_batch"],
                    reset_context=True,
                )
            finally:
                del engine._prompt_callback, engine._callback_decoder

        items = self._shared.stream(work)
        try:
            for item in items:
                if item is _TOKEN:
                    tally.completion_tokens += 1
                elif item:
                    yield item
        finally:
            items.close()  # the worker has ended: the counts are final
            tally.prompt_tokens = counts["prompt"]
            tally.finish_reason = "length" if counts["decoded"] >= p["max_tokens"] else "stop"
