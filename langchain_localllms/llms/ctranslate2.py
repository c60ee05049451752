"""CTranslate2 in this process: converted Transformer decoders on CPU or GPU."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, PrivateAttr, field_validator
from typing_extensions import override

from langchain_localllms.conversion import QUANTIZATIONS, convert_to_ctranslate2
from langchain_localllms.core.events import Row, Tally
from langchain_localllms.core.hub import hub_snapshot, is_repo_id
from langchain_localllms.core.requests import Call, Refused
from langchain_localllms.engines.ctranslate2 import (
    CTranslate2Engine,
    ct2_dir,
    read_json,
    source_model_type,
)
from langchain_localllms.llms._base import LocalLLM, identity_value
from langchain_localllms.prompts import ModelInfo

__all__ = ["CTranslate2"]


#: What ``ctranslate2.Generator(compute_type=...)`` accepts.
COMPUTE_TYPES = ("default", "auto", *QUANTIZATIONS)
#: ``ctranslate2.Generator`` arguments that ``ctranslate2_kwargs`` may carry.
_GENERATOR_KWARGS = (
    "inter_threads", "intra_threads", "max_queued_batches", "flash_attention",
    "tensor_parallel", "files",
)  # fmt: skip

_NO_GRAMMAR = Refused(
    "CTranslate2 cannot constrain decoding with a grammar: its generate_batch has no "
    "logits hook, so the grammar would be ignored. Use a runtime that can: LlamaCpp, "
    "Llamafile, Ollama or HuggingFacePipeline.",
    error=ValueError,
)
_NOT_OUTPUT = "not part of LangChain's LLM output"
#: ``generate_batch`` options (and LangChain parameters) this class refuses.
_REFUSED = {
    "num_hypotheses": Refused(
        "LangChain's LLM interface returns one text per prompt; to get several "
        "answers, sample (sampling_topk > 1) and repeat the prompt in batch()",
        accept=(1,), error=ValueError,
    ),
    "return_scores": Refused(f"scores are {_NOT_OUTPUT}", accept=(False,), error=ValueError),
    "return_logits_vocab": Refused(f"logits are {_NOT_OUTPUT}", accept=(False,), error=ValueError),
    "return_alternatives": Refused(
        f"alternatives are {_NOT_OUTPUT}", accept=(False,), error=ValueError
    ),
    "min_alternative_expansion_prob": Refused(
        "it only applies with return_alternatives", error=ValueError
    ),
    "return_end_token": Refused(
        "the end token is a special token and never part of the text",
        accept=(False,), error=ValueError,
    ),
    "asynchronous": Refused(
        "use ainvoke / astream / abatch, which do not block the event loop",
        accept=(False,), error=ValueError,
    ),
    "callback": Refused(
        "use LangChain callbacks: on_llm_new_token receives every piece", error=ValueError
    ),
    "include_prompt_in_result": Refused(
        "the answer never contains the prompt (prepend it yourself if you need it)",
        accept=(False,), error=ValueError,
    ),
    "grammar": _NO_GRAMMAR,
    "grammar_path": _NO_GRAMMAR,
    "client": Refused(
        "CTranslate2 builds its ctranslate2.Generator from model_path, device, "
        "device_index, compute_type and ctranslate2_kwargs; pass those, not client=",
        error=ValueError,
    ),
}  # fmt: skip


class CTranslate2(LocalLLM):
    r"""A Transformer decoder converted to CTranslate2, run in this process.

    Streams token by token (``Generator.generate_tokens``), batches natively (one
    ``generate_batch`` for ``batch()`` / ``generate()`` of many prompts), never repeats
    the prompt in its answer, and applies stop sequences while it decodes.

    Setup:
        .. code-block:: bash

            pip install "langchain-localllms[ctranslate2]"
            # convert once (or let CTranslate2.from_pretrained do it and cache it):
            ct2-transformers-converter --model <hf dir> --output_dir <ct2 dir> \\
                --copy_files tokenizer.json tokenizer_config.json

    Key init args:
        model_path: the converted model directory (``model.bin``, ``config.json``).
        tokenizer_name: the tokenizer (default: the one copied into ``model_path``).
        device, device_index, compute_type, inter_threads, intra_threads: how
            CTranslate2 runs it.
        max_length, sampling_topk, sampling_topp, sampling_temperature,
            repetition_penalty, ...: decoding; each may also be given per call.

    Instantiate:
        .. code-block:: python

            from langchain_localllms import CTranslate2

            llm = CTranslate2(model_path="./gemma-3-270m-ct2", max_length=64)
            # or convert a Hugging Face directory once and cache the result:
            llm = CTranslate2.from_pretrained("./gemma-3-270m", quantization="int8")

    Invoke:
        .. code-block:: python

            llm.invoke("The first man on the moon was", sampling_topk=50,
                       sampling_temperature=0.2, repetition_penalty=2)

    Stream:
        .. code-block:: python

            for piece in llm.stream("The first man on the moon was"):
                print(piece, end="", flush=True)

    Async:
        .. code-block:: python

            await llm.ainvoke("The first man on the moon was")
            await llm.abatch(["List of fruits:", "List of colours:"])
    """

    model_path: str
    """Directory of the CTranslate2 model (``model.bin``, ``config.json``, vocabulary)."""
    tokenizer_name: str | None = None
    """Hugging Face tokenizer (directory or hub name); default: ``model_path`` when the
    converted directory holds the tokenizer files (``--copy_files``)."""
    tokenizer: Any = None
    """A loaded ``transformers`` tokenizer to use instead of loading one; after loading
    it holds the tokenizer in use."""
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    """Where to run: ``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when there is one)."""
    device_index: int | list[int] = 0
    """GPU id, or a list of ids to run one model replica on each."""
    compute_type: str | dict[str, str] = "default"
    """Computation type: ``default`` (as converted), ``auto`` (fastest the device
    supports), ``int8``, ``int8_float32``, ``int8_float16``, ``int8_bfloat16``,
    ``int16``, ``float16``, ``bfloat16``, ``float32``; or a dict device -> type."""
    inter_threads: int = Field(default=1, ge=1)
    """How many generations may run in parallel (each on its own model replica)."""
    intra_threads: int = Field(default=0, ge=0)
    """Threads per generation (0: CTranslate2's default for this machine)."""
    ctranslate2_kwargs: dict[str, Any] = Field(default_factory=dict)
    """More ``ctranslate2.Generator`` arguments: ``max_queued_batches``,
    ``flash_attention``, ``tensor_parallel``, ``files``."""

    max_length: int = Field(default=512, ge=1)
    """Most tokens to generate (the prompt is not counted)."""
    max_input_length: int | None = Field(default=None, ge=0)
    """Longest prompt in tokens; a longer one is a ``ContextOverflowError``, never cut.
    None: the context the model was trained for, where the directory records it
    (``from_pretrained`` conversions do), else no limit (CTranslate2's generator has
    none: set it for models converted elsewhere). 0: no limit."""
    min_length: int = Field(default=0, ge=0)
    """Fewest tokens to generate before the end token is allowed."""
    sampling_topk: int = Field(default=1, ge=0)
    """Sample from the k most likely tokens; 1 is greedy, 0 the whole vocabulary."""
    sampling_topp: float = Field(default=1.0, gt=0, le=1)
    """Nucleus sampling: keep the most likely tokens up to this probability mass."""
    sampling_temperature: float = Field(default=1.0, ge=0)
    """Sampling temperature; 0 is greedy (like ``sampling_topk=1``)."""
    repetition_penalty: float = Field(default=1.0, gt=0)
    """Penalty for tokens already in the prompt or answer (> 1 penalizes, 1: off)."""
    no_repeat_ngram_size: int = Field(default=0, ge=0)
    """Never repeat an n-gram of this size (0: off)."""
    disable_unk: bool = False
    """Never generate the unknown token."""
    suppress_sequences: list[str] | list[list[str]] | None = None
    """Texts (or token lists) the model may not generate."""
    end_token: str | list[str] | list[int] | None = None
    """Token(s) that end the answer; default: the model's end-of-sequence token(s)
    (``config.json`` and ``generation_config.json``)."""
    static_prompt: str | list[str] | None = None
    """Text (or tokens) put before every prompt, e.g. a system prompt, whose model
    state CTranslate2 can cache (see ``cache_static_prompt``)."""
    cache_static_prompt: bool = True
    """Cache the model state after ``static_prompt`` and reuse it."""
    beam_size: int = Field(default=1, ge=1)
    """Beam search width (1: greedy or sampling). With beams the answer arrives as
    one piece: beam search cannot stream."""
    patience: float = Field(default=1.0, gt=0)
    """Beam search patience factor."""
    length_penalty: float = 1.0
    """Exponential length penalty of beam search."""
    max_batch_size: int = Field(default=0, ge=0)
    """Largest batch ``generate_batch`` runs at once (0: all the prompts of a call);
    larger calls are sorted by length and split."""
    batch_type: Literal["examples", "tokens"] = "examples"
    """Whether ``max_batch_size`` counts prompts or tokens."""

    call_fields: ClassVar[tuple[str, ...]] = (
        "max_length", "max_input_length", "min_length", "sampling_topk", "sampling_topp",
        "sampling_temperature", "repetition_penalty", "no_repeat_ngram_size",
        "disable_unk", "suppress_sequences", "end_token", "static_prompt",
        "cache_static_prompt", "beam_size", "patience", "length_penalty",
        "max_batch_size", "batch_type",
    )  # fmt: skip
    _refused: ClassVar[dict[str, Refused]] = _REFUSED
    temperature_field: ClassVar[str | None] = "sampling_temperature"
    _shared_fields: ClassVar[tuple[str, ...]] = ("tokenizer",)
    max_tokens_field: ClassVar[str | None] = "max_length"

    _engine: CTranslate2Engine | None = PrivateAttr(default=None)

    @field_validator("compute_type")
    @classmethod
    def _check_compute_type(cls, value: str | dict[str, str]) -> str | dict[str, str]:
        types = value.values() if isinstance(value, dict) else [value]
        for t in types:
            if t not in COMPUTE_TYPES:
                msg = f"compute_type {t!r} is not one of {', '.join(COMPUTE_TYPES)}"
                raise ValueError(msg)
        if isinstance(value, dict):
            for d in value:
                if d not in ("cpu", "cuda"):
                    msg = f"compute_type maps devices to types; {d!r} is not 'cpu' or 'cuda'"
                    raise ValueError(msg)
        return value

    @field_validator("device_index")
    @classmethod
    def _check_device_index(cls, value: int | list[int]) -> int | list[int]:
        ids = value if isinstance(value, list) else [value]
        if not ids or any(i < 0 for i in ids):
            msg = f"device_index must be a GPU id >= 0 or a non-empty list of them, got {value!r}"
            raise ValueError(msg)
        return value

    # ------------------------------------------------------------------ loading
    def _setup(self) -> None:
        if self.tokenizer is not None and self.tokenizer_name is not None:
            msg = "give tokenizer (a loaded tokenizer) or tokenizer_name, not both"
            raise ValueError(msg)
        self._engine = CTranslate2Engine(
            ct2_dir(self.model_path),
            device=self.device,
            device_index=self.device_index,
            compute_type=self.compute_type,
            generator_kwargs=self._generator_kwargs(),
            tokenizer=self.tokenizer,
            tokenizer_name=self.tokenizer_name,
        )
        self.tokenizer = self._engine.tokenizer

    def _generator_kwargs(self) -> dict[str, Any]:
        extra = dict(self.ctranslate2_kwargs)
        unknown = sorted(set(extra) - set(_GENERATOR_KWARGS))
        if unknown:
            msg = (
                f"ctranslate2_kwargs has keys ctranslate2.Generator does not take: "
                f"{', '.join(unknown)} (it takes {', '.join(_GENERATOR_KWARGS)}; "
                "device, device_index and compute_type are fields of CTranslate2)"
            )
            raise ValueError(msg)
        kwargs: dict[str, Any] = {
            "inter_threads": self.inter_threads,
            "intra_threads": self.intra_threads,
        }
        for name in ("inter_threads", "intra_threads"):
            if name in extra and name in self.model_fields_set:
                msg = f"{name} was given both as a field and in ctranslate2_kwargs; give it once"
                raise ValueError(msg)
        kwargs.update(extra)
        return kwargs

    # ----------------------------------------------------------------- identity
    @property
    def _llm_type(self) -> str:
        return "ctranslate2"

    @property
    def client(self) -> Any:
        """The underlying ``ctranslate2.Generator``."""
        return self._engine.client if self._engine is not None else None

    def _release(self) -> None:
        super()._release()
        if self._init_args.get("tokenizer") is None:
            self.tokenizer = None  # the one loaded here (a large vocabulary's is big)

    def unload(self) -> None:
        """Free the model's weights but keep this instance: the next call loads them again.

        CTranslate2's own ``unload_model``; calls running now end first. ``close()``
        frees everything for good.
        """
        self._check_open()
        assert self._engine is not None  # set by _setup
        self._engine.unload()

    @override
    def ls_model_name(self) -> str:
        return Path(self.model_path).name

    def _identity(self) -> dict[str, Any]:
        tokenizer = self.tokenizer_name or getattr(self.tokenizer, "name_or_path", None)
        return {
            "model_path": str(Path(self.model_path).expanduser().resolve()),
            "tokenizer": str(tokenizer),
            "device": self.device,
            "compute_type": identity_value(self.compute_type),
            **super()._identity(),
        }

    def model_info(self) -> ModelInfo:
        """Name, family, chat template and start/end tokens, from the tokenizer."""
        tok = self.tokenizer
        architecture = source_model_type(Path(self.model_path).expanduser())
        hf_config = Path(self.tokenizer_name or "") / "config.json"
        if architecture is None and self.tokenizer_name and hf_config.is_file():
            architecture = read_json(hf_config).get("model_type")  # the HF source dir
        if architecture is None:  # converted elsewhere: the tokenizer names the family
            architecture = _tokenizer_family(tok)
        starts = tok("")["input_ids"]
        template = getattr(tok, "chat_template", None)
        return ModelInfo(
            runtime=self._llm_type,
            model=self.ls_model_name(),
            architecture=architecture,
            chat_template=template if isinstance(template, str) else None,
            bos_token=tok.bos_token or "",
            eos_token=tok.eos_token or "",
            adds_bos=bool(starts) and starts[0] == tok.bos_token_id,
            context_length=self.max_input_length or self.engine.trained_context,
        )

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` in this model's vocabulary (no special tokens)."""
        return self.engine.token_ids(text)

    # ---------------------------------------------------------------- converting
    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | os.PathLike[str],
        quantization: str | None = None,
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        force: bool = False,
        progress: bool = True,
        revision: str | None = None,
        hub_cache_dir: str | os.PathLike[str] | None = None,
        local_files_only: bool | None = None,
        **kwargs: Any,
    ) -> CTranslate2:
        """Convert a Hugging Face model (a directory or a Hub id) once, cached, and load it.

        A Hub id (``org/name``) is resolved in the Hugging Face Hub cache first, without
        the network (huggingface_hub's ``snapshot_download``); only a model that is not
        cached is downloaded, and never with ``local_files_only=True`` or
        ``HF_HUB_OFFLINE=1``. The cached snapshot is then converted like a directory.

        Args:
            model_dir: A local Hugging Face model directory (``config.json`` + weights
                + tokenizer files), or a Hub id.
            quantization: Weight type of the converted model (``int8``, ``int8_float16``,
                ``float16``, ``bfloat16``, ...); ``None`` keeps the weights' type.
            cache_dir: Where converted models are kept; default
                ``$LOCALLLMS_CACHE/ct2`` (``~/.cache/langchain-localllms/ct2``).
            force: Convert again even if a cached conversion exists.
            progress: Show a progress bar while converting, on a terminal (the
                conversion is logged either way).
            revision: For a Hub id: a branch, tag or commit hash (default ``main``).
            hub_cache_dir: For a Hub id: the Hugging Face Hub cache (default:
                huggingface_hub's, ``HF_HUB_CACHE`` or ``$HF_HOME/hub``).
            local_files_only: For a Hub id: never use the network (None: as
                ``HF_HUB_OFFLINE`` says).
            **kwargs: Any other argument of :class:`CTranslate2` (``device``,
                ``max_length``, ...).

        Returns:
            A :class:`CTranslate2` on the converted model.

        Raises:
            FileNotFoundError: The directory does not exist, or the Hub id is not cached
                and may not (or could not) be downloaded; the message says what to run.
        """
        if "model_path" in kwargs:
            msg = "from_pretrained sets model_path itself (the converted copy); do not pass it"
            raise TypeError(msg)
        source: str | os.PathLike[str] = model_dir
        if isinstance(model_dir, str) and is_repo_id(model_dir):
            source = hub_snapshot(
                model_dir,
                revision=revision,
                cache_dir=hub_cache_dir,
                local_files_only=local_files_only,
                feature="CTranslate2.from_pretrained",
                extra="ctranslate2",
            )
        elif revision is not None or hub_cache_dir is not None:
            msg = (
                f"revision and hub_cache_dir apply to a Hub id; {str(model_dir)!r} is a "
                "local path (give the directory of the revision you want)"
            )
            raise ValueError(msg)
        path = convert_to_ctranslate2(
            source, quantization, cache_dir=cache_dir, force=force, show_progress=progress
        )
        return cls(model_path=str(path), **kwargs)

    # --------------------------------------------------------------- generation
    @property
    def engine(self) -> CTranslate2Engine:
        """The runtime engine this LLM runs on (no LangChain in it)."""
        engine = super().engine
        assert isinstance(engine, CTranslate2Engine)
        return engine

    def _pieces(self, prompt: str, call: Call, tally: Tally) -> Iterator[str]:
        yield from self.engine.pieces(prompt, call, tally)

    def _generate_batch(self, prompts: list[str], call: Call) -> list[Row]:
        return self.engine.rows(prompts, call)

    @override
    def choose(self, prompt: str, options: list[str]) -> int | None:
        return self.engine.choose(prompt, options)


def _tokenizer_family(tokenizer: Any) -> str | None:
    """The model family a tokenizer class names (``GemmaTokenizerFast`` -> ``gemma``)."""
    name = type(tokenizer).__name__.lower().removesuffix("fast").removesuffix("tokenizer")
    return name or None
