"""Prompts that fit the loaded model.

Local models answer well only in their own prompt format. This module lets a chain
choose by what is *loaded*, not by which class holds it:

* :class:`ModelInfo` — what a runtime knows of its model (``llm.model_info()``):
  architecture, name, the chat template the model file carries, BOS/EOS text;
* predicates for ``ConditionalPromptSelector``: :func:`is_runtime`, :func:`is_family`,
  :func:`has_chat_template`;
* :func:`render_chat` — a model's Jinja chat template rendered in a **sandbox**
  (templates come from model files downloaded from anywhere);
* :func:`chat_prompt` — a ``PromptTemplate`` in the model's own format, with the
  usual ``{variables}``; built-in formats (:data:`FORMATS`) for models whose files
  carry no template;
* :class:`ModelPromptSelector` — ``get_prompt(llm)``: your conditionals first, then the
  model's own format, else your default prompt.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from langchain_core.prompts import BasePromptTemplate, PromptTemplate

__all__ = [
    "FORMATS",
    "ChatTemplateError",
    "ModelInfo",
    "ModelPromptSelector",
    "chat_format",
    "chat_prompt",
    "has_chat_template",
    "is_family",
    "is_runtime",
    "register_format",
    "render_chat",
]


@dataclass(frozen=True)
class ModelInfo:
    """What a runtime knows about the model it runs."""

    runtime: str
    """The class's ``_llm_type`` (e.g. ``"llamacpp"``)."""
    model: str
    """Model name or file name."""
    architecture: str | None = None
    """Model family as the model file names it (``"llama"``, ``"gemma3"``, ...)."""
    chat_template: str | None = None
    """The Jinja chat template the model carries, if any."""
    bos_token: str = ""
    """Text of the start token (chat templates may print it)."""
    eos_token: str = ""
    """Text of the end token."""
    adds_bos: bool = False
    """Whether the runtime adds the start token itself when it tokenizes a prompt."""
    context_length: int | None = None
    """The context size in tokens the model runs with (or will), where known."""


class ChatTemplateError(ValueError):
    """A chat template that does not render (broken, or refusing the messages)."""


# ---------------------------------------------------------------- predicates
def _info(llm: Any) -> ModelInfo | None:
    getter = getattr(llm, "model_info", None)
    return getter() if callable(getter) else None


def is_runtime(*names: str) -> Callable[[Any], bool]:
    """Predicate: the LLM is one of these runtimes (``_llm_type``), e.g. ``"llamacpp"``."""
    wanted = {n.lower() for n in names}
    return lambda llm: getattr(llm, "_llm_type", "").lower() in wanted


def is_family(*families: str) -> Callable[[Any], bool]:
    """Predicate: the loaded model's architecture starts with one of ``families``.

    ``is_family("llama")`` matches ``llama``; ``is_family("gemma")`` matches
    ``gemma``, ``gemma2`` and ``gemma3``.
    """
    wanted = tuple(f.lower() for f in families)

    def check(llm: Any) -> bool:
        info = _info(llm)
        return bool(info and info.architecture and info.architecture.lower().startswith(wanted))

    return check


def has_chat_template(llm: Any) -> bool:
    """Predicate: the loaded model carries its own chat template."""
    info = _info(llm)
    return bool(info and info.chat_template)


# ---------------------------------------------------------------- rendering
def _raise(message: str) -> None:
    raise ChatTemplateError(message)


#: Bounds on rendering one chat template: a template that comes with a GGUF file or
#: from a server's /props must not hang ``chat_prompt()`` or exhaust memory.
RENDER_SECONDS = 2.0
RENDER_CHARS = 1_000_000

_deadline = threading.local()


def _tick() -> None:
    """Fail the render in progress once it has run past :data:`RENDER_SECONDS`."""
    until = getattr(_deadline, "at", None)
    if until is not None and time.monotonic() > until:
        msg = f"the chat template ran longer than {RENDER_SECONDS:g} s; it is not rendered"
        raise ChatTemplateError(msg)


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The sandbox, with every call, lookup and operator checking the time.

    Repetitions (``"x" * n``, ``n ** m``) are checked for size before they are made.
    """

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _tick()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                sized = isinstance(seq, (str, list, tuple)) and isinstance(n, int)
                if sized and len(seq) * n > RENDER_CHARS:
                    msg = f"the chat template repeats a value past {RENDER_CHARS:,} items"
                    raise ChatTemplateError(msg)
        if operator == "**" and isinstance(right, int) and abs(right) > 1024:
            msg = "the chat template raises a number to a power above 1024"
            raise ChatTemplateError(msg)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _tick()
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _tick()
        return super().getitem(obj, argument)


def _environment() -> ImmutableSandboxedEnvironment:
    env = _BoundedSandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols],
    )
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = _tojson
    return env


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    r"""``tojson`` as Hugging Face's chat templates expect it: plain JSON, no HTML escapes.

    (Jinja's own writes ``<`` as ``\\u003c``, which a model never saw in training.)
    """
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


_ENV = _environment()


def render_chat(
    template: str,
    messages: Sequence[dict[str, str]],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
    **extra: Any,
) -> str:
    """Render a chat template in a Jinja sandbox.

    The sandbox refuses access to Python internals (``__class__``, ``__globals__``,
    ...) and mutation of passed objects, so a hostile template cannot run code; a
    render is bounded to :data:`RENDER_SECONDS` and :data:`RENDER_CHARS` of output.

    Raises:
        ChatTemplateError: the template is broken, touches what the sandbox forbids,
            refuses the messages (``raise_exception`` in the template), or runs past
            its time or size bound.
    """
    _deadline.at = time.monotonic() + RENDER_SECONDS
    try:
        compiled = _ENV.from_string(template)
        out: list[str] = []
        size = 0
        for piece in compiled.generate(
            messages=list(messages),
            bos_token=bos_token,
            eos_token=eos_token,
            add_generation_prompt=add_generation_prompt,
            **extra,
        ):
            size += len(piece)
            if size > RENDER_CHARS:
                msg = f"the chat template wrote more than {RENDER_CHARS:,} characters"
                raise ChatTemplateError(msg)
            out.append(piece)
            _tick()
        return "".join(out)
    except ChatTemplateError:
        raise
    except jinja2.exceptions.SecurityError as e:
        msg = f"the chat template tried something the sandbox forbids: {e}"
        raise ChatTemplateError(msg) from e
    except jinja2.exceptions.TemplateError as e:
        lineno = getattr(e, "lineno", None)
        where = f" (line {lineno})" if lineno else ""
        msg = f"the chat template is broken{where}: {e}"
        raise ChatTemplateError(msg) from e
    except Exception as e:
        msg = f"the chat template failed while rendering: {type(e).__name__}: {e}"
        raise ChatTemplateError(msg) from e
    finally:
        _deadline.at = None


# ------------------------------------------------------------ known formats
#: Chat formats for models whose files carry no template, by name.
FORMATS: dict[str, str] = {}
#: Which built-in format an architecture uses when its file carries no template.
_FAMILY_FORMATS: dict[str, str] = {}


def register_format(name: str, *, families: Sequence[str] = ()) -> Callable[[str], str]:
    """Register a Jinja chat format under ``name``, used by default for ``families``."""

    def add(template: str) -> str:
        FORMATS[name] = template
        for fam in families:
            _FAMILY_FORMATS[fam] = name
        return template

    return add


register_format("gemma", families=("gemma", "gemma2", "gemma3", "gemma3_text"))(
    "{% for m in messages if m['role'] != 'system' %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
    "{% if loop.first and messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] }}\n\n{% endif %}"
    "{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
register_format("llama-2", families=("llama2",))(
    "{% for m in messages if m['role'] != 'system' %}"
    "{% if m['role'] == 'user' %}[INST] "
    "{% if loop.first and messages[0]['role'] == 'system' %}"
    "<<SYS>>\n{{ messages[0]['content'] }}\n<</SYS>>\n\n{% endif %}"
    "{{ m['content'] }} [/INST]{% else %} {{ m['content'] }} {% endif %}"
    "{% endfor %}"
)
register_format("chatml", families=("qwen", "qwen2", "qwen3"))(
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_format(llm_or_info: Any) -> str | None:
    """The chat template to use for a model: its own, else a built-in for its family."""
    info = llm_or_info if isinstance(llm_or_info, ModelInfo) else _info(llm_or_info)
    if info is None:
        return None
    if info.chat_template:
        return info.chat_template
    arch = (info.architecture or "").lower()
    name = _FAMILY_FORMATS.get(arch)
    return FORMATS[name] if name else None


_VAR = re.compile(r"\{(\w+)\}")


def chat_prompt(
    llm: Any,
    user: str = "{question}",
    system: str | None = None,
    *,
    template: str | None = None,
) -> PromptTemplate:
    """A ``PromptTemplate`` that puts ``system`` and ``user`` in the model's own format.

    ``user`` and ``system`` are f-string templates (``"{question}"``); the result keeps
    their variables. The format is ``template`` if given, else the model's chat
    template, else the built-in format for its family.

    Raises:
        ValueError: no chat format is known for this model (pass ``template=``).
        ChatTemplateError: the template does not render.
    """
    info = _info(llm) or ModelInfo(runtime="?", model="?")
    fmt = template or chat_format(info)
    if fmt is None:
        msg = (
            f"{info.model} carries no chat template and its family "
            f"({info.architecture}) has no built-in format; pass template= "
            f"(built-ins: {', '.join(sorted(FORMATS))})"
        )
        raise ValueError(msg)
    names: list[str] = []

    def mark(text: str) -> str:
        def sub(m: re.Match[str]) -> str:
            if m.group(1) not in names:
                names.append(m.group(1))
            return f"\x00{m.group(1)}\x00"

        return _VAR.sub(sub, text.replace("{{", "\x01").replace("}}", "\x02"))

    messages = [{"role": "user", "content": mark(user)}]
    if system:
        messages.insert(0, {"role": "system", "content": mark(system)})
    try:
        text = render_chat(fmt, messages, bos_token=info.bos_token, eos_token=info.eos_token)
    except ChatTemplateError:
        if not system:
            raise
        # Some templates (Gemma's own) refuse a system role: say it in the user turn.
        merged = [{"role": "user", "content": mark(system) + "\n\n" + mark(user)}]
        text = render_chat(fmt, merged, bos_token=info.bos_token, eos_token=info.eos_token)
    if info.adds_bos and info.bos_token and text.startswith(info.bos_token):
        text = text[len(info.bos_token) :]  # the runtime adds it when tokenizing
    text = text.replace("{", "{{").replace("}", "}}")
    text = re.sub("\x00(\\w+)\x00", r"{\1}", text).replace("\x01", "{{").replace("\x02", "}}")
    return PromptTemplate(template=text, input_variables=names, template_format="f-string")


class ModelPromptSelector:
    """Pick a prompt for the loaded model (a drop-in for ``ConditionalPromptSelector``).

    ``get_prompt(llm)`` returns the prompt of the first conditional that holds; else
    ``default_prompt`` rewritten into the model's own chat format (with ``system``),
    when one is known; else ``default_prompt`` as it is.
    """

    def __init__(
        self,
        default_prompt: PromptTemplate,
        *,
        system: str | None = None,
        conditionals: Sequence[tuple[Callable[[Any], bool], BasePromptTemplate[Any]]] = (),
        use_chat_format: bool = True,
    ) -> None:
        self.default_prompt = default_prompt
        self.system = system
        self.conditionals = list(conditionals)
        self.use_chat_format = use_chat_format

    def get_prompt(self, llm: Any) -> BasePromptTemplate[Any]:
        """The prompt to use with ``llm``."""
        for condition, prompt in self.conditionals:
            if condition(llm):
                return prompt
        if self.use_chat_format and chat_format(llm) is not None:
            return chat_prompt(llm, self.default_prompt.template, self.system)
        return self.default_prompt
