"""Tool calls for local chat models.

The prompt that offers tools, the grammar that forces a valid call, and the parser
that reads calls back.

The call syntax is one JSON object, ``{"name": ..., "arguments": {...}}`` (a list of
them for parallel calls is not offered). Where decoding can be constrained, the
grammar built here makes every forced call valid JSON that validates against its
tool's schema; the parser validates again either way, so a runtime without a grammar
(CTranslate2) gets a clear error instead of a wrong call.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from langchain_core.messages import ToolCall
from langchain_core.utils.function_calling import convert_to_openai_tool

from langchain_localllms.core.errors import SchemaValidationError
from langchain_localllms.grammars import Grammar
from langchain_localllms.grammars.schemas import validate

__all__ = [
    "HERMES",
    "PLAIN",
    "CallSyntax",
    "ToolCallError",
    "ToolSpec",
    "call_grammar",
    "call_prefix",
    "object_prefix",
    "parse_call",
    "tools_preamble",
]

#: What ``tool_choice`` may be, besides a tool's name.
CHOICES = ("auto", "any", "required", "none")


class ToolCallError(ValueError):
    """The model's answer is not a valid call of a bound tool (no grammar constrained it)."""


@dataclass(frozen=True)
class ToolSpec:
    """A bound tool: its name, description and the JSON schema of its arguments."""

    name: str
    description: str
    parameters: dict[str, Any]

    @classmethod
    def of(cls, tool: Any) -> ToolSpec:
        """A spec from anything ``bind_tools`` takes (a tool, a function, a schema)."""
        fn = convert_to_openai_tool(tool)["function"]
        params = dict(fn.get("parameters") or {"type": "object", "properties": {}})
        params.setdefault("type", "object")
        params.setdefault("properties", {})
        return cls(name=fn["name"], description=fn.get("description") or "", parameters=params)

    def openai(self) -> dict[str, Any]:
        """The tool as chat templates take it (``tools=``: OpenAI's function format)."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }

    def call_schema(self) -> dict[str, Any]:
        """The JSON schema of one call of this tool."""
        return {
            "type": "object",
            "properties": {"name": {"const": self.name}, "arguments": self.parameters},
            "required": ["name", "arguments"],
        }


@dataclass(frozen=True)
class CallSyntax:
    """How a model writes a call: the JSON object, maybe between its template's tags.

    ``native``: the chat template renders the tools itself (``tools=``) and reads
    earlier calls from ``tool_calls``; otherwise the tools go in a system message.
    """

    open: str = ""
    close: str = ""
    native: bool = False

    @classmethod
    def of(cls, template: str) -> CallSyntax:
        """The syntax a chat template teaches its model (Hermes' ``<tool_call>`` tags)."""
        if "<tool_call>" in template and "tools" in template:
            return HERMES
        return PLAIN

    def wrap(self, call: str) -> str:
        return f"{self.open}{call}{self.close}"

    def unwrap(self, text: str) -> str:
        """The JSON of a call written in this syntax (the tags taken off)."""
        text = text.strip()
        opening, closing = self.open.strip(), self.close.strip()
        if opening and text.startswith(opening):
            text = text[len(opening) :]
            if closing and closing in text:
                text = text[: text.index(closing)]
        return text.strip()

    def starts(self, text: str) -> bool | None:
        """Whether an answer that begins with ``text`` is a call (None: not known yet)."""
        head = text.lstrip()
        if not head:
            return None
        for opening in {"{", self.open.strip() or "{"}:
            if head.startswith(opening):
                return True
            if opening.startswith(head):
                return None
        return False


#: A bare JSON object: the syntax the tools' system message asks for.
PLAIN = CallSyntax()
#: Hermes (NousResearch), used by Qwen 2.5 / 3 and others: ``<tool_call>`` tags.
HERMES = CallSyntax(open="<tool_call>\n", close="\n</tool_call>", native=True)


def resolve_choice(tools: Sequence[ToolSpec], tool_choice: Any) -> tuple[str, list[ToolSpec]]:
    """``(mode, allowed)``: mode ``auto``, ``forced`` or ``none``, and the callable tools."""
    if tool_choice is None or tool_choice == "auto":
        return "auto", list(tools)
    if tool_choice == "none" or tool_choice is False:
        return "none", []
    if tool_choice in ("any", "required") or tool_choice is True:
        return "forced", list(tools)
    name = tool_choice
    if isinstance(tool_choice, dict):  # {"type": "function", "function": {"name": ...}}
        name = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
    chosen = [t for t in tools if t.name == name]
    if not chosen:
        known = ", ".join(t.name for t in tools) or "none"
        msg = (
            f"tool_choice={tool_choice!r} is not one of {', '.join(CHOICES)} nor a bound "
            f"tool's name (bound: {known})"
        )
        raise ValueError(msg)
    return "forced", chosen


def call_mode(tools: Sequence[ToolSpec], tool_choice: Any) -> tuple[str, list[ToolSpec]]:
    """One call's ``(mode, allowed)`` (see :func:`resolve_choice`); ``"none"`` without tools.

    A choice that needs tools when none are bound is an error that says how to bind them.
    """
    if tool_choice not in (None, "auto", "none") and not tools:
        msg = f"tool_choice={tool_choice!r} needs tools: bind them with bind_tools(tools, ...)"
        raise ValueError(msg)
    mode, allowed = resolve_choice(tools, tool_choice)
    return (mode if tools else "none"), allowed


def call_grammar(
    tools: Sequence[ToolSpec], *, forced: bool, syntax: CallSyntax = PLAIN, strict: bool = True
) -> Grammar:
    """The grammar of an answer: a valid call of one of ``tools``, in ``syntax``.

    Unless ``forced``, free text that does not start like a call is allowed too. A
    forced call without tags is the call's JSON and nothing else: its grammar is the
    call's JSON schema (a server's converter takes it as it is). ``strict=False``:
    keywords the runtime cannot enforce are left out (see
    :meth:`Grammar.from_json_schema`).
    """
    schema: dict[str, Any] = (
        tools[0].call_schema() if len(tools) == 1 else {"anyOf": [t.call_schema() for t in tools]}
    )
    tagged = " ".join(
        [*([_literal(syntax.open)] if syntax.open else []), "json-call",
         *([_literal(syntax.close)] if syntax.close else [])]
    )  # fmt: skip
    if forced and not syntax.open:
        return Grammar.from_json_schema(schema, strict=strict)
    if forced:
        return Grammar.around_schema(
            f"root ::= {tagged}\n", "json-call", schema, name="tool call", strict=strict
        )
    first = "<" if syntax.open else "{"
    free = f"root ::= {tagged} | text\ntext ::= [^{first} \\t\\n] [^\\x00]*\n"
    return Grammar.around_schema(free, "json-call", schema, name="tool call or text", strict=strict)


def _literal(text: str) -> str:
    """``text`` as a GBNF string literal."""
    return json.dumps(text)


def tools_preamble(tools: Sequence[ToolSpec], *, forced: bool) -> str:
    """What tells a model without tool support in its template how to call a tool."""
    listing = "\n".join(
        json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters})
        for t in tools
    )
    how = (
        "Answer with a call of one of them"
        if forced
        else "To call one, answer with nothing but the call; otherwise answer in text"
    )
    return (
        f'You can call these tools:\n{listing}\n{how}: a JSON object whose "name" is '
        'the tool\'s name and whose "arguments" are the values the question gives.'
    )


def call_prefix(tools: Sequence[ToolSpec]) -> str:
    """The opening of a forced call, for runtimes that cannot constrain decoding.

    The prompt ends with it and the model goes on from it: with one tool, up to its
    first argument's value (the whole call, for a tool without arguments); with
    several, up to where the tool's name begins.
    """
    if len(tools) == 1:
        if not tools[0].parameters.get("properties"):
            return render_call(tools[0].name, {})  # nothing left to write
        opening = render_call(tools[0].name, {})[:-2]  # '{"name": "x", "arguments": {'
        return opening + object_prefix(tools[0].parameters)[1:]
    return '{"name": "'


def object_prefix(schema: dict[str, Any] | None) -> str:
    """The opening of a JSON object of ``schema``, up to its first property's value.

    A string value's opening quote is part of it.
    """
    props = (schema or {}).get("properties") or {}
    if not props:
        return "{"
    first, spec = next(iter(props.items()))
    quote = '"' if isinstance(spec, dict) and spec.get("type") == "string" else ""
    return "{" + f"{json.dumps(first)}: {quote}"


def render_call(name: str, args: dict[str, Any]) -> str:
    """A call as the model writes it (for earlier calls in a conversation)."""
    return json.dumps({"name": name, "arguments": args}, ensure_ascii=False)


def answer_call(
    text: str,
    tools: Sequence[ToolSpec],
    *,
    forced: bool,
    syntax: CallSyntax = PLAIN,
    finish: Any = None,
    limit: str = "max_tokens",
) -> ToolCall | None:
    """:func:`parse_call` of a whole answer; a call cut at the token limit says so.

    ``finish`` is the answer's finish reason, ``limit`` the name of the setting that
    bounds its length (``max_tokens``, ``num_predict``).
    """
    try:
        return parse_call(text, tools, forced=forced, syntax=syntax)
    except ToolCallError as e:
        if finish == "length":
            msg = f"{e}. The answer ended at the token limit: raise {limit}"
            raise ToolCallError(msg) from e
        raise


def parse_call(
    text: str, tools: Sequence[ToolSpec], *, forced: bool, syntax: CallSyntax = PLAIN
) -> ToolCall | None:
    """The call in an answer, or None when it is text (and no call was forced).

    Raises:
        ToolCallError: the answer starts like a call but is not a valid one (a runtime
            without grammars, or a stop sequence that cut it), or a forced call is
            missing.
    """
    stripped = syntax.unwrap(text)
    if not stripped.startswith("{"):
        if forced:
            msg = f"a tool call was required, but the model answered with text: {text[:200]!r}"
            raise ToolCallError(msg)
        return None
    try:
        data = json.loads(stripped)
    except json.JSONDecodeError as e:
        msg = f"the model's tool call is not valid JSON ({e}): {stripped[:200]!r}"
        raise ToolCallError(msg) from e
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        msg = f"the model's tool call has no tool name: {stripped[:200]!r}"
        raise ToolCallError(msg)
    spec = next((t for t in tools if t.name == data["name"]), None)
    if spec is None:
        known = ", ".join(t.name for t in tools)
        msg = f"the model called {data['name']!r}, which is not a bound tool ({known})"
        raise ToolCallError(msg)
    args = data.get("arguments", {})
    if not isinstance(args, dict):
        msg = f"the arguments of the model's call of {spec.name!r} are not an object: {args!r}"
        raise ToolCallError(msg)
    _check_args(spec, args)
    return ToolCall(name=spec.name, args=args, id=f"call_{uuid.uuid4().hex[:24]}", type="tool_call")


def _check_args(spec: ToolSpec, args: dict[str, Any]) -> None:
    """The arguments validate against the tool's whole schema (formats checked)."""
    try:
        validate(spec.parameters, args, json.dumps(args))
    except SchemaValidationError as e:
        msg = f"the model's call of {spec.name!r} does not fit its schema: {'; '.join(e.errors)}"
        raise ToolCallError(msg) from e
