"""What every local chat model shares, over an LLM class's engine.

Messages go through the model's own chat template; tools and structured output are
constrained by grammars.

A chat class holds an instance of its runtime's LLM class (``llm``), built from the
same arguments (``ChatLlamaCpp(model_path=..., temperature=0)``) or given
(``ChatHuggingFace(llm=HuggingFacePipeline(...))``). Loading, decoding, stop
sequences, usage and timings are the LLM's; this class renders the conversation into
one prompt and turns the answer into an ``AIMessage``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, ClassVar, Literal

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel, BaseLanguageModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.language_models.chat_models import (
    agenerate_from_stream,
    generate_from_stream,
)
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableLambda, RunnableMap, RunnablePassthrough
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import ConfigDict, model_validator

from langchain_localllms._base import LocalLLM
from langchain_localllms.chat_models._tools import (
    ToolCallError,
    ToolSpec,
    call_grammar,
    parse_call,
    render_call,
    resolve_choice,
    tools_preamble,
)
from langchain_localllms.grammars import Grammar
from langchain_localllms.prompts import ChatTemplateError, ModelInfo, chat_format, render_chat

__all__ = ["LocalChatModel"]

@dataclass
class _Turn:
    """What one call sends to the LLM, and how to read the answer."""

    prompt: str
    options: dict[str, Any] = field(default_factory=dict)
    tools: list[ToolSpec] = field(default_factory=list)
    mode: str = "none"  # "none", "auto" (text or a call), "forced" (a call)


class LocalChatModel(BaseChatModel):
    """Base class of the chat models of this package (not used directly)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, protected_namespaces=())

    llm: LocalLLM
    """The LLM instance that runs the model (built from this class's other arguments)."""
    chat_template: str | None = None
    """A Jinja chat template to use instead of the model's own (rendered in a sandbox)."""

    #: The runtime's LLM class.
    _llm_class: ClassVar[type[LocalLLM]]

    @model_validator(mode="before")
    @classmethod
    def _build_llm(cls, values: Any) -> Any:
        """Arguments that are not the chat class's own build its LLM (``llm``)."""
        if not isinstance(values, dict) or "llm" in values:
            return values
        own = cls._own_fields()
        chat = {k: v for k, v in values.items() if k in own}
        chat["llm"] = cls._llm_class(**{k: v for k, v in values.items() if k not in own})
        return chat

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """Load the model as the LLM class's ``from_pretrained`` does (the Hub cache).

        Arguments of the chat class itself (``chat_template``, ``callbacks``, ...) stay
        with it; the others go to the LLM class.
        """
        loader = getattr(cls._llm_class, "from_pretrained", None)
        if loader is None:
            msg = f"{cls.__name__} has no from_pretrained: {cls._llm_class.__name__} has none"
            raise AttributeError(msg)
        own = {k: kwargs.pop(k) for k in list(kwargs) if k in cls._own_fields()}
        return cls(llm=loader(*args, **kwargs), **own)

    @classmethod
    def _own_fields(cls) -> set[str]:
        """Arguments of the chat class itself; the others are the LLM class's.

        LangChain's own settings (callbacks, cache, tags, ...) stay with the chat model,
        which runs the callbacks; the runtime's go to the LLM.
        """
        runtime = set(cls._llm_class.model_fields) - set(BaseLanguageModel.model_fields)
        return set(cls.model_fields) - runtime

    def __getattr__(self, name: str) -> Any:
        # The LLM's settings read as the chat model's (``chat.temperature``).
        try:
            return super().__getattr__(name)  # type: ignore[misc]
        except AttributeError:
            llm = self.__dict__.get("llm")
            if llm is not None and name in type(llm).model_fields:
                return getattr(llm, name)
            raise

    # --------------------------------------------------------------- identity
    @property
    def _llm_type(self) -> str:
        return f"chat-{self.llm._llm_type}"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {**self.llm._identifying_params, "chat_template": self.chat_template}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = self.llm._get_ls_params(stop=stop, **kwargs)
        params["ls_model_type"] = "chat"
        if isinstance(kwargs.get("model"), str):  # what a trace names, if a call says
            params["ls_model_name"] = kwargs["model"]
        return params

    def model_info(self) -> ModelInfo:
        """What the runtime knows of its model (architecture, chat template, ...)."""
        return self.llm.model_info()

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` in the model's own vocabulary."""
        return self.llm.get_token_ids(text)

    def close(self) -> None:
        """Free the model now (see the LLM class's ``close``)."""
        self.llm.close()

    def __enter__(self) -> LocalChatModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- prompts
    def _template(self) -> tuple[str, ModelInfo]:
        info = self.llm.model_info()
        template = self.chat_template or chat_format(info)
        if template is None:
            msg = (
                f"{info.model} carries no chat template and its family ({info.architecture}) "
                "has no built-in one: give chat_template= (a Jinja chat template)"
            )
            raise ValueError(msg)
        return template, info

    def _turn(self, messages: list[BaseMessage], kwargs: dict[str, Any]) -> _Turn:
        tools = [ToolSpec.of(t) for t in kwargs.pop("tools", None) or []]
        choice = kwargs.pop("tool_choice", None)
        if choice not in (None, "auto", "none") and not tools:
            msg = f"tool_choice={choice!r} needs tools: bind them with bind_tools(tools, ...)"
            raise ValueError(msg)
        mode, allowed = resolve_choice(tools, choice)
        if not tools:
            mode = "none"
        template, info = self._template()
        turns = [_as_dict(m, template) for m in messages]
        if mode != "none":
            preamble = tools_preamble(allowed, forced=mode == "forced")
            if turns and turns[0]["role"] == "system":
                turns[0] = {**turns[0], "content": f"{turns[0]['content']}\n\n{preamble}"}
            else:
                turns.insert(0, {"role": "system", "content": preamble})
            if "grammar" in kwargs:
                msg = "give tools or grammar, not both: the tools' grammar constrains the answer"
                raise ValueError(msg)
            if "grammar" in {*self.llm._call_fields, *self.llm._call_only}:
                kwargs["grammar"] = call_grammar(allowed, forced=mode == "forced")
        prompt = _render(template, turns, info)
        return _Turn(prompt=prompt, options=kwargs, tools=allowed, mode=mode)

    # ------------------------------------------------------------- generation
    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        turn = self._turn(messages, dict(kwargs))
        reader = _Reader(turn, self.llm._ls_model_name())
        for chunk in self.llm._stream(turn.prompt, stop=stop, **turn.options):
            yield from reader.feed(chunk.text, chunk.generation_info)
        yield from reader.end()

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        turn = self._turn(messages, dict(kwargs))
        reader = _Reader(turn, self.llm._ls_model_name())
        async for chunk in self.llm._astream(turn.prompt, stop=stop, **turn.options):
            for out in reader.feed(chunk.text, chunk.generation_info):
                yield out
        for out in reader.end():
            yield out

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        result = generate_from_stream(self._stream(messages, stop=stop, **kwargs))
        return _as_message(result)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        result = await agenerate_from_stream(self._astream(messages, stop=stop, **kwargs))
        return _as_message(result)

    # ------------------------------------------------------ tools and schemas
    def bind_tools(
        self,
        tools: Sequence[Any],
        *,
        tool_choice: str | dict[str, Any] | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Offer ``tools`` to the model.

        ``tool_choice`` is ``"auto"`` (default), ``"any"`` / ``"required"`` (a call is
        forced), ``"none"``, or a tool's name.

        Where the runtime takes grammars, a forced call is constrained to valid JSON
        that validates against the tool's schema, and ``"auto"`` allows either text or
        such a call.
        """
        specs = [ToolSpec.of(t) for t in tools]
        resolve_choice(specs, tool_choice)  # an unknown choice fails here
        return self.bind(tools=list(tools), tool_choice=tool_choice, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type | None = None,
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, Any]:
        """Answers parsed into ``schema`` (a pydantic model, a TypedDict or a JSON schema).

        ``json_schema`` constrains decoding by the schema's grammar; ``function_calling``
        forces a call of a tool made from the schema (its arguments are the answer);
        ``json_mode`` constrains to JSON, by the schema's grammar when one is given.
        Where the runtime takes grammars the answer always parses; ``strict`` is
        accepted for compatibility (the grammar is always strict).
        """
        if kwargs:
            msg = f"with_structured_output got unknown arguments: {', '.join(sorted(kwargs))}"
            raise TypeError(msg)
        if method not in ("json_schema", "function_calling", "json_mode"):
            msg = f"method must be json_schema, function_calling or json_mode, not {method!r}"
            raise ValueError(msg)
        if schema is None and method != "json_mode":
            msg = f"method={method!r} needs a schema"
            raise ValueError(msg)
        # What LangSmith and callbacks see (langchain-core reads and removes it).
        traced: dict[str, Any] = {"kwargs": {"method": method, "strict": strict}}
        if schema is not None:
            traced["schema"] = convert_to_openai_tool(schema)
        parser: Runnable[Any, Any]
        bound: Runnable[LanguageModelInput, Any]
        if method == "function_calling":
            spec = ToolSpec.of(schema)
            bound = self.bind_tools(
                [schema], tool_choice=spec.name, ls_structured_output_format=traced
            )
            parser = RunnableLambda(_first_call_args)
            if isinstance(schema, type) and is_basemodel_subclass(schema):
                parser = parser | RunnableLambda(schema.model_validate)  # type: ignore[attr-defined]
        else:
            grammar = (
                Grammar.builtin("json")
                if schema is None
                else Grammar.from_json_schema(_plain_schema(convert_to_json_schema(schema)))
            )
            bound = self.bind(grammar=grammar, ls_structured_output_format=traced)
            parser = _json_parser(schema)
        if not include_raw:
            return bound | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser).with_fallbacks(
            [RunnablePassthrough.assign(parsed=lambda _: None)], exception_key="parsing_error"
        )
        return RunnableMap(raw=bound) | parsed


# ------------------------------------------------------------------ messages
def _text(message: BaseMessage) -> str:
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
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            msg = f"this chat model reads text only; a {kind!r} content block cannot be sent"
            raise ValueError(msg)
    return "".join(parts)


_ROLES = {"system": "system", "human": "user", "ai": "assistant", "tool": "tool"}


def _as_dict(message: BaseMessage, template: str) -> dict[str, Any]:
    role = _ROLES.get(message.type) or ("user" if message.type == "chat" else None)
    if role is None:
        msg = f"cannot send a {message.type!r} message to a chat template"
        raise ValueError(msg)
    content = _text(message)
    if isinstance(message, AIMessage) and message.tool_calls:
        calls = "\n".join(render_call(c["name"], c["args"]) for c in message.tool_calls)
        content = f"{content}\n{calls}" if content else calls
    if isinstance(message, ToolMessage):
        if "tool" not in template:  # the template knows no tool role: a user turn
            name = message.name or "the tool"
            return {"role": "user", "content": f"Result of {name}: {content}"}
        return {"role": "tool", "content": content, "tool_call_id": message.tool_call_id}
    if isinstance(message, SystemMessage):
        return {"role": "system", "content": content}
    return {"role": role, "content": content}


def _render(template: str, turns: list[dict[str, Any]], info: ModelInfo) -> str:
    try:
        text = render_chat(template, turns, bos_token=info.bos_token, eos_token=info.eos_token)
    except ChatTemplateError:
        if not turns or turns[0]["role"] != "system":
            raise
        # Templates that refuse a system role (Gemma's own): say it in the first turn.
        system, rest = turns[0]["content"], turns[1:]
        if rest and rest[0]["role"] == "user":
            rest = [{**rest[0], "content": f"{system}\n\n{rest[0]['content']}"}, *rest[1:]]
        else:
            rest = [{"role": "user", "content": system}, *rest]
        text = render_chat(template, rest, bos_token=info.bos_token, eos_token=info.eos_token)
    if info.adds_bos and info.bos_token and text.startswith(info.bos_token):
        text = text[len(info.bos_token) :]  # the runtime adds it when tokenizing
    return text


# ------------------------------------------------------------------- answers
class _Reader:
    """Turns the LLM's text pieces into message chunks: text, or one tool call."""

    def __init__(self, turn: _Turn, model_name: str) -> None:
        self.turn = turn
        self.model_name = model_name
        self.buffer = ""
        self.calling: bool | None = None if turn.mode == "auto" else turn.mode == "forced"
        self.info: dict[str, Any] = {}

    def feed(self, text: str, info: dict[str, Any] | None) -> Iterator[ChatGenerationChunk]:
        if info:
            self.info.update(info)
        if not text:
            return
        if self.calling is None:  # auto: a call starts with "{"
            self.buffer += text
            head = self.buffer.lstrip()
            if not head:
                return
            self.calling = head.startswith("{")
            if not self.calling:
                text, self.buffer = self.buffer, ""
                yield ChatGenerationChunk(message=AIMessageChunk(content=text))
            return
        if self.calling:
            self.buffer += text
            return
        yield ChatGenerationChunk(message=AIMessageChunk(content=text))

    def end(self) -> Iterator[ChatGenerationChunk]:
        usage = _usage(self.info)
        metadata = {"model_name": self.model_name, "finish_reason": self.info.get("finish_reason")}
        chunks: list[Any] = []
        content = ""
        if self.calling or (self.calling is None and self.buffer.strip()):
            try:
                call = parse_call(self.buffer, self.turn.tools, forced=self.turn.mode == "forced")
            except ToolCallError as e:
                if self.info.get("finish_reason") == "length":
                    msg = f"{e}. The answer ended at the token limit: raise max_tokens"
                    raise ToolCallError(msg) from e
                raise
            if call is None:
                content = self.buffer
            else:
                args = json.dumps(call["args"], ensure_ascii=False)
                chunks = [tool_call_chunk(name=call["name"], args=args, id=call["id"], index=0)]
                metadata["finish_reason"] = "tool_calls"
        elif self.buffer:
            content = self.buffer
        message = AIMessageChunk(
            content=content,
            tool_call_chunks=chunks,
            usage_metadata=usage,
            response_metadata=metadata,
            chunk_position="last",
        )
        yield ChatGenerationChunk(message=message, generation_info=dict(self.info))


def _usage(info: dict[str, Any]) -> UsageMetadata | None:
    prompt, completion = info.get("prompt_tokens"), info.get("completion_tokens")
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return UsageMetadata(
        input_tokens=prompt, output_tokens=completion, total_tokens=prompt + completion
    )


def _as_message(result: ChatResult) -> ChatResult:
    """A streamed-then-joined answer as a plain ``AIMessage`` (what ``invoke`` returns)."""
    gens = []
    for gen in result.generations:
        m = gen.message
        message = AIMessage(
            content=m.content,
            tool_calls=getattr(m, "tool_calls", []),
            usage_metadata=getattr(m, "usage_metadata", None),
            response_metadata=m.response_metadata,
            id=m.id,
        )
        gens.append(ChatGeneration(message=message, generation_info=gen.generation_info))
    return ChatResult(generations=gens, llm_output=result.llm_output)


def _json_parser(schema: Any) -> Runnable[Any, Any]:
    """The answer's JSON, validated into ``schema`` when it is a pydantic model."""
    if isinstance(schema, type) and is_basemodel_subclass(schema):
        return PydanticOutputParser(pydantic_object=schema)
    return JsonOutputParser()


def _first_call_args(message: AIMessage) -> dict[str, Any]:
    if not message.tool_calls:
        msg = f"the model made no tool call: {message.content!r:.200}"
        raise ToolCallError(msg)
    return dict(message.tool_calls[0]["args"])


def _plain_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON schema without the keys llama.cpp's converter does not need."""
    return {k: v for k, v in schema.items() if k not in ("title", "description")}
