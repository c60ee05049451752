"""Generation options of a transformers model: where they come from and how they merge.

Options arrive in layers (the model's ``generation_config``, ``model_kwargs``,
``pipeline_kwargs``, a ready-made pipeline's own, the class fields, one call); each
layer is checked when it is given, and :func:`resolve` merges them the way
transformers' pipeline does. Options the class cannot honour are refused with why.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from langchain_localllms.core.imports import require
from langchain_localllms.core.requests import Refused
from langchain_localllms.grammars import Grammar

DEFAULT_MODEL_ID = "gpt2"
DEFAULT_TASK = "text-generation"
#: Prompts per ``generate`` call when ``batch_size`` is not set: on an accelerator,
#: langchain_huggingface's 4 (memory); on a CPU 16, where decoding is bound by
#: reading the weights and a batch reads them once for all its rows (docs/benchmarks.md
#: gives the gain of 16 prompts in one call over one at a time).
DEFAULT_BATCH_SIZE = 4
CPU_BATCH_SIZE = 16
#: What ``langchain_huggingface`` accepts; the last three are encoder-decoder tasks.
VALID_TASKS = ("text-generation", "text2text-generation", "summarization", "translation")
_SEQ2SEQ_TASKS = ("text2text-generation", "summarization", "translation")
#: Answer length when neither the user, the model nor the pipeline sets one.
FALLBACK_MAX_NEW_TOKENS = 256
#: Generation parameters that only matter when sampling.
_SAMPLING_PARAMS = (
    "temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff",
    "eta_cutoff", "top_h",
)  # fmt: skip
#: Parameters that are both model-config attributes and generation parameters.
CONFIG_AND_GENERATION = (
    "use_cache", "output_attentions", "output_hidden_states", "pad_token_id",
    "bos_token_id", "eos_token_id", "decoder_start_token_id",
)  # fmt: skip
#: ``model_kwargs`` that say where weights come from: they apply to the tokenizer too.
HUB_KWARGS = (
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
def generation_keys() -> frozenset[str]:
    """The parameters transformers' ``GenerationConfig`` has."""
    transformers = require("transformers", feature="HuggingFacePipeline")
    return frozenset(k for k in vars(transformers.GenerationConfig()) if not k.startswith("_"))


# --------------------------------------------------------------------- options
@dataclass
class Layer:
    """Generation options from one source (model_kwargs, pipeline_kwargs, a call ...)."""

    generate: dict[str, Any] = field(default_factory=dict)
    echo: bool | None = None
    prefix: str | None = None
    add_special_tokens: bool | None = None
    processors: list[Any] = field(default_factory=list)
    criteria: list[Any] = field(default_factory=list)


def parse_options(options: Mapping[str, Any] | None, where: str) -> Layer:
    """Sort ``pipeline_kwargs``-style options into a layer; refuse what can't be honoured.

    Raises:
        ValueError: an option is unknown, or known but not implemented here.
    """
    layer = Layer()
    for key, value in (options or {}).items():
        if key == "generation_config":
            sub = parse_options(
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
            if key in generation_keys():  # an accepted value
                layer.generate[key] = value
        elif key == "return_full_text":
            layer.echo = bool(value)
        elif key == "prefix":
            layer.prefix = value
        elif key == "add_special_tokens":
            layer.add_special_tokens = value
        elif key == "prefix_length":  # transformers' own bookkeeping for `prefix`
            pass
        elif key in generation_keys():
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
class Settings:
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
        """What of these settings changes the output, for cache keys."""
        return {
            "generate": self.generate,
            "echo": self.echo,
            "prefix": self.prefix,
            "add_special_tokens": self.add_special_tokens,
            "processors": [repr(p) for p in self.processors],
            "criteria": [repr(c) for c in self.criteria],
        }


def resolve(
    layers: list[Layer], model_set: Mapping[str, Any], defaults: Mapping[str, Any]
) -> Settings:
    """Merge layers (later wins) over the model's generation config and the defaults.

    As transformers' pipeline does: a default applies only where neither the user nor
    the model set the parameter, and sampling defaults only when sampling. On top:
    ``temperature=0`` means greedy, and a positive temperature the user gives without
    ``do_sample`` turns sampling on.
    """
    out = Settings(generate={})
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


def valid_task(task: Any) -> bool:
    """Whether ``task`` is one this class runs."""
    return isinstance(task, str) and (task in VALID_TASKS or task.startswith("translation_"))


def is_seq2seq_task(task: str) -> bool:
    """Whether ``task`` runs an encoder-decoder model."""
    return task in _SEQ2SEQ_TASKS or task.startswith("translation_")


def pipeline_defaults(pipe: Any) -> dict[str, Any]:
    """The generation defaults of a transformers pipeline (transformers 5 has them)."""
    defaults = dict(getattr(pipe, "_generation_defaults", None) or {})
    defaults.pop("pad_token_id", None)
    defaults.setdefault("max_new_tokens", FALLBACK_MAX_NEW_TOKENS)
    return defaults


def pipeline_layer(pipe: Any) -> Layer:
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
    return parse_options(options, "the pipeline's parameters")
