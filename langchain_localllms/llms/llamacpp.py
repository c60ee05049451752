"""llama.cpp in this process, through llama-cpp-python."""

from __future__ import annotations

import codecs
import inspect
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, PrivateAttr

from langchain_localllms._base import Call, LocalLLM, Refused
from langchain_localllms._files import cpu_count, model_file
from langchain_localllms._imports import require
from langchain_localllms._native import Emit, SharedModel
from langchain_localllms._usage import Tally
from langchain_localllms.grammars import Grammar, GrammarField
from langchain_localllms.prompts import ModelInfo

_F16, _F32 = 1, 0  # ggml type ids of the KV cache


class LlamaCpp(LocalLLM):
    """A GGUF model run by llama.cpp in this process.

    Setup:
        .. code-block:: bash

            pip install "langchain-localllms[llamacpp]"

    Key init args:
        model_path: the ``.gguf`` file.
        n_ctx, n_batch, n_threads, n_gpu_layers: how llama.cpp runs it.
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
    n_ctx: int = Field(default=2048, ge=0)
    """Context size in tokens (prompt + answer); 0 takes the model's trained size."""
    n_batch: int = Field(default=512, ge=1)
    """Prompt tokens evaluated per step (larger is faster for long prompts)."""
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
    """Send each token to ``on_llm_new_token`` during ``invoke``/``generate`` too."""

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

    _call_fields: ClassVar[tuple[str, ...]] = (
        "max_tokens", "temperature", "top_p", "top_k", "min_p", "typical_p",
        "repeat_penalty", "frequency_penalty", "presence_penalty", "mirostat_mode",
        "mirostat_tau", "mirostat_eta", "seed", "echo", "grammar",
    )  # fmt: skip

    _refused: ClassVar[dict[str, Refused]] = {
        "suffix": Refused(
            "fill-in-the-middle is not implemented; leave it unset", error=ValueError
        ),
        "logprobs": Refused(
            "token log-probabilities are not implemented; leave it unset", error=ValueError
        ),
    }

    _shared: SharedModel[Any] | None = PrivateAttr(default=None)
    _grammars: dict[str, Any] = PrivateAttr(default_factory=dict)
    _sliding_window: bool = PrivateAttr(default=False)

    def _setup(self) -> None:
        if self.grammar_path is not None:
            if self.grammar is not None:
                msg = "give grammar or grammar_path, not both"
                raise ValueError(msg)
            self.grammar = Grammar.from_file(self.grammar_path)
        path = model_file(self.model_path, kind="GGUF model", magic=b"GGUF")
        llama_cpp = require("llama_cpp", feature="LlamaCpp")
        threads = self.n_threads or cpu_count()
        kwargs: dict[str, Any] = {
            "n_ctx": self.n_ctx,
            "n_batch": min(self.n_batch, self.n_ctx) if self.n_ctx else self.n_batch,
            "n_threads": threads,
            "n_threads_batch": self.n_threads_batch or threads,
            "seed": self.seed if self.seed >= 0 else llama_cpp.LLAMA_DEFAULT_SEED,
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
        accepted = set(inspect.signature(llama_cpp.Llama.__init__).parameters) - {
            "self", "model_path", "kwargs"
        }  # fmt: skip
        unknown = sorted(set(self.model_kwargs) - accepted)
        if unknown:
            msg = f"model_kwargs has keys llama_cpp.Llama does not take: {', '.join(unknown)}"
            raise ValueError(msg)
        kwargs.update(self.model_kwargs)
        if kwargs.get("vocab_only"):
            msg = "vocab_only=True loads no weights, so nothing could be generated"
            raise ValueError(msg)
        warn_if_amx_build(llama_cpp)
        try:
            llm = llama_cpp.Llama(model_path=str(path), **kwargs)
        except ValueError as e:
            msg = (
                f"llama.cpp could not load {path}: {e}. The file may be truncated, "
                "of an architecture this llama-cpp-python build does not know, or "
                "need more memory than is free; run with verbose=True for the reason."
            )
            raise ValueError(msg) from e
        # Freed when the last copy of this instance goes, and at the latest at exit,
        # before Python tears down the modules llama-cpp-python's destructor needs.
        self._shared = SharedModel(llm, llm.close, name="llamacpp-generate")
        arch = self._llm.metadata.get("general.architecture", "")
        self._sliding_window = f"{arch}.attention.sliding_window" in self._llm.metadata

    @property
    def _llm_type(self) -> str:
        return "llamacpp"

    @property
    def client(self) -> Any:
        """The underlying ``llama_cpp.Llama``."""
        return self._llm

    @property
    def _llm(self) -> Any:
        assert self._shared is not None  # set by _setup
        return self._shared.model

    @property
    def gguf_metadata(self) -> dict[str, str]:
        """The GGUF metadata of the model (architecture, chat template, ...)."""
        return dict(self._llm.metadata)

    def _ls_model_name(self) -> str:
        return Path(self.model_path).name

    def model_info(self) -> ModelInfo:
        """Architecture, name and chat template from the GGUF metadata."""
        md = self._llm.metadata
        vocab = self._llm._model

        def text(token: int) -> str:
            return str(vocab.token_get_text(token)) if token >= 0 else ""

        return ModelInfo(
            runtime=self._llm_type,
            model=md.get("general.name") or Path(self.model_path).name,
            architecture=md.get("general.architecture"),
            chat_template=md.get("tokenizer.chat_template"),
            bos_token=text(vocab.token_bos()),
            eos_token=text(vocab.token_eos()),
            adds_bos=bool(vocab.add_bos_token()),
        )

    def _identity(self) -> dict[str, Any]:
        return {
            "model_path": str(Path(self.model_path).expanduser().resolve()),
            "n_ctx": self.n_ctx,
            "f16_kv": self.f16_kv,
            "lora_path": self.lora_path,
            "rope_freq_base": self.rope_freq_base,
            "rope_freq_scale": self.rope_freq_scale,
            **super()._identity(),
        }

    def get_num_tokens(self, text: str) -> int:
        """Tokens of ``text`` in this model's vocabulary."""
        return len(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def _llama_grammar(self, g: Grammar) -> Any:
        cached = self._grammars.get(g.identity)
        if cached is None:
            llama_grammar = require("llama_cpp.llama_grammar", feature="LlamaCpp")
            cached = llama_grammar.LlamaGrammar.from_string(g.gbnf, verbose=self.verbose)
            self._grammars[g.identity] = cached
        return cached

    def _pieces(self, prompt: str, call: Call, tally: Tally) -> Iterator[str]:
        llama_cpp = require("llama_cpp")
        p = call.params
        llm = self._llm
        tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        if not tokens:
            msg = "the prompt is empty and this model adds no start token; give a prompt"
            raise ValueError(msg)
        n_ctx = min(llm.n_ctx(), len(llm.input_ids))  # llama.cpp may pad n_ctx
        room = n_ctx - len(tokens)
        if room <= 0:
            msg = (
                f"the prompt is {len(tokens)} tokens but the context holds {n_ctx}: "
                f"shorten the prompt or load the model with a larger n_ctx"
            )
            raise ValueError(msg)
        limit = room if not p["max_tokens"] or p["max_tokens"] <= 0 else min(p["max_tokens"], room)
        grammar = self._llama_grammar(p["grammar"]) if p["grammar"] is not None else None
        tally.prompt_tokens = len(tokens)
        if p["echo"]:
            yield prompt
        assert self._shared is not None

        def work(emit: Emit) -> None:
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            if self._sliding_window:
                # llama-cpp-python's KV prefix reuse corrupts sliding-window caches
                # (Gemma 2/3): a repeated prompt then decodes differently. Start clean.
                llm.reset()
            llm.set_seed(p["seed"] if p["seed"] >= 0 else llama_cpp.LLAMA_DEFAULT_SEED)
            steps = llm.generate(
                tokens,
                top_k=p["top_k"],
                top_p=p["top_p"],
                min_p=p["min_p"],
                typical_p=p["typical_p"],
                temp=p["temperature"],
                repeat_penalty=p["repeat_penalty"],
                frequency_penalty=p["frequency_penalty"],
                presence_penalty=p["presence_penalty"],
                mirostat_mode=p["mirostat_mode"],
                mirostat_tau=p["mirostat_tau"],
                mirostat_eta=p["mirostat_eta"],
                grammar=grammar,
            )
            try:
                tally.finish_reason = "length"
                for n, token in enumerate(steps, 1):
                    if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
                        tally.finish_reason = "stop"
                        break
                    # One item per token, text or not, so the reader counts exactly
                    # the tokens it took.
                    if not emit((1, decoder.decode(llm.detokenize([token])))) or n >= limit:
                        break
                tail = decoder.decode(b"", final=True)
                if tail:
                    emit((0, tail))
            finally:
                steps.close()

        for n, text in self._shared.stream(work):
            tally.completion_tokens += n
            if text:
                yield text


def warn_if_amx_build(llama_cpp: Any) -> None:
    """Warn once when llama.cpp was built with AMX kernels and this CPU has AMX.

    Those kernels crash on the first decode of K-quant weights (llama.cpp #20824).
    """
    global _AMX_CHECKED
    if _AMX_CHECKED:
        return
    _AMX_CHECKED = True
    info = llama_cpp.llama_print_system_info()
    info = info.decode(errors="replace") if isinstance(info, bytes) else str(info)
    if "AMX_INT8 = 1" in info and cpu_has_amx():
        warnings.warn(
            "this llama-cpp-python was built with llama.cpp's AMX kernels and this CPU has "
            "AMX: they crash (segmentation fault) on the first decode of K-quant models "
            "(llama.cpp #20824). Rebuild without them: "
            f"{REBUILD_WITHOUT_AMX}",
            RuntimeWarning,
            stacklevel=4,
        )


_AMX_CHECKED = False
#: The reinstall command for CPUs with AMX (docs/llamacpp.md gives it too).
REBUILD_WITHOUT_AMX = (
    'CFLAGS="-mno-amx-int8 -mno-amx-tile -mno-amx-bf16" '
    'CXXFLAGS="-mno-amx-int8 -mno-amx-tile -mno-amx-bf16" '
    "pip install --force-reinstall --no-deps --no-cache-dir --no-binary llama-cpp-python "
    "llama-cpp-python"
)


def cpu_has_amx() -> bool:
    """Whether this machine's CPU reports AMX (Linux ``/proc/cpuinfo``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_int8" in line.split()
    except OSError:
        pass
    return False
