"""Reading a chat answer: text, reasoning kept apart, a tool call, usage."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

from langchain_localllms.chat_models._tools import PLAIN, CallSyntax, ToolSpec, answer_call
from langchain_localllms.llms._base import UNTIL


@dataclass
class ChatTurn:
    """What one call sends to the LLM, and how to read the answer."""

    prompt: str
    options: dict[str, Any] = field(default_factory=dict)
    tools: list[ToolSpec] = field(default_factory=list)
    mode: str = "none"  # "none", "auto" (text or a call), "forced" (a call)
    syntax: CallSyntax = PLAIN
    #: What the prompt ends with and the answer starts with: the opening of a call
    #: or of a JSON object, written for runtimes that cannot constrain decoding.
    prefix: str = ""
    #: The answer is one JSON value and nothing after it (no grammar ends it).
    json_only: bool = False
    #: The schema of a JSON-only answer that is not a call (its fields end it early).
    schema: dict[str, Any] | None = None
    #: The template opened a thought (``<think>``) in the generation prompt.
    thinking: bool = False


#: The tags reasoning models wrap their thinking in.
THINK = ("<think>", "</think>")


def opens_thought(template: str) -> bool:
    return THINK[0] in template


class Thoughts:
    """Splits ``<think>...</think>`` off the start of an answer, piece by piece.

    A tag may arrive split across pieces: text that could still be the start of one is
    held back until the next piece says.
    """

    def __init__(self, inside: bool) -> None:
        self.state = "inside" if inside else "start"  # start, inside, after, answer
        self.held = ""

    def feed(self, text: str) -> list[tuple[bool, str]]:
        """``(is_reasoning, text)`` parts of the answer so far."""
        parts: list[tuple[bool, str]] = []
        text, self.held = self.held + text, ""
        while text:
            if self.state == "start":
                head = text.lstrip()
                if head.startswith(THINK[0]):
                    text, self.state = head[len(THINK[0]) :], "inside"
                elif not head or THINK[0].startswith(head):
                    self.held = text
                    return parts
                else:
                    self.state = "answer"
            elif self.state == "inside":
                at = text.find(THINK[1])
                if at >= 0:
                    parts.append((True, text[:at]))
                    text, self.state = text[at + len(THINK[1]) :], "after"
                    continue
                keep = partial_tail(text, THINK[1])
                parts.append((True, text[: len(text) - keep]))
                self.held = text[len(text) - keep :]
                return [p for p in parts if p[1]]
            elif self.state == "after":  # the blank lines between thought and answer
                text = text.lstrip()
                if text:
                    self.state = "answer"
            else:
                parts.append((False, text))
                break
        return [p for p in parts if p[1]]

    def end(self) -> list[tuple[bool, str]]:
        held, self.held = self.held, ""
        if not held or self.state == "after":
            return []
        return [(self.state == "inside", held)]


def partial_tail(text: str, tag: str) -> int:
    """How many of ``text``'s last characters could begin ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class AnswerReader:
    """Turns the LLM's text pieces into message chunks: text, or one tool call.

    Reasoning (``<think>...</think>``) goes to ``reasoning_content``, never to the text.
    """

    def __init__(self, turn: ChatTurn, model_name: str) -> None:
        self.turn = turn
        self.model_name = model_name
        self.buffer = ""
        self.calling: bool | None = None if turn.mode == "auto" else turn.mode == "forced"
        self.info: dict[str, Any] = {}
        self.thoughts = Thoughts(inside=turn.thinking)
        self.json_text = ""
        self.done = False  # json_only: the JSON value is complete

    def options(self) -> dict[str, Any]:
        """The LLM call's options: a JSON-only answer ends with its value."""
        if not self.turn.json_only:
            return self.turn.options
        return {**self.turn.options, UNTIL: lambda: self.done}

    def start(self) -> Iterator[ChatGenerationChunk]:
        """What the answer starts with before the model writes (the turn's prefix)."""
        if self.turn.prefix:
            self.thoughts.state = "answer"
            yield from self._answer(self.turn.prefix)

    def feed(self, text: str, info: dict[str, Any] | None) -> Iterator[ChatGenerationChunk]:
        if info:
            self.info.update(info)
        if not text or self.done:
            return
        for reasoning, part in self.thoughts.feed(text):
            if reasoning:
                yield reasoning_chunk(part)
            else:
                yield from self._answer(part)

    def _answer(self, text: str) -> Iterator[ChatGenerationChunk]:
        if self.turn.json_only:
            text = self._json_part(text)
        if self.calling is None:  # auto: text, or a call in the template's syntax
            self.buffer += text
            self.calling = self.turn.syntax.starts(self.buffer)
            if self.calling is None:
                return
            if not self.calling:
                text, self.buffer = self.buffer, ""
                yield ChatGenerationChunk(message=AIMessageChunk(content=text))
            return
        if self.calling:
            self.buffer += text
            return
        if text:
            yield ChatGenerationChunk(message=AIMessageChunk(content=text))

    def _json_part(self, text: str) -> str:
        """The part of ``text`` up to the end of the answer's JSON value.

        The value ends where its JSON does, or where every field of the schema has been
        written and the model goes on with a comma (a field the schema does not have):
        the object is closed there.
        """
        before = len(self.json_text)
        self.json_text += text
        opening = self.turn.syntax.open
        body = len(opening) if self.json_text.startswith(opening) else 0
        closing = "}" if self.turn.mode == "none" else "}}"  # an answer; a call's arguments
        cut: tuple[int, str] | None = None
        if "}" in text:
            head = self.json_text[body:]
            lead = len(head) - len(head.lstrip())
            try:
                _, end = json.JSONDecoder().raw_decode(head.lstrip())
                cut = body + lead + end, ""
            except json.JSONDecodeError:
                pass
        if cut is None and "," in text:
            for i in range(max(before, body), len(self.json_text)):
                if self.json_text[i] == "," and self._all_fields(self.json_text[body:i] + closing):
                    cut = i, closing
                    break
        if cut is None:
            return text
        self.done = True
        end, added = cut
        return text[: end - before] + added

    def _all_fields(self, candidate: str) -> bool:
        """Whether ``candidate`` is the whole JSON answer, with every field of its schema."""
        try:
            data = json.loads(candidate)
        except json.JSONDecodeError:
            return False
        if not isinstance(data, dict):
            return False
        schema: dict[str, Any] | None
        values: Any
        if self.turn.mode == "none":
            schema, values = self.turn.schema, data
        else:
            tool = next((t for t in self.turn.tools if t.name == data.get("name")), None)
            schema, values = (tool.parameters if tool else None), data.get("arguments")
        fields = (schema or {}).get("properties") or {}
        return bool(fields) and isinstance(values, dict) and set(fields) <= set(values)

    def end(self) -> Iterator[ChatGenerationChunk]:
        for reasoning, part in self.thoughts.end():
            if reasoning:
                yield reasoning_chunk(part)
            else:
                yield from self._answer(part)
        if self.done:
            self.info["finish_reason"] = "stop"  # the value ended; decoding was stopped
        metadata = {"model_name": self.model_name, "finish_reason": self.info.get("finish_reason")}
        calls: list[dict[str, Any]] = []
        content = ""
        if self.calling or (self.calling is None and self.buffer.strip()):
            call = answer_call(
                self.buffer,
                self.turn.tools,
                forced=self.turn.mode == "forced",
                syntax=self.turn.syntax,
                finish=self.info.get("finish_reason"),
            )
            if call is None:
                content = self.buffer
            else:
                calls = [dict(call)]
        elif self.buffer:
            content = self.buffer
        yield final_chunk(content, calls, dict(self.info), metadata)


def final_chunk(
    content: str, calls: list[dict[str, Any]], info: dict[str, Any], metadata: dict[str, Any]
) -> ChatGenerationChunk:
    """An answer's last chunk: its text or its tool calls, usage, and what ended it."""
    chunks = [
        tool_call_chunk(
            name=c["name"], args=json.dumps(c["args"], ensure_ascii=False), id=c["id"], index=i
        )
        for i, c in enumerate(calls)
    ]
    if calls:
        metadata = {**metadata, "finish_reason": "tool_calls"}
    message = AIMessageChunk(
        content=content,
        tool_call_chunks=chunks,
        usage_metadata=usage_metadata(info),
        response_metadata=metadata,
        chunk_position="last",
    )
    return ChatGenerationChunk(message=message, generation_info=info)


def reasoning_chunk(text: str) -> ChatGenerationChunk:
    return ChatGenerationChunk(
        message=AIMessageChunk(content="", additional_kwargs={"reasoning_content": text})
    )


def usage_metadata(info: dict[str, Any]) -> UsageMetadata | None:
    prompt, completion = info.get("prompt_tokens"), info.get("completion_tokens")
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return UsageMetadata(
        input_tokens=prompt, output_tokens=completion, total_tokens=prompt + completion
    )


def as_message(result: ChatResult) -> ChatResult:
    """A streamed-then-joined answer as a plain ``AIMessage`` (what ``invoke`` returns)."""
    gens = []
    for gen in result.generations:
        m = gen.message
        message = AIMessage(
            content=m.content,
            additional_kwargs=m.additional_kwargs,
            tool_calls=getattr(m, "tool_calls", []),
            usage_metadata=getattr(m, "usage_metadata", None),
            response_metadata=m.response_metadata,
            id=m.id,
        )
        gens.append(ChatGeneration(message=message, generation_info=gen.generation_info))
    return ChatResult(generations=gens, llm_output=result.llm_output)
