"""LangChain messages as chat templates and servers take them: roles, text, calls."""

from __future__ import annotations

from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, SystemMessage, ToolMessage

from langchain_localllms.chat_models._tools import CallSyntax, render_call
from langchain_localllms.prompts import ChatTemplateError, ModelInfo, render_chat


def message_text(message: BaseMessage, who: str = "this chat model") -> str:
    """A message's text: its string content, or its text blocks joined.

    Tool-call blocks are in ``tool_calls``, and a thought of an earlier turn is not
    sent as text; any other block (an image, a file) is an error that says so.
    """
    content = message.content
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
        elif isinstance(block, dict) and block.get("type") in ("tool_use", "tool_call"):
            continue  # in tool_calls
        elif isinstance(block, dict) and block.get("type") in ("reasoning", "thinking"):
            continue  # a thought of an earlier turn is not sent as text
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            msg = f"{who} sends text only; a {kind!r} content block cannot be sent"
            raise ValueError(msg)
    return "".join(parts)


ROLES = {"system": "system", "human": "user", "ai": "assistant", "tool": "tool"}


def template_turn(message: BaseMessage, template: str, syntax: CallSyntax) -> dict[str, Any]:
    """A message as a chat template takes it (calls in the template's syntax)."""
    role = ROLES.get(message.type) or ("user" if message.type == "chat" else None)
    if role is None:
        msg = f"cannot send a {message.type!r} message to a chat template"
        raise ValueError(msg)
    content = message_text(message)
    if isinstance(message, AIMessage) and message.tool_calls:
        if syntax.native:  # the template writes them in its own syntax
            calls = [
                {"type": "function", "id": c["id"],
                 "function": {"name": c["name"], "arguments": c["args"]}}
                for c in message.tool_calls
            ]  # fmt: skip
            return {"role": "assistant", "content": content, "tool_calls": calls}
        written = "\n".join(render_call(c["name"], c["args"]) for c in message.tool_calls)
        content = f"{content}\n{written}" if content else written
    if isinstance(message, ToolMessage):
        if "tool" not in template:  # the template knows no tool role: a user turn
            name = message.name or "the tool"
            return {"role": "user", "content": f"Result of {name}: {content}"}
        return {"role": "tool", "content": content, "tool_call_id": message.tool_call_id}
    if isinstance(message, SystemMessage):
        return {"role": "system", "content": content}
    return {"role": role, "content": content}


def render_turns(
    template: str, turns: list[dict[str, Any]], info: ModelInfo, extra: dict[str, Any]
) -> str:
    """The prompt: ``turns`` through the template.

    A template that refuses a system turn gets it folded into the first user turn.
    """
    tokens = {"bos_token": info.bos_token, "eos_token": info.eos_token, **extra}
    try:
        text = render_chat(template, turns, **tokens)
    except ChatTemplateError:
        if not turns or turns[0]["role"] != "system":
            raise
        # Templates that refuse a system role (Gemma's own): say it in the first turn.
        system, rest = turns[0]["content"], turns[1:]
        if rest and rest[0]["role"] == "user":
            rest = [{**rest[0], "content": f"{system}\n\n{rest[0]['content']}"}, *rest[1:]]
        else:
            rest = [{"role": "user", "content": system}, *rest]
        text = render_chat(template, rest, **tokens)
    if info.adds_bos and info.bos_token and text.startswith(info.bos_token):
        text = text[len(info.bos_token) :]  # the runtime adds it when tokenizing
    return text


def add_system(turns: list[dict[str, Any]], text: str) -> None:
    """Put ``text`` in the system turn: after the one there is, or as a new first turn."""
    if turns and turns[0]["role"] == "system":
        turns[0] = {**turns[0], "content": f"{turns[0]['content']}\n\n{text}"}
    else:
        turns.insert(0, {"role": "system", "content": text})


def normalized(messages: list[BaseMessage]) -> list[BaseMessage]:
    """The messages as LangChain hands them to ``_generate``."""
    try:  # what LangChain hands ``_generate``: v1 content blocks in older formats
        from langchain_core.language_models._utils import _normalize_messages
    except ImportError:
        return messages
    return list(_normalize_messages(messages))
