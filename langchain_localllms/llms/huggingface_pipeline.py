"""Hugging Face ``transformers`` models in this process (torch; OpenVINO slots in).

The class keeps the API of ``langchain_huggingface.HuggingFacePipeline`` (and of
``langchain_community``'s), but generates with ``model.generate`` on token ids itself:

* the answer is the decoded *new* token ids, so the prompt is never echoed, whatever
  the tokenizer does with spaces (``return_full_text=True`` asks for it explicitly);
* streaming runs ``generate`` in a worker thread that hands token ids over a queue:
  an error there is raised in the caller at once, the thread is always joined, and a
  consumer that stops early stops generation at the next token;
* stop strings of any length end generation early (a stopping criterion) and are cut
  by the shared stop handling;
* ``batch_size`` prompts run as one left-padded ``generate`` call, with the same
  per-prompt token limits and answers as single calls;
* ``grammar=`` constrains decoding through an xgrammar logits mask.

How a model is loaded is the only thing a backend changes (``_BACKENDS``): the default
backend loads torch models with ``AutoModelFor*``; ``backend="openvino"`` loads
``optimum.intel`` models, whose ``generate`` takes the same arguments.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlparse

from langchain_core.language_models.base import LangSmithParams
from pydantic import Field, PrivateAttr, field_validator

from langchain_localllms._base import Call, LocalLLM, Refused, Row
from langchain_localllms._detok import CONTEXT_TOKENS, IncrementalDetokenizer
from langchain_localllms._imports import require
from langchain_localllms._native import Emit, SharedModel
from langchain_localllms._usage import Tally
from langchain_localllms.conversion import OPENVINO_WEIGHT_FORMATS, export_openvino
from langchain_localllms.grammars import Grammar, GrammarField
from langchain_localllms.prompts import ModelInfo

DEFAULT_MODEL_ID = "gpt2"
DEFAULT_TASK = "text-generation"
#: Prompts per ``generate`` call when ``batch_size`` is not set: on an accelerator,
#: langchain_huggingface's 4 (memory); on a CPU 16, where decoding is bound by
#: reading the weights and a batch reads them once for all its rows (Gemma-3-270M
#: here: 16 prompts in one call ran 5x faster than one at a time, 4 only 1.7x).
DEFAULT_BATCH_SIZE = 4
CPU_BATCH_SIZE = 16
#: What ``langchain_huggingface`` accepts; the last three are encoder-decoder tasks.
VALID_TASKS = ("text-generation", "text2text-generation", "summarization", "translation")
_SEQ2SEQ_TASKS = ("text2text-generation", "summarization", "translation")
#: Answer length when neither the user, the model nor the pipeline sets one.
_FALLBACK_MAX_NEW_TOKENS = 256
#: Generation parameters that only matter when sampling.
_SAMPLING_PARAMS = (
    "temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff",
    "eta_cutoff", "top_h",
)  # fmt: skip
#: Parameters that are both model-config attributes and generation parameters.
_CONFIG_AND_GENERATION = (
    "use_cache", "output_attentions", "output_hidden_states", "pad_token_id",
    "bos_token_id", "eos_token_id", "decoder_start_token_id",
)  # fmt: skip
#: ``model_kwargs`` that say where weights come from: they apply to the tokenizer too.
_HUB_KWARGS = (
    "revision", "cache_dir", "token", "local_files_only", "subfolder",
    "force_download", "proxies", "trust_remote_code",
)  # fmt: skip
_USE_STOP = (
    "give stop=[...] to HuggingFacePipeline or to the call instead: stop strings of "
    "any length end generation early and are cut from the answer"
)
#: Options of transformers' text-generation pipeline (or of ``generate``) that this
#: class does not implement, with what to do instead.
_TEXT = "this class returns text"
_CHAT = "chat messages are not handled by this LLM class"
_BEAMS = "beam search cannot stream tokens; use greedy or sampling"
_REFUSED_OPTIONS = {
    "stop_sequence": Refused(_USE_STOP, error=ValueError),
    "stop_strings": Refused(_USE_STOP, error=ValueError),
    "return_tensors": Refused(_TEXT, error=ValueError),
    "return_type": Refused("use return_full_text=True or False", error=ValueError),
    "return_dict_in_generate": Refused(f"{_TEXT}, not generate() outputs", error=ValueError),
    "output_scores": Refused(f"{_TEXT}, not scores", error=ValueError),
    "output_logits": Refused(f"{_TEXT}, not logits", error=ValueError),
    "streamer": Refused("use llm.stream(...) or callbacks", error=ValueError),
    "handle_long_generation": Refused("shorten the prompt", error=ValueError),
    "truncation": Refused("shorten the prompt", error=ValueError),
    "padding": Refused("batches are padded by this class", error=ValueError),
    "tokenizer_encode_kwargs": Refused("not implemented by this class", error=ValueError),
    "continue_final_message": Refused(_CHAT, error=ValueError),
    "tools": Refused(_CHAT, error=ValueError),
    "documents": Refused(_CHAT, error=ValueError),
    "batch_size": Refused("give batch_size= to HuggingFacePipeline", error=ValueError),
    "device": Refused("give device= to HuggingFacePipeline.from_model_id", error=ValueError),
    "device_map": Refused(
        "give device_map= to HuggingFacePipeline.from_model_id", error=ValueError
    ),
    "assistant_model": Refused(
        "assisted generation is not implemented by this class", error=ValueError
    ),
    "prefix_allowed_tokens_fn": Refused("use grammar= to constrain the output", error=ValueError),
    # refused only with values other than the default behaviour
    "num_return_sequences": Refused(
        "one answer per prompt is returned", accept=(1,), error=ValueError
    ),
    "num_beams": Refused(_BEAMS, accept=(1,), error=ValueError),
    "num_beam_groups": Refused(_BEAMS, accept=(1,), error=ValueError),
    "return_text": Refused(_TEXT, accept=(True,), error=ValueError),
    "skip_special_tokens": Refused(
        "special tokens are always left out of the answer", accept=(True,), error=ValueError
    ),
    "clean_up_tokenization_spaces": Refused(
        "the answer is decoded exactly as generated, so that streamed pieces join to "
        "the same text",
        accept=(False,), error=ValueError,
    ),
}  # fmt: skip
_PIPELINE_OPTIONS = ("return_full_text", "prefix", "add_special_tokens", "prefix_length")


@cache
def _generation_keys() -> frozenset[str]:
    """The parameters transformers' ``GenerationConfig`` has."""
    transformers = require("transformers", feature="HuggingFacePipeline")
    return frozenset(k for k in vars(transformers.GenerationConfig()) if not k.startswith("_"))


# --------------------------------------------------------------------- options
@dataclass
class _Layer:
    """Generation options from one source (model_kwargs, pipeline_kwargs, a call ...)."""

    generate: dict[str, Any] = field(default_factory=dict)
    echo: bool | None = None
    prefix: str | None = None
    add_special_tokens: bool | None = None
    processors: list[Any] = field(default_factory=list)
    criteria: list[Any] = field(default_factory=list)


def _parse_options(options: Mapping[str, Any] | None, where: str) -> _Layer:
    """Sort ``pipeline_kwargs``-style options into a layer; refuse what can't be honoured.

    Raises:
        ValueError: an option is unknown, or known but not implemented here.
    """
    layer = _Layer()
    for key, value in (options or {}).items():
        if key == "generation_config":
            sub = _parse_options(
                {k: v for k, v in value.to_diff_dict().items() if k != "transformers_version"},
                f"{where}['generation_config']",
            )
            layer.generate.update(sub.generate)
        elif key == "logits_processor":
            layer.processors.extend(value or [])
        elif key == "stopping_criteria":
            layer.criteria.extend(value or [])
        elif key in _REFUSED_OPTIONS:
            _REFUSED_OPTIONS[key].check(key, value, f"HuggingFacePipeline's {where}")
            if key in _generation_keys():  # an accepted value
                layer.generate[key] = value
        elif key == "return_full_text":
            layer.echo = bool(value)
        elif key == "prefix":
            layer.prefix = value
        elif key == "add_special_tokens":
            layer.add_special_tokens = value
        elif key == "prefix_length":  # transformers' own bookkeeping for `prefix`
            pass
        elif key in _generation_keys():
            layer.generate[key] = value
        else:
            msg = (
                f"{where} has {key!r}, which is neither a generation parameter of "
                "transformers (GenerationConfig) nor an option of the text-generation "
                f"pipeline this class knows ({', '.join(_PIPELINE_OPTIONS[:3])}). "
                "Check the spelling; nothing is silently dropped."
            )
            raise ValueError(msg)
    return layer


@dataclass
class _Settings:
    """Everything one ``generate`` call needs, resolved from every layer."""

    generate: dict[str, Any]
    echo: bool = False
    prefix: str = ""
    add_special_tokens: bool | None = None
    processors: list[Any] = field(default_factory=list)
    criteria: list[Any] = field(default_factory=list)
    grammar: Grammar | None = None
    seed: int | None = None

    def identity(self) -> dict[str, Any]:
        return {
            "generate": self.generate,
            "echo": self.echo,
            "prefix": self.prefix,
            "add_special_tokens": self.add_special_tokens,
            "processors": [repr(p) for p in self.processors],
            "criteria": [repr(c) for c in self.criteria],
        }


def _resolve(
    layers: list[_Layer], model_set: Mapping[str, Any], defaults: Mapping[str, Any]
) -> _Settings:
    """Merge layers (later wins) over the model's generation config and the defaults.

    As transformers' pipeline does: a default applies only where neither the user nor
    the model set the parameter, and sampling defaults only when sampling. On top:
    ``temperature=0`` means greedy, and a positive temperature the user gives without
    ``do_sample`` turns sampling on.
    """
    out = _Settings(generate={})
    for layer in layers:
        out.generate.update(layer.generate)
        out.processors.extend(layer.processors)
        out.criteria.extend(layer.criteria)
        for name in ("echo", "prefix", "add_special_tokens"):
            value = getattr(layer, name)
            if value is not None:
                setattr(out, name, value)
    gen = out.generate
    if gen.get("temperature") is not None:
        if gen["temperature"] == 0:
            gen["do_sample"] = False
        elif "do_sample" not in gen:
            gen["do_sample"] = True
    is_set = set(gen) | set(model_set)
    do_sample = bool(gen.get("do_sample", model_set.get("do_sample", defaults.get("do_sample"))))
    for key, value in defaults.items():
        if key in is_set or (key in _SAMPLING_PARAMS and not do_sample):
            continue
        if key == "max_new_tokens" and "max_length" in is_set:
            continue
        gen[key] = value
    if not do_sample:
        for key in _SAMPLING_PARAMS:  # unset them, or generate() warns they are unused
            if key in gen or model_set.get(key) is not None:
                gen[key] = None
    return out


# -------------------------------------------------------------- model sources
def _looks_like_path(model_id: str) -> bool:
    return (
        model_id.startswith(("/", "./", "../", "~", "."))
        or os.sep in model_id.strip("/").replace("/", "", 1)
        or (os.altsep is not None and os.altsep in model_id)
        or Path(model_id).expanduser().exists()
    )


def _hub_reachable(timeout: float = 3.0) -> str | None:
    """None if the Hub answers a TCP connect within ``timeout``; else why not."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except Exception as e:
        return f"{endpoint} is not reachable ({e})"


def resolve_model_source(
    model_id: str, *, revision: str | None = None, cache_dir: str | None = None,
    local_files_only: bool = False,
) -> tuple[str, bool]:  # fmt: skip
    """Where to load ``model_id`` from, without waiting on a network that isn't there.

    A local directory loads offline. A Hub id loads from the local Hugging Face cache
    when it is there; otherwise it is downloaded, but only after a quick check that
    the Hub answers (``huggingface_hub`` would otherwise retry for about half a minute).

    Returns:
        ``(source, offline)``: the path or Hub id to load, and whether to load it with
        ``local_files_only=True``.

    Raises:
        FileNotFoundError: a path that does not exist, or a Hub id that is neither in
            the local cache nor downloadable now.
    """
    p = Path(model_id).expanduser()
    if p.is_dir():
        return str(p.resolve()), True
    if _looks_like_path(model_id):
        what = "a file, not a directory" if p.exists() else "not found"
        msg = (
            f"model directory {model_id!r} is {what} (resolved from {Path.cwd()}). "
            "Give the directory that holds config.json and the weights "
            "(what save_pretrained() writes)."
        )
        raise FileNotFoundError(msg)
    hub = require("huggingface_hub", feature="HuggingFacePipeline")
    cached = hub.try_to_load_from_cache(
        model_id, "config.json", cache_dir=cache_dir, revision=revision
    )
    if isinstance(cached, str):
        return model_id, True
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    why = (
        "local_files_only=True"
        if local_files_only
        else "HF_HUB_OFFLINE is set"
        if offline
        else _hub_reachable()
    )
    if why is not None:
        msg = (
            f"model {model_id!r} is not a local directory, is not in the Hugging Face "
            f"cache, and cannot be downloaded now: {why}. Download it where the Hub is "
            f"reachable (`huggingface-cli download {model_id} --local-dir DIR`, or "
            "save_pretrained(DIR)) and pass model_id=DIR."
        )
        raise FileNotFoundError(msg)
    return model_id, False


# -------------------------------------------------------------------- backends
@dataclass
class LoadRequest:
    """What a backend needs to load a model."""

    source: str
    """A local directory or a Hub id (see :func:`resolve_model_source`)."""
    task: str
    device: Any
    device_map: Any
    load_kwargs: dict[str, Any]
    """``model_kwargs`` less the generation parameters."""
    offline: bool


def _torch_device(device: Any) -> Any:
    """The torch device for ``device`` (None: leave the model where it loads)."""
    torch = require("torch", feature="HuggingFacePipeline")
    if device is None or device == -1:
        return None
    if isinstance(device, bool) or (isinstance(device, int) and device < -1):
        msg = f"device={device!r}: use -1 or 'cpu' for the CPU, n >= 0 for CUDA GPU n"
        raise ValueError(msg)
    try:
        dev = torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    except (RuntimeError, TypeError) as e:
        msg = f"device={device!r} is not a torch device ('cpu', 'cuda:0', 'mps', or an int)"
        raise ValueError(msg) from e
    if dev.type == "cuda":
        count = torch.cuda.device_count()
        index = dev.index or 0
        if index >= count:
            msg = (
                f"device={device!r} asks for CUDA GPU {index}, but torch "
                f"{torch.__version__} sees {count} GPU(s) (CUDA available: "
                f"{torch.cuda.is_available()}). Use device=-1 or 'cpu' to run on the "
                "CPU, or install a CUDA build of torch on a machine with a GPU."
            )
            raise ValueError(msg)
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        msg = f"device={device!r}: this torch build or machine has no MPS (Apple GPU)"
        raise ValueError(msg)
    return dev


def _load_torch(req: LoadRequest) -> Any:
    """The default backend: ``AutoModelForCausalLM`` / ``AutoModelForSeq2SeqLM``."""
    transformers = require("transformers", feature="HuggingFacePipeline")
    seq2seq = _is_seq2seq_task(req.task)
    auto = transformers.AutoModelForSeq2SeqLM if seq2seq else transformers.AutoModelForCausalLM
    device = _torch_device(req.device)
    kwargs = dict(req.load_kwargs)
    if req.device_map is not None:
        kwargs["device_map"] = req.device_map
    if req.offline:
        kwargs["local_files_only"] = True
    try:
        model = auto.from_pretrained(req.source, **kwargs)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        msg = (
            f"model_kwargs: {e}. A model_kwargs key must be a from_pretrained() option "
            "(dtype, revision, attn_implementation, ...), an attribute of the model's "
            "config, or a generation parameter (temperature, max_length, ...)."
        )
        raise ValueError(msg) from e
    except ValueError as e:
        if "Unrecognized configuration class" not in str(e):
            raise
        kind = "encoder-decoder (seq2seq)" if seq2seq else "decoder-only (causal LM)"
        msg = f"{req.source} is not a {kind} model, which task={req.task!r} needs: {e}"
        raise ValueError(msg) from e
    if device is not None:
        model.to(device)
    model.eval()
    return model


def _load_openvino(req: LoadRequest) -> Any:
    """``backend="openvino"``: optimum-intel's ``OVModelFor*``.

    ``model_id`` may be an exported OpenVINO directory (``openvino_model.xml``), or a
    plain transformers directory, which is exported once (``weight_format`` in
    ``model_kwargs``: fp32, fp16, int8 or int4) and cached under
    ``$LOCALLLMS_CACHE/openvino``. ``model_kwargs`` ``device`` ("CPU", "GPU", ...) and
    ``ov_config`` go to OpenVINO, as in LangChain's page.
    """
    intel = require("optimum.intel", feature='HuggingFacePipeline(backend="openvino")')
    seq2seq = _is_seq2seq_task(req.task)
    cls = intel.OVModelForSeq2SeqLM if seq2seq else intel.OVModelForCausalLM
    kwargs = dict(req.load_kwargs)
    kwargs.pop("trust_remote_code", None)  # exported graphs run no Python from the model
    weight_format = kwargs.pop("weight_format", None)
    if weight_format is not None and weight_format not in OPENVINO_WEIGHT_FORMATS:
        msg = f"weight_format={weight_format!r}: choose one of {', '.join(OPENVINO_WEIGHT_FORMATS)}"
        raise ValueError(msg)
    device = kwargs.pop("device", None)
    if device is None:
        device = "CPU" if req.device in (None, -1, "cpu") else str(req.device).upper()
    if req.device_map is not None:
        msg = "device_map is for torch models; OpenVINO takes model_kwargs={'device': 'CPU'}"
        raise ValueError(msg)
    source = Path(req.source)
    xml = "openvino_model.xml" if not seq2seq else "openvino_encoder_model.xml"
    if not (source / xml).is_file():
        source = export_openvino(cls, source, weight_format)
    elif weight_format is not None:
        msg = (
            f"{source} is already exported to OpenVINO; weight_format applies when "
            "exporting a transformers directory (or use optimum-cli --weight-format)"
        )
        raise ValueError(msg)
    try:
        return cls.from_pretrained(str(source), device=device, **kwargs)
    except RuntimeError as e:
        msg = f"OpenVINO could not load {source} on device {device!r}: {e}"
        raise ValueError(msg) from e


#: backend name -> loader. A loader returns a model whose ``generate`` takes the
#: arguments of transformers' ``GenerationMixin.generate``; everything else is shared.
_BACKENDS: dict[str, Callable[[LoadRequest], Any]] = {
    "default": _load_torch,
    "openvino": _load_openvino,
}


class _NoPipeline:
    """Stands in for ``hf.pipeline`` where transformers has no pipeline for the task.

    transformers 5 removed the text2text-generation, summarization and translation
    pipelines; the model and tokenizer still generate, through this class.
    """

    def __init__(self, task: str, model: Any, tokenizer: Any) -> None:
        self.task = task
        self.model = model
        self.tokenizer = tokenizer
        self.device = getattr(model, "device", None)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        msg = (
            f"this transformers version has no {self.task!r} pipeline to call; use "
            "the HuggingFacePipeline instance (invoke, stream, batch) instead"
        )
        raise NotImplementedError(msg)

    def __repr__(self) -> str:
        return f"<model and tokenizer for {self.task!r}: {type(self.model).__name__}>"


# ------------------------------------------------------------- decode, stop
class _Ended:
    """Per-row record of where and why each sequence of a batch ended."""

    def __init__(self) -> None:
        self.at: dict[int, tuple[int, str]] = {}

    def mark(self, row: int, n_new: int, why: str) -> None:
        self.at.setdefault(row, (n_new, why))


def _make_stopper(
    torch: Any,
    transformers: Any,
    *,
    start: int,
    limits: list[int],
    eos: frozenset[int],
    stops: list[str],
    windows: Callable[[int, list[int], int], str],
    ended: _Ended,
    cancel: threading.Event,
) -> Any:
    """A stopping criterion: per-row token limits, EOS, stop strings, cancellation."""
    longest = max((len(s.encode("utf-8")) for s in stops), default=0)

    class Stopper(transformers.StoppingCriteria):  # type: ignore[misc]
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            n_new = input_ids.shape[1] - start
            done = []
            for row in range(input_ids.shape[0]):
                if row not in ended.at:
                    new = input_ids[row, start:].tolist()
                    if new and new[-1] in eos:
                        ended.mark(row, n_new - 1, "eos")
                    elif stops and any(s in windows(row, new, longest + 4) for s in stops):
                        ended.mark(row, n_new, "stop")
                    elif n_new >= limits[row]:
                        ended.mark(row, n_new, "length")
                done.append(row in ended.at or cancel.is_set())
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return Stopper()


def _make_grammar_mask(
    torch: Any, transformers: Any, xgr: Any, compiled: Any, ended: _Ended
) -> Any:
    """A logits processor that lets through only tokens the grammar allows.

    One xgrammar matcher per row; rows that already ended are left alone (their
    tokens are padding). Applied before temperature/top-k/top-p, so sampling only
    sees allowed tokens.
    """
    vocab = compiled.tokenizer_info.vocab_size

    class GrammarMask(transformers.LogitsProcessor):  # type: ignore[misc]
        def __init__(self) -> None:
            self.matchers: list[Any] = []
            self.bitmask: Any = None

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            rows = input_ids.shape[0]
            if not self.matchers:
                self.matchers = [xgr.GrammarMatcher(compiled) for _ in range(rows)]
                self.bitmask = xgr.allocate_token_bitmask(rows, vocab)
            else:
                for row, matcher in enumerate(self.matchers):
                    if matcher.is_terminated() or row in ended.at:
                        continue
                    token = int(input_ids[row, -1])
                    if not matcher.accept_token(token):
                        msg = f"the grammar rejected token {token}, which it had allowed"
                        raise RuntimeError(msg)
            for row, matcher in enumerate(self.matchers):
                if matcher.is_terminated() or row in ended.at:
                    self.bitmask[row] = -1  # all allowed: the row is padding now
                else:
                    matcher.fill_next_token_bitmask(self.bitmask, row)
            bits = self.bitmask.to(scores.device)
            shifts = torch.arange(32, device=scores.device, dtype=torch.int32)
            allowed = ((bits.unsqueeze(-1) >> shifts) & 1).bool().view(rows, -1)
            width = scores.shape[-1]
            if allowed.shape[-1] < width:  # logits wider than the tokenizer: no token there
                pad = torch.zeros(
                    rows, width - allowed.shape[-1], dtype=torch.bool, device=scores.device
                )
                allowed = torch.cat([allowed, pad], dim=-1)
            return scores.masked_fill(~allowed[:, :width], float("-inf"))

    return GrammarMask()


def _gbnf_for_xgrammar(gbnf: str) -> str:
    """llama.cpp GBNF allows empty alternatives (``ws ::= | " "``); xgrammar wants ``""``.

    Inserts ``""`` where an alternative is empty, skipping literals, character classes
    and comments. Everything else is the same dialect.
    """
    out: list[str] = []
    i, n = 0, len(gbnf)
    expecting = False  # just after '::=', '|' or '(' with no element yet
    while i < n:
        c = gbnf[i]
        if c == "#":
            j = gbnf.find("\n", i)
            j = n if j == -1 else j
            out.append(gbnf[i:j])
            i = j
            continue
        if c in " \t\r\n":
            out.append(c)
            i += 1
            continue
        if gbnf.startswith("::=", i):
            out.append("::=")
            i += 3
            expecting = True
            continue
        if c in "|)":
            if expecting:
                out.append('"" ')
            out.append(c)
            expecting = c == "|"
            i += 1
            continue
        if c == "(":
            out.append(c)
            expecting = True
            i += 1
            continue
        if c in '"[':
            close = '"' if c == '"' else "]"
            j = i + 1
            while j < n and gbnf[j] != close:
                j += 2 if gbnf[j] == "\\" else 1
            out.append(gbnf[i : j + 1])
            i = j + 1
            expecting = False
            continue
        out.append(c)
        i += 1
        expecting = False
    if expecting:
        out.append('""')
    return "".join(out)


# ---------------------------------------------------------------- the class
class HuggingFacePipeline(LocalLLM):
    """A Hugging Face ``transformers`` model run in this process.

    A drop-in for ``langchain_huggingface.HuggingFacePipeline`` that never echoes the
    prompt, streams tokens from a worker thread, stops on strings of any length,
    batches prompts in one ``generate`` call, reports usage, and takes grammars.

    Setup:
        .. code-block:: bash

            pip install "langchain-localllms[huggingface]"

    Key init args:
        model_id: a local model directory (offline) or a Hugging Face Hub id.
        task: ``"text-generation"`` (decoder-only) or ``"text2text-generation"``
            (encoder-decoder; ``"summarization"``/``"translation"`` are aliases).
        device / device_map: where the model runs (-1 or "cpu", 0 for cuda:0, "auto").
        model_kwargs: for ``from_pretrained`` (``dtype``, ``revision`` ...); generation
            parameters there (``temperature``, ``max_length``) apply to generation.
        pipeline_kwargs: generation parameters (``max_new_tokens``, ``temperature``,
            ``do_sample``, ``top_k``, ``top_p``, ``repetition_penalty`` ...).
        batch_size: prompts per ``generate`` call in ``batch``/``generate``.
        grammar: constrain the output (GBNF, JSON schema, pydantic model).

    Instantiate:
        .. code-block:: python

            from langchain_localllms import HuggingFacePipeline

            hf = HuggingFacePipeline.from_model_id(
                model_id="path/to/model",
                task="text-generation",
                pipeline_kwargs={"max_new_tokens": 10},
            )
            # or from a transformers pipeline:
            hf = HuggingFacePipeline(pipeline=pipe)

    Invoke:
        .. code-block:: python

            hf.invoke("The first man on the moon was")

    Stream:
        .. code-block:: python

            for piece in hf.stream("The first man on the moon was"):
                print(piece, end="", flush=True)

    Async:
        .. code-block:: python

            await hf.ainvoke("The first man on the moon was")
            await hf.abatch(["One, two,", "Red, green,"])
    """

    pipeline: Any = None
    """A ``transformers`` pipeline to run (text-generation or text2text-generation);
    :meth:`from_model_id` makes one. Its model and tokenizer are used directly."""
    model_id: str | None = None
    """The model: a local directory or a Hub id. With ``pipeline=`` it is only a name
    (default: the pipeline model's ``name_or_path``)."""
    task: str | None = None
    """What the model does: one of ``VALID_TASKS`` (default: text-generation, or the
    pipeline's task)."""
    backend: str = "default"
    """How the model is loaded: ``"default"`` (torch) or ``"openvino"`` (optimum-intel)."""
    device: int | str | None = None
    """Where the loaded model runs: -1 or ``"cpu"``, an int n for ``cuda:n``, or a
    torch device string. Not together with ``device_map``."""
    device_map: str | dict[str, Any] | None = None
    """Accelerate's placement of the weights (``"auto"`` spreads them over devices)."""
    model_kwargs: dict[str, Any] | None = None
    """Keyword arguments for ``from_pretrained`` of the model (and of the tokenizer, for
    ``revision``/``cache_dir``/``token``/``trust_remote_code``...). Generation
    parameters among them apply to generation; anything unknown is an error."""
    pipeline_kwargs: dict[str, Any] | None = None
    """Generation parameters (any ``GenerationConfig`` field) and the pipeline options
    ``return_full_text``, ``prefix``, ``add_special_tokens``. Per call too:
    ``llm.invoke(p, pipeline_kwargs={...})``."""
    batch_size: int | None = Field(default=None, ge=1)
    """Prompts per ``generate`` call when several are given (1: one at a time, with
    per-token callbacks). None: 16 when the model runs on a CPU, 4 on an accelerator."""

    max_new_tokens: int | None = Field(default=None, ge=1)
    """Most tokens to generate (default: the pipeline's, 256 in transformers 5)."""
    temperature: float | None = Field(default=None, ge=0)
    """Sampling temperature; 0 is greedy. A positive one turns sampling on unless
    ``do_sample`` says otherwise."""
    do_sample: bool | None = None
    """Sample (True) or pick the likeliest token (False)."""
    top_k: int | None = Field(default=None, ge=0)
    """Top-k sampling (0: off)."""
    top_p: float | None = Field(default=None, gt=0, le=1)
    """Nucleus sampling."""
    repetition_penalty: float | None = Field(default=None, gt=0)
    """Penalty for repeating tokens (1: off)."""
    seed: int | None = None
    """Seed torch's generator before each call, for repeatable sampling."""
    grammar: GrammarField = None
    """Constrain the output: GBNF text, a :class:`Grammar`, a JSON schema dict or a
    pydantic model class (decoded through xgrammar)."""

    _call_fields: ClassVar[tuple[str, ...]] = (
        "max_new_tokens", "temperature", "do_sample", "top_k", "top_p",
        "repetition_penalty", "seed", "grammar",
    )  # fmt: skip
    _call_only: ClassVar[tuple[str, ...]] = ("pipeline_kwargs", "skip_prompt")
    _live_fields: ClassVar[tuple[str, ...]] = ("batch_size",)
    _max_tokens_field: ClassVar[str | None] = "max_new_tokens"
    _gen_fields: ClassVar[tuple[str, ...]] = _call_fields[:6]

    _model: Any = PrivateAttr(default=None)
    _tokenizer: Any = PrivateAttr(default=None)
    _seq2seq: bool = PrivateAttr(default=False)
    _on_cpu: bool = PrivateAttr(default=True)
    _layers: list[_Layer] = PrivateAttr(default_factory=list)
    _model_set: dict[str, Any] = PrivateAttr(default_factory=dict)
    _defaults: dict[str, Any] = PrivateAttr(default_factory=dict)
    _source: str = PrivateAttr(default="")
    _shared: SharedModel[Any] | None = PrivateAttr(default=None)
    _tok_lock: threading.RLock = PrivateAttr(default_factory=threading.RLock)
    _grammars: dict[str, Any] = PrivateAttr(default_factory=dict)

    @field_validator("device", mode="before")
    @classmethod
    def _device_as_str(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, (int, str)):
            return str(value)  # a torch.device
        return value

    # ------------------------------------------------------------- loading
    @classmethod
    def from_model_id(
        cls,
        model_id: str,
        task: str,
        backend: str = "default",
        device: int | str | None = None,
        device_map: str | dict[str, Any] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        pipeline_kwargs: dict[str, Any] | None = None,
        batch_size: int | None = None,
        **kwargs: Any,
    ) -> HuggingFacePipeline:
        """Load ``model_id`` (a local directory, or a Hub id) for ``task``.

        Args:
            model_id: A directory written by ``save_pretrained`` (loads offline), or
                a Hub id (from the local cache, else downloaded if the Hub answers).
            task: ``"text-generation"``, ``"text2text-generation"``,
                ``"summarization"`` or ``"translation"``.
            backend: ``"default"`` (torch) or ``"openvino"`` (optimum-intel).
            device: -1 or ``"cpu"``; n for ``cuda:n``; any torch device string.
            device_map: Accelerate's weight placement, e.g. ``"auto"``.
            model_kwargs: ``from_pretrained`` options, and generation parameters.
            pipeline_kwargs: Generation parameters and pipeline options.
            batch_size: Prompts per ``generate`` call (None: 16 on a CPU, else 4).
            **kwargs: Other fields (``callbacks``, ``stop``, ``temperature``, ...).
        """
        return cls(
            model_id=model_id,
            task=task,
            backend=backend,
            device=device,
            device_map=device_map,
            model_kwargs=model_kwargs,
            pipeline_kwargs=pipeline_kwargs,
            batch_size=batch_size,
            **kwargs,
        )

    def _setup(self) -> None:
        if self.backend not in _BACKENDS:
            msg = (
                f"backend={self.backend!r} is not one this class has; choose from "
                f"{', '.join(map(repr, _BACKENDS))}"
            )
            raise ValueError(msg)
        if self.task is not None and not _valid_task(self.task):
            msg = f"task={self.task!r} is not supported; choose from {', '.join(VALID_TASKS)}"
            raise ValueError(msg)
        model_kwargs = dict(self.model_kwargs or {})
        gen_kwargs = {
            k: model_kwargs.pop(k)
            for k in list(model_kwargs)
            if k in _generation_keys() and k not in _CONFIG_AND_GENERATION
        }
        gen_kwargs.update({k: model_kwargs[k] for k in _CONFIG_AND_GENERATION if k in model_kwargs})
        # Check every option before loading anything.
        layers = [
            _parse_options(gen_kwargs, "model_kwargs"),
            _parse_options(self.pipeline_kwargs, "pipeline_kwargs"),
        ]
        given = set(layers[0].generate) | set(layers[1].generate)
        twice = sorted(n for n in self._gen_fields if getattr(self, n) is not None and n in given)
        if twice:
            msg = (
                f"{', '.join(twice)} given both as a field and in model_kwargs/"
                "pipeline_kwargs; give each in one place"
            )
            raise ValueError(msg)
        if self.pipeline is None:
            self._load(model_kwargs)
        else:
            self._adopt(model_kwargs)
        self._layers.extend(layers)
        self._model_set = {
            k: v
            for k, v in self._model.generation_config.to_diff_dict().items()
            if k != "transformers_version"
        }
        self._settings({n: getattr(self, n) for n in self._call_fields})  # check now
        if self.grammar is not None:
            self._compiled(self.grammar)

    def _load(self, model_kwargs: dict[str, Any]) -> None:
        """Load model and tokenizer from ``model_id`` with the chosen backend."""
        if self.model_id is None:
            msg = (
                "give model_id= (a local model directory or a Hub id) or pipeline= "
                "(a transformers pipeline); see HuggingFacePipeline.from_model_id"
            )
            raise ValueError(msg)
        if self.device_map is not None and self.device not in (None, -1):
            msg = (
                f"give device ({self.device!r}) or device_map ({self.device_map!r}), "
                "not both: device_map lets accelerate place the weights"
            )
            raise ValueError(msg)
        if self.device_map is not None and "device_map" in model_kwargs:
            msg = "device_map is given both as an argument and in model_kwargs"
            raise ValueError(msg)
        transformers = require("transformers", feature="HuggingFacePipeline")
        task = self.task or DEFAULT_TASK
        model_kwargs.setdefault("trust_remote_code", False)
        source, offline = resolve_model_source(
            self.model_id,
            revision=model_kwargs.get("revision"),
            cache_dir=model_kwargs.get("cache_dir"),
            local_files_only=bool(model_kwargs.get("local_files_only")),
        )
        self._source = source
        request = LoadRequest(
            source=source,
            task=task,
            device=self.device,
            device_map=self.device_map,
            load_kwargs=model_kwargs,
            offline=offline,
        )
        model = _BACKENDS[self.backend](request)
        self._on_cpu = _runs_on_cpu(model)
        tok_kwargs = {k: model_kwargs[k] for k in _HUB_KWARGS if k in model_kwargs}
        if offline:
            tok_kwargs["local_files_only"] = True
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, **tok_kwargs)
        if tokenizer.pad_token_id is None:  # as langchain_huggingface does, for batches
            eos = model.generation_config.eos_token_id
            tokenizer.pad_token_id = eos[0] if isinstance(eos, list) else eos
        pipe_kwargs = dict(self.pipeline_kwargs or {})
        if _is_seq2seq_task(task):
            try:
                pipe = transformers.pipeline(
                    task=task, model=model, tokenizer=tokenizer,
                    batch_size=self._rows_per_generate(),
                    **pipe_kwargs,
                )  # fmt: skip
            except KeyError:  # transformers 5 removed the seq2seq pipelines
                pipe = _NoPipeline(task, model, tokenizer)
        else:
            pipe = transformers.pipeline(
                task=task, model=model, tokenizer=tokenizer,
                batch_size=self._rows_per_generate(),
                **pipe_kwargs,
            )  # fmt: skip
        self.pipeline = pipe
        self.task = task
        self._model, self._tokenizer = model, tokenizer
        self._shared = SharedModel(model, None, name="huggingface-generate")
        self._seq2seq = bool(model.config.is_encoder_decoder)
        self._defaults = _pipeline_defaults(pipe)

    def _adopt(self, model_kwargs: dict[str, Any]) -> None:
        """Use the model and tokenizer of a ready-made transformers pipeline."""
        pipe = self.pipeline
        task = getattr(pipe, "task", None)
        model = getattr(pipe, "model", None)
        tokenizer = getattr(pipe, "tokenizer", None)
        if model is None or tokenizer is None or not hasattr(model, "generate"):
            msg = (
                "pipeline= must be a transformers text-generation (or text2text-"
                f"generation) pipeline with a tokenizer; got {type(pipe).__name__}"
            )
            raise ValueError(msg)
        if not _valid_task(task):
            tasks = ", ".join(VALID_TASKS)
            msg = f"the pipeline's task {task!r} is not supported; use one of {tasks}"
            raise ValueError(msg)
        if self.task is not None and self.task != task:
            msg = f"task={self.task!r} but the pipeline's task is {task!r}"
            raise ValueError(msg)
        if self.device not in (None, -1) or self.device_map is not None:
            msg = (
                "device/device_map apply when this class loads the model; the "
                "pipeline's model is already placed (move it with pipe.model.to(...))"
            )
            raise ValueError(msg)
        if model_kwargs:
            msg = (
                f"model_kwargs {sorted(model_kwargs)} apply when this class loads the "
                "model (from_model_id); with pipeline= only generation parameters can "
                "be given there"
            )
            raise ValueError(msg)
        self.task = task
        if self.model_id is None:
            self.model_id = getattr(model, "name_or_path", None) or DEFAULT_MODEL_ID
        self._source = self.model_id
        self._model, self._tokenizer = model, tokenizer
        self._shared = SharedModel(model, None, name="huggingface-generate")
        self._seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
        self._on_cpu = _runs_on_cpu(model)
        self._defaults = _pipeline_defaults(pipe)
        self._layers.append(_pipeline_layer(pipe))

    # ------------------------------------------------------------ identity
    @property
    def _llm_type(self) -> str:
        return "huggingface_pipeline"

    @property
    def model(self) -> Any:
        """The underlying ``transformers`` model."""
        return self._model

    @property
    def tokenizer(self) -> Any:
        """The underlying tokenizer."""
        return self._tokenizer

    def _ls_model_name(self) -> str:
        return str(self.model_id)

    def _identity(self) -> dict[str, Any]:
        settings = self._settings({n: getattr(self, n) for n in self._call_fields})
        return {
            "model_id": self._source or self.model_id,
            "task": self.task,
            "backend": self.backend,
            "device": str(getattr(self._model, "device", "")),
            "dtype": str(getattr(self._model, "dtype", "")),
            "model_kwargs": self.model_kwargs,
            "generation": settings.identity(),
            **super()._identity(),
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        gen = self._settings({n: getattr(self, n) for n in self._call_fields}).generate
        if "ls_temperature" not in params and gen.get("temperature") is not None:
            params["ls_temperature"] = gen["temperature"]
        if "ls_max_tokens" not in params and gen.get("max_new_tokens") is not None:
            params["ls_max_tokens"] = gen["max_new_tokens"]
        return params

    def model_info(self) -> ModelInfo:
        """Architecture, chat template and special tokens from the model and tokenizer."""
        tok = self._tokenizer
        with self._tok_lock:
            ids = tok("a")["input_ids"]
        bos = tok.bos_token_id
        return ModelInfo(
            runtime=self._llm_type,
            model=self._ls_model_name(),
            architecture=getattr(self._model.config, "model_type", None),
            chat_template=getattr(tok, "chat_template", None),
            bos_token=tok.bos_token or "",
            eos_token=tok.eos_token or "",
            adds_bos=bool(ids) and bos is not None and ids[0] == bos,
        )

    def get_num_tokens(self, text: str) -> int:
        """Tokens of ``text`` in this model's vocabulary (no special tokens)."""
        with self._tok_lock:
            return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    # ------------------------------------------------------------ settings
    def _settings(
        self, params: Mapping[str, Any], call_options: Mapping[str, Any] | None = None
    ) -> _Settings:
        fields = _Layer(
            generate={n: params[n] for n in self._gen_fields if params.get(n) is not None}
        )
        layers = [*self._layers, fields]
        if call_options:
            layers.append(_parse_options(call_options.get("pipeline_kwargs"), "pipeline_kwargs"))
            if call_options.get("skip_prompt") is not None:
                layers.append(_Layer(echo=not call_options["skip_prompt"]))
        out = _resolve(layers, self._model_set, self._defaults)
        out.grammar = params.get("grammar")  # a Grammar: fields coerce it, also per call
        out.seed = params.get("seed")
        return out

    def _call_settings(self, call: Call) -> _Settings:
        options = {k: call.params.get(k) for k in self._call_only}
        return self._settings(call.params, options)

    # ------------------------------------------------------------- grammar
    def _compiled(self, g: Grammar) -> Any:
        """The xgrammar-compiled form of ``g`` for this tokenizer (cached)."""
        hit = self._grammars.get(g.identity)
        if hit is not None:
            return hit
        xgr = require("xgrammar", feature="grammar= with HuggingFacePipeline")
        compiler = self._grammars.get("\0compiler")
        if compiler is None:
            with self._tok_lock:
                info = xgr.TokenizerInfo.from_huggingface(
                    self._tokenizer,
                    vocab_size=self._model.config.get_text_config().vocab_size,
                    stop_token_ids=sorted(self._eos_ids({})),
                )
            compiler = xgr.GrammarCompiler(info)
            self._grammars["\0compiler"] = compiler
        try:
            if g.schema is not None:
                compiled = compiler.compile_json_schema(json.dumps(g.schema), any_whitespace=False)
            else:
                compiled = compiler.compile_grammar(_gbnf_for_xgrammar(g.gbnf))
        except RuntimeError as e:
            detail = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
            msg = f"xgrammar cannot compile the grammar {g!r}: {detail}"
            raise ValueError(msg) from e
        self._grammars[g.identity] = compiled
        return compiled

    # ---------------------------------------------------------- generation
    def _eos_ids(self, gen: Mapping[str, Any]) -> frozenset[int]:
        eos = gen.get("eos_token_id", self._model.generation_config.eos_token_id)
        if eos is None:
            eos = self._tokenizer.eos_token_id
        if eos is None:
            return frozenset()
        return frozenset([eos] if isinstance(eos, int) else eos)

    def _decode(self, ids: list[int]) -> str:
        with self._tok_lock:
            text: str = self._tokenizer.decode(
                ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
        return text

    def _pieces(self, prompt: str, call: Call, tally: Tally) -> Iterator[str]:
        settings = self._call_settings(call)
        job = _Job(self, [prompt], settings, call.stops)
        tally.prompt_tokens = job.prompt_tokens[0]
        if settings.echo:
            yield prompt
        decoder = IncrementalDetokenizer(self._decode, job.contexts[0])
        eos = job.eos

        def work(emit: Emit) -> None:
            job.generate(_EmitStreamer(emit, job.cancel))

        assert self._shared is not None
        steps = self._shared.stream(work)
        try:
            next(steps, None)  # the prompt (or the decoder's start token) comes first
            for value in steps:
                for token in value.reshape(-1).tolist():
                    if token in eos:
                        tally.finish_reason = "stop"
                        continue
                    if tally.finish_reason == "stop":
                        continue  # padding after the end
                    tally.completion_tokens += 1
                    text = decoder.push(token)
                    if text:
                        yield text
        finally:
            steps.close()
        tail = decoder.flush()
        if tail:
            yield tail
        if tally.finish_reason is None:
            why = job.ended.at.get(0, (0, "length"))[1]
            tally.finish_reason = "stop" if why in ("eos", "stop") else "length"

    def _rows_per_generate(self) -> int:
        if self.batch_size is not None:
            return self.batch_size
        return CPU_BATCH_SIZE if self._on_cpu else DEFAULT_BATCH_SIZE

    def _generate_batch(self, prompts: list[str], call: Call) -> list[Row] | None:
        rows = self._rows_per_generate()
        if rows <= 1:
            return None  # one at a time through the stream, with token callbacks
        settings = self._call_settings(call)
        answers = []
        for i in range(0, len(prompts), rows):
            chunk = prompts[i : i + rows]
            job = _Job(self, chunk, settings, call.stops)
            clock = _FirstToken()
            assert self._shared is not None
            out = self._shared.run(functools.partial(job.generate, clock))
            for row, prompt in enumerate(chunk):
                ids, why = job.answer(out, row)
                tally = Tally(
                    prompt_tokens=job.prompt_tokens[row],
                    completion_tokens=len(ids),
                    finish_reason="stop" if why in ("eos", "stop") else "length",
                )
                tally.first_piece = clock.at or time.perf_counter()
                pieces = IncrementalDetokenizer(self._decode, job.contexts[row]).pieces(ids)
                answers.append(Row(pieces, tally, prefix=prompt if settings.echo else ""))
        return answers


def _runs_on_cpu(model: Any) -> bool:
    """Whether the model computes on the CPU (OpenVINO models name their device)."""
    ov_device = getattr(model, "_device", None)
    if isinstance(ov_device, str):
        return ov_device.upper().startswith("CPU")
    device = getattr(model, "device", None)
    return getattr(device, "type", "cpu") == "cpu"


def _valid_task(task: Any) -> bool:
    return isinstance(task, str) and (task in VALID_TASKS or task.startswith("translation_"))


def _is_seq2seq_task(task: str) -> bool:
    return task in _SEQ2SEQ_TASKS or task.startswith("translation_")


def _pipeline_defaults(pipe: Any) -> dict[str, Any]:
    """The generation defaults of a transformers pipeline (transformers 5 has them)."""
    defaults = dict(getattr(pipe, "_generation_defaults", None) or {})
    defaults.pop("pad_token_id", None)
    defaults.setdefault("max_new_tokens", _FALLBACK_MAX_NEW_TOKENS)
    return defaults


def _pipeline_layer(pipe: Any) -> _Layer:
    """The generation parameters and options a ready-made pipeline was built with."""
    generate = getattr(pipe, "_generate_kwargs", None)
    if generate is None:  # transformers 4: generation parameters are forward params
        generate = {
            k: v
            for k, v in (getattr(pipe, "_forward_params", None) or {}).items()
            if k not in ("prefix_length", "tokenizer", "assistant_tokenizer")
        }
    options = dict(generate)
    pre = getattr(pipe, "_preprocess_params", None) or {}
    options.update({k: v for k, v in pre.items() if k not in generate})
    post = dict(getattr(pipe, "_postprocess_params", None) or {})
    return_type = post.pop("return_type", None)
    if return_type is not None:
        name = getattr(return_type, "name", str(return_type))
        if name == "TENSORS":
            options["return_tensors"] = True
        else:
            options["return_full_text"] = name == "FULL_TEXT"
    options.update(post)
    return _parse_options(options, "the pipeline's parameters")


class _FirstToken:
    """A streamer that only notes when the first new token arrived."""

    def __init__(self) -> None:
        self.at: float | None = None
        self._puts = 0

    def put(self, value: Any) -> None:
        self._puts += 1
        if self._puts == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


class _EmitStreamer:
    """A streamer that hands token ids to the reader; stops generating once it is gone."""

    def __init__(self, emit: Emit, cancel: threading.Event) -> None:
        self._emit = emit
        self._cancel = cancel

    def put(self, value: Any) -> None:
        if not self._emit(value):
            self._cancel.set()  # the stopping criterion ends generate() at the next step

    def end(self) -> None:
        pass


class _Job:
    """One ``generate`` call over a batch of prompts (left-padded if decoder-only)."""

    def __init__(
        self, llm: HuggingFacePipeline, prompts: list[str], settings: _Settings, stops: list[str]
    ) -> None:
        self.torch = require("torch", feature="HuggingFacePipeline")
        transformers = require("transformers", feature="HuggingFacePipeline")
        self.llm = llm
        self.seed = settings.seed
        self.cancel = threading.Event()
        gen = dict(settings.generate)
        self.eos = llm._eos_ids(gen)
        if settings.echo:
            _check_echo(prompts, stops)
        rows = self._encode(prompts, settings)
        self.prompt_tokens = [len(r) for r in rows]
        gen["pad_token_id"] = self._pad_id(gen)
        self._pad(rows, gen["pad_token_id"])
        self.limits = self._limits(gen)
        gen["max_new_tokens"] = max(self.limits)
        self.generate_kwargs = gen
        self.ended = _Ended()
        stopper = _make_stopper(
            self.torch, transformers, start=self.start, limits=self.limits, eos=self.eos,
            stops=stops, windows=self._window, ended=self.ended, cancel=self.cancel,
        )  # fmt: skip
        processors = list(settings.processors)
        if settings.grammar is not None:
            compiled = llm._compiled(settings.grammar)
            xgr = require("xgrammar", feature="grammar= with HuggingFacePipeline")
            mask = _make_grammar_mask(self.torch, transformers, xgr, compiled, self.ended)
            processors.insert(0, mask)
        self.processors = transformers.LogitsProcessorList(processors)
        self.criteria = transformers.StoppingCriteriaList([stopper, *settings.criteria])

    def _encode(self, prompts: list[str], settings: _Settings) -> list[list[int]]:
        kwargs = {}
        if settings.add_special_tokens is not None:
            kwargs["add_special_tokens"] = settings.add_special_tokens
        with self.llm._tok_lock:
            rows = [
                self.llm._tokenizer(settings.prefix + p, **kwargs)["input_ids"] for p in prompts
            ]
        if not all(rows):
            msg = "the prompt is empty and this tokenizer adds no start token; give a prompt"
            raise ValueError(msg)
        config = self.llm._model.config.get_text_config()
        limit = getattr(config, "max_position_embeddings", None)
        longest = max(len(r) for r in rows)
        if not self.llm._seq2seq and limit and longest >= limit:
            msg = (
                f"the prompt is {longest} tokens but this model takes at most {limit} "
                "positions: shorten the prompt"
            )
            raise ValueError(msg)
        return rows

    def _pad_id(self, gen: Mapping[str, Any]) -> int:
        pad = self.llm._tokenizer.pad_token_id
        if pad is None:
            pad = gen.get("pad_token_id", self.llm._model.generation_config.pad_token_id)
        if pad is None:
            pad = min(self.eos) if self.eos else 0
        return int(pad)

    def _pad(self, rows: list[list[int]], pad: int) -> None:
        """Make the input tensors; decoder-only prompts are padded on the left.

        So every prompt ends where generation starts.
        """
        torch = self.torch
        longest = max(len(r) for r in rows)
        fill = [[pad] * (longest - len(r)) for r in rows]
        if self.llm._seq2seq:
            ids = [r + f for r, f in zip(rows, fill, strict=True)]
            mask = [[1] * len(r) + [0] * len(f) for r, f in zip(rows, fill, strict=True)]
            self.contexts: list[list[int]] = [[] for _ in rows]
            self.start = 1  # generated sequences begin with the decoder start token
        else:
            ids = [f + r for r, f in zip(rows, fill, strict=True)]
            mask = [[0] * len(f) + [1] * len(r) for r, f in zip(rows, fill, strict=True)]
            self.contexts = [r[-CONTEXT_TOKENS:] for r in rows]
            self.start = longest
        device = getattr(self.llm._model, "device", None)
        self.inputs = {
            "input_ids": torch.tensor(ids, dtype=torch.long, device=device),
            "attention_mask": torch.tensor(mask, dtype=torch.long, device=device),
        }

    def _limits(self, gen: dict[str, Any]) -> list[int]:
        """Return the new-token budget of each prompt.

        ``max_length`` counts the prompt (as in transformers), so each row gets its own
        budget and a batch answers like single calls.
        """
        max_new = gen.pop("max_new_tokens", None)
        max_length = gen.pop("max_length", None)
        if max_new is not None:
            return [int(max_new)] * len(self.prompt_tokens)
        if max_length is None:
            max_length = self.llm._model.generation_config.max_length or 20
        used = [1] * len(self.prompt_tokens) if self.llm._seq2seq else self.prompt_tokens
        limits = [int(max_length) - n for n in used]
        if min(limits) <= 0:
            msg = (
                f"max_length={max_length} counts the prompt too, and a prompt is "
                f"{max(used)} tokens: raise max_length or set max_new_tokens"
            )
            raise ValueError(msg)
        return limits

    def _window(self, row: int, new: list[int], size: int) -> str:
        """Decoded text of a row's last ``size`` new tokens, for the stop check."""
        decode = self.llm._decode
        if len(new) > size:
            return decode(new[-size:])
        # the start of the answer: decoded with context
        return IncrementalDetokenizer(decode, self.contexts[row]).text(new)

    def generate(self, streamer: Any) -> Any:
        """Run ``model.generate`` (the caller holds the model); None if cancelled first."""
        if self.cancel.is_set():
            return None
        if self.seed is not None:
            self.torch.manual_seed(self.seed)
        with self.torch.inference_mode():
            return self.llm._model.generate(
                **self.inputs,
                **self.generate_kwargs,
                logits_processor=self.processors,
                stopping_criteria=self.criteria,
                streamer=streamer,
            )

    def answer(self, out: Any, row: int) -> tuple[list[int], str]:
        """The new ids of one row, cut where it ended, and why it ended."""
        new = out[row, self.start :].tolist()
        n, why = self.ended.at.get(row, (len(new), "length"))
        new = new[: min(n, self.limits[row])]
        for i, token in enumerate(new):
            if token in self.eos:
                return new[:i], "eos"
        return new, why


def _check_echo(prompts: list[str], stops: list[str]) -> None:
    for prompt in prompts:
        hit = next((s for s in stops if s in prompt), None)
        if hit is not None:
            msg = (
                f"return_full_text=True but the prompt contains the stop sequence "
                f"{hit!r}: the answer would end inside the prompt. Use "
                "return_full_text=False (the default)."
            )
            raise ValueError(msg)
