"""CTranslate2 in this process: converted Transformer decoders on CPU or GPU."""

from __future__ import annotations

import atexit
import gc
import json
import os
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, PrivateAttr, field_validator

from langchain_localllms._base import Call, LocalLLM, Refused, Row, identity_value
from langchain_localllms._detok import IncrementalDetokenizer
from langchain_localllms._files import model_dir
from langchain_localllms._imports import require
from langchain_localllms._stop import StopStream
from langchain_localllms._usage import Tally
from langchain_localllms.conversion import QUANTIZATIONS, TOKENIZER_FILES, convert_to_ctranslate2
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

#: How many prompt tokens the detokenizer decodes along with the first answer
#: tokens, so the answer starts as a continuation (with its leading space).


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

    _call_fields: ClassVar[tuple[str, ...]] = (
        "max_length", "min_length", "sampling_topk", "sampling_topp",
        "sampling_temperature", "repetition_penalty", "no_repeat_ngram_size",
        "disable_unk", "suppress_sequences", "end_token", "static_prompt",
        "cache_static_prompt", "beam_size", "patience", "length_penalty",
        "max_batch_size", "batch_type",
    )  # fmt: skip
    _refused: ClassVar[dict[str, Refused]] = _REFUSED
    _temperature_field: ClassVar[str | None] = "sampling_temperature"
    _max_tokens_field: ClassVar[str | None] = "max_length"

    _handle: _Handle | None = PrivateAttr(default=None)
    _end_ids: list[int] = PrivateAttr(default_factory=list)
    _bos: str | None = PrivateAttr(default=None)

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
        path = _ct2_dir(self.model_path)
        ct2 = require("ctranslate2", feature="CTranslate2")
        kwargs = self._generator_kwargs()
        device = self._check_device(ct2)
        try:
            generator = ct2.Generator(
                str(path),
                device=self.device,
                device_index=self.device_index,
                compute_type=self.compute_type,
                **kwargs,
            )
        except (RuntimeError, ValueError) as e:
            msg = (
                f"CTranslate2 could not load {path} on {device}: {e}. The model may be "
                "truncated, converted by a newer CTranslate2, or need more memory than "
                "is free; re-convert it (CTranslate2.from_pretrained or "
                "ct2-transformers-converter)."
            )
            raise ValueError(msg) from e
        self._handle = _Handle(generator)
        if self.tokenizer is None:
            self.tokenizer = self._load_tokenizer(path)
        config = _read_json(path / "config.json")
        self._bos = config.get("bos_token")
        self._end_ids = self._default_end_ids(path, config)

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

    def _check_device(self, ct2: Any) -> str:
        """Check device and compute_type before native code; return the device used."""
        gpus = ct2.get_cuda_device_count()
        device = self.device
        if device == "auto":
            device = "cuda" if gpus > 0 else "cpu"
        if device == "cuda":
            if gpus == 0:
                msg = (
                    "device='cuda' but CTranslate2 sees no CUDA GPU "
                    "(ctranslate2.get_cuda_device_count() == 0): use device='cpu', or "
                    "device='auto' to take a GPU when there is one"
                )
                raise ValueError(msg)
            ids = self.device_index if isinstance(self.device_index, list) else [self.device_index]
            bad = [i for i in ids if i >= gpus]
            if bad:
                msg = (
                    f"device_index {bad} does not exist: this machine has {gpus} GPU(s), "
                    f"ids 0..{gpus - 1}"
                )
                raise ValueError(msg)
        compute = self.compute_type
        if isinstance(compute, dict):
            compute = compute.get(device, "default")
        if compute not in ("default", "auto"):
            supported = sorted(ct2.get_supported_compute_types(device))
            if compute not in supported:
                msg = (
                    f"compute_type {compute!r} is not supported on {device} here; "
                    f"choose one of: default, auto, {', '.join(supported)}"
                )
                raise ValueError(msg)
        return device

    def _load_tokenizer(self, path: Path) -> Any:
        name = self.tokenizer_name
        if name is None:
            if not any((path / f).is_file() for f in (*TOKENIZER_FILES[:3], "vocab.json")):
                msg = (
                    f"{path} holds no tokenizer files: pass tokenizer_name= (the Hugging "
                    "Face model directory or hub name the model was converted from), or "
                    "convert with --copy_files tokenizer.json tokenizer_config.json"
                )
                raise ValueError(msg)
            name = str(path)
        transformers = require(
            "transformers", feature="CTranslate2 (its tokenizer)", extra="ctranslate2"
        )
        kwargs: dict[str, Any] = {}
        # transformers reads config.json to decide whether to warn about a bad Mistral
        # tokenizer regex; in a converted directory that is CTranslate2's config (no
        # model_type), so it would warn for every model. Only a Mistral source warns.
        if (
            _is_same_dir(name, path)
            and int(transformers.__version__.split(".")[0]) >= 5
            and self._source_model_type(path) not in _MISTRAL_TYPES
        ):
            kwargs["fix_mistral_regex"] = False
        try:
            return transformers.AutoTokenizer.from_pretrained(name, **kwargs)
        except (OSError, ValueError) as e:
            msg = (
                f"could not load the tokenizer {name!r}: {e}. Give tokenizer_name= the "
                "Hugging Face model directory (or hub name) the CTranslate2 model was "
                "converted from."
            )
            raise (OSError(msg) if isinstance(e, OSError) else ValueError(msg)) from e

    @staticmethod
    def _source_model_type(path: Path) -> str | None:
        """``model_type`` of the Hugging Face model ``from_pretrained`` converted."""
        about = path / "langchain-localllms.json"
        source = _read_json(about).get("source") if about.is_file() else None
        config = Path(source) / "config.json" if source else None
        if config is None or not config.is_file():
            return None
        value = _read_json(config).get("model_type")
        return value if isinstance(value, str) else None

    def _default_end_ids(self, path: Path, config: dict[str, Any]) -> list[int]:
        """End-of-sequence ids: the converted model's, plus generation_config.json's."""
        ids: list[int] = []
        eos = config.get("eos_token")
        for token in [eos] if isinstance(eos, str) else (eos or []):
            tid = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(tid, int):
                ids.append(tid)
        gen = path / "generation_config.json"
        extra = _read_json(gen).get("eos_token_id") if gen.is_file() else None
        for tid in [extra] if isinstance(extra, int) else (extra or []):
            ids.append(int(tid))
        if not ids and self.tokenizer.eos_token_id is not None:
            ids.append(int(self.tokenizer.eos_token_id))
        return sorted(set(ids))

    # ----------------------------------------------------------------- identity
    @property
    def _llm_type(self) -> str:
        return "ctranslate2"

    @property
    def client(self) -> Any:
        """The underlying ``ctranslate2.Generator``."""
        return self._handle.generator if self._handle is not None else None

    @property
    def _generator(self) -> Any:
        generator = self.client
        if generator is None:
            msg = "this CTranslate2 model was released (the interpreter is exiting)"
            raise RuntimeError(msg)
        return generator

    def _ls_model_name(self) -> str:
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
        architecture = self._source_model_type(Path(self.model_path).expanduser())
        hf_config = Path(self.tokenizer_name or "") / "config.json"
        if architecture is None and self.tokenizer_name and hf_config.is_file():
            architecture = _read_json(hf_config).get("model_type")  # the HF source dir
        starts = tok("")["input_ids"]
        template = getattr(tok, "chat_template", None)
        return ModelInfo(
            runtime=self._llm_type,
            model=self._ls_model_name(),
            architecture=architecture,
            chat_template=template if isinstance(template, str) else None,
            bos_token=tok.bos_token or "",
            eos_token=tok.eos_token or "",
            adds_bos=bool(starts) and starts[0] == tok.bos_token_id,
        )

    def get_num_tokens(self, text: str) -> int:
        """Tokens of ``text`` in this model's vocabulary (no special tokens)."""
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    # ------------------------------------------------------------ call options
    # ---------------------------------------------------------------- encoding
    def _encode(self, prompts: list[str], *, specials: bool) -> list[list[int]]:
        """Prompt ids as the tokenizer makes them.

        With the tokenizer's own start token when ``specials`` (not after a static
        prompt); an end token the tokenizer appends is dropped.
        """
        tok = self.tokenizer
        encoded = tok(prompts, add_special_tokens=specials)["input_ids"]
        eos, eos_text = tok.eos_token_id, tok.eos_token
        out = []
        for prompt, ids in zip(prompts, encoded, strict=True):
            ids = list(ids)
            if len(ids) > 1 and ids[-1] == eos and not (eos_text and prompt.endswith(eos_text)):
                ids.pop()
            if not ids and specials:
                if self._bos is None:
                    msg = (
                        "the prompt is empty and neither the tokenizer nor the model "
                        "defines a start token; give a prompt"
                    )
                    raise ValueError(msg)
                ids = [tok.convert_tokens_to_ids(self._bos)]
            out.append(ids)
        return out

    def _static(self, p: dict[str, Any]) -> list[int] | None:
        static = p["static_prompt"]
        if static is None:
            return None
        if isinstance(static, str):
            return self._encode([static], specials=True)[0]
        return list(self.tokenizer.convert_tokens_to_ids(static))

    def _prompts(
        self, prompts: list[str], p: dict[str, Any]
    ) -> tuple[list[int] | None, list[list[int]]]:
        """The static prompt's ids (if any) and each prompt's ids.

        CTranslate2 needs at least one start token after a static prompt; if a prompt
        is empty, the static prompt becomes part of every prompt of the call instead.
        """
        static = self._static(p)
        if static is None:
            return None, self._encode(prompts, specials=True)
        encoded = self._encode(prompts, specials=False)
        if all(encoded):
            return static, encoded
        return None, [[*static, *ids] for ids in encoded]

    def _tokens(self, ids: Sequence[int]) -> list[str]:
        return list(self.tokenizer.convert_ids_to_tokens(list(ids)))

    def _token_ids(self, tokens: Sequence[str], what: str) -> list[int]:
        ids = []
        unk = self.tokenizer.unk_token_id
        for token in tokens:
            tid = self.tokenizer.convert_tokens_to_ids(token)
            if tid is None or (tid == unk and token != self.tokenizer.unk_token):
                msg = f"{what} {token!r} is not a token of this model's vocabulary"
                raise ValueError(msg)
            ids.append(int(tid))
        return ids

    def _options(self, p: dict[str, Any], static: list[int] | None) -> dict[str, Any]:
        """Decoding options for ``generate_tokens`` / ``generate_batch``."""
        topk, temperature = p["sampling_topk"], p["sampling_temperature"]
        if temperature == 0:
            topk, temperature = 1, 1.0
        end = p["end_token"]
        if end is None:
            end_ids = self._end_ids
        elif isinstance(end, str):
            end_ids = self._token_ids([end], "end_token")
        elif all(isinstance(e, str) for e in end):
            end_ids = self._token_ids(end, "end_token")
        else:
            end_ids = [int(e) for e in end]
        options: dict[str, Any] = {
            "max_length": p["max_length"],
            "min_length": p["min_length"],
            "sampling_topk": topk,
            "sampling_topp": p["sampling_topp"],
            "sampling_temperature": temperature,
            "repetition_penalty": p["repetition_penalty"],
            "no_repeat_ngram_size": p["no_repeat_ngram_size"],
            "disable_unk": p["disable_unk"],
            "end_token": end_ids,
        }
        if p["suppress_sequences"]:
            options["suppress_sequences"] = [
                s if isinstance(s, list) else self._tokens(self._encode([s], specials=False)[0])
                for s in p["suppress_sequences"]
            ]
        if static is not None:
            options["static_prompt"] = self._tokens(static)
            options["cache_static_prompt"] = p["cache_static_prompt"]
        return options

    def _detokenizer(self, context: Sequence[int]) -> IncrementalDetokenizer:
        tok = self.tokenizer

        def decode(ids: list[int]) -> str:
            return str(
                tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            )

        return IncrementalDetokenizer(decode, context)

    # --------------------------------------------------------------- generation
    def _pieces(self, prompt: str, call: Call, tally: Tally) -> Iterator[str]:
        p = call.params
        static, (ids,) = self._prompts([prompt], p)
        options = self._options(p, static)
        end_ids = set(options["end_token"])
        tally.prompt_tokens = len(ids) + len(static or [])
        detok = self._detokenizer([*(static or []), *ids])
        if p["beam_size"] > 1:
            result = self._generator.generate_batch(
                [self._tokens(ids)],
                beam_size=p["beam_size"],
                patience=p["patience"],
                length_penalty=p["length_penalty"],
                include_prompt_in_result=False,
                **options,
            )[0]
            out = list(result.sequences_ids[0])
            tally.completion_tokens = len(out)
            tally.finish_reason = "length" if len(out) >= p["max_length"] else "stop"
            text = detok.text(out)
            if text:
                yield text
            return
        steps = self._generator.generate_tokens(self._tokens(ids), **options)
        try:
            tally.finish_reason = "length"
            for step in steps:
                if step.token_id in end_ids:
                    tally.finish_reason = "stop"
                    break
                tally.completion_tokens += 1
                text = detok.push(step.token_id)
                if text:
                    yield text
            tail = detok.flush()
            if tail:
                yield tail
        finally:
            steps.close()  # stops decoding at the next step and waits for it

    def _generate_batch(self, prompts: list[str], call: Call) -> list[Row]:
        p = call.params
        static, encoded = self._prompts(prompts, p)
        options = self._options(p, static)
        contexts = [[*(static or []), *ids] for ids in encoded]
        first_step: dict[int, float] = {}
        watches = [_StopWatch(self._detokenizer(c), call.stops) for c in contexts]
        lock = threading.Lock()

        def on_step(step: Any) -> bool:
            with lock:
                first_step.setdefault(step.batch_id, time.perf_counter())
            # Ends this prompt's decoding once its text holds a stop sequence.
            return watches[step.batch_id].push(step.token_id) if call.stops else False

        beams = p["beam_size"] > 1
        started = time.perf_counter()
        results = self._generator.generate_batch(
            [self._tokens(ids) for ids in encoded],
            max_batch_size=p["max_batch_size"],
            batch_type=p["batch_type"],
            beam_size=p["beam_size"],
            patience=p["patience"],
            length_penalty=p["length_penalty"],
            include_prompt_in_result=False,
            callback=None if beams else on_step,
            **options,
        )
        rows = []
        for i, (ids, context, result) in enumerate(zip(encoded, contexts, results, strict=True)):
            out = list(result.sequences_ids[0])
            tally = Tally(
                prompt_tokens=len(ids) + len(static or []),
                completion_tokens=len(out),
                finish_reason="length" if len(out) >= p["max_length"] else "stop",
                started=started,
            )
            tally.first_piece = first_step.get(i)
            rows.append(Row(self._detokenizer(context).pieces(out), tally))
        return rows

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
        **kwargs: Any,
    ) -> CTranslate2:
        """Convert a Hugging Face model directory once (cached) and load it.

        Args:
            model_dir: A local Hugging Face model directory (``config.json`` + weights
                + tokenizer files).
            quantization: Weight type of the converted model (``int8``, ``int8_float16``,
                ``float16``, ``bfloat16``, ...); ``None`` keeps the weights' type.
            cache_dir: Where converted models are kept; default
                ``$LOCALLLMS_CACHE/ct2`` (``~/.cache/langchain-localllms/ct2``).
            force: Convert again even if a cached conversion exists.
            progress: Report the conversion on stderr (it is logged either way).
            **kwargs: Any other argument of :class:`CTranslate2` (``device``,
                ``max_length``, ...).

        Returns:
            A :class:`CTranslate2` on the converted model.
        """
        if "model_path" in kwargs:
            msg = "from_pretrained sets model_path itself (the converted copy); do not pass it"
            raise TypeError(msg)
        path = convert_to_ctranslate2(
            model_dir, quantization, cache_dir=cache_dir, force=force, show_progress=progress
        )
        return cls(model_path=str(path), **kwargs)


# ------------------------------------------------------------------ generators
class _Handle:
    """Holds a ``ctranslate2.Generator``, shared by an instance and its copies.

    CTranslate2's worker threads keep the last job, with its Python step callback
    (``generate_tokens`` uses one), until the next job or the Generator's end; if that
    end comes during interpreter shutdown, releasing the callback aborts the process
    ("terminate called without an active exception"). So every Generator this module
    made is released at exit, while Python can still run the release.
    """

    def __init__(self, generator: Any) -> None:
        self.generator = generator
        _HANDLES.add(self)


_HANDLES: weakref.WeakSet[_Handle] = weakref.WeakSet()


@atexit.register
def _release_generators() -> None:
    for handle in list(_HANDLES):
        handle.generator = None
    gc.collect()


# ------------------------------------------------------------------ detokenizing
class _StopWatch:
    """One prompt's text during a batch, to end its decoding at a stop sequence."""

    def __init__(self, detok: IncrementalDetokenizer, stops: Sequence[str]) -> None:
        self._detok = detok
        self._stops = StopStream(stops)

    def push(self, token_id: int) -> bool:
        self._stops.push(self._detok.push(token_id))
        return self._stops.stopped


# ------------------------------------------------------------------- model files
_MISTRAL_TYPES = ("mistral", "mistral3", "voxtral", "ministral", "pixtral")


def _is_same_dir(name: str, path: Path) -> bool:
    try:
        return Path(name).expanduser().resolve() == path.resolve()
    except OSError:
        return False


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        msg = f"{path} is not readable JSON ({e}); re-convert the model"
        raise ValueError(msg) from e
    return value if isinstance(value, dict) else {}


def _ct2_dir(path: str | os.PathLike[str]) -> Path:
    """Check that ``path`` is a CTranslate2 model directory before native code runs."""
    p = Path(path).expanduser()
    if (
        p.is_dir()
        and (p / "config.json").is_file()
        and not (p / "model.bin").is_file()
        and (any(p.glob("*.safetensors")) or any(p.glob("pytorch_model*.bin")))
    ):
        msg = (
            f"{p} is a Hugging Face model directory, not a CTranslate2 one: convert it "
            f"with CTranslate2.from_pretrained({str(p)!r}) or "
            f"ct2-transformers-converter --model {p} --output_dir <dir>"
        )
        raise ValueError(msg)
    return model_dir(p, kind="CTranslate2 model", must_have=("model.bin", "config.json"))
