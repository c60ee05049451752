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

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from operator import itemgetter
from typing import Any, ClassVar, Literal, cast

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
)
from langchain_core.exceptions import OutputParserException
from langchain_core.globals import get_llm_cache
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
from langchain_core.outputs import (
    ChatGeneration,
    ChatGenerationChunk,
    ChatResult,
    Generation,
    LLMResult,
)
from langchain_core.runnables import (
    Runnable,
    RunnableConfig,
    RunnableLambda,
    RunnableMap,
    RunnablePassthrough,
)
from langchain_core.runnables.config import get_config_list
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import ConfigDict, PrivateAttr, model_validator

from langchain_localllms._base import UNTIL, LocalLLM
from langchain_localllms._native import run_in_thread
from langchain_localllms.chat_models._tools import (
    PLAIN,
    CallSyntax,
    ToolCallError,
    ToolSpec,
    call_grammar,
    call_prefix,
    object_prefix,
    parse_call,
    render_call,
    resolve_choice,
    tools_preamble,
)
from langchain_localllms.errors import SchemaValidationError
from langchain_localllms.grammars import Grammar
from langchain_localllms.grammars.schemas import load, named, prepare
from langchain_localllms.prompts import ChatTemplateError, ModelInfo, chat_format, render_chat

__all__ = ["LocalChatModel"]

#: The batched ``generate``/``agenerate`` in progress (see ``LocalChatModel.batch``).
_BATCH: ContextVar[_Batch | None] = ContextVar("localllms_chat_batch", default=None)


@dataclass
class _Turn:
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


class LocalChatModel(BaseChatModel):
    """Base class of the chat models of this package (not used directly)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, protected_namespaces=())

    llm: LocalLLM
    """The LLM instance that runs the model (built from this class's other arguments)."""
    chat_template: str | None = None
    """A Jinja chat template to use instead of the model's own (rendered in a sandbox)."""
    reasoning: bool | None = None
    """Whether a reasoning model thinks before it answers. None: as its template does
    by default. True / False: the template's thinking switch (``enable_thinking``)
    turned on or off; False on a template that always thinks closes the thought
    before it starts. Thinking text never lands in ``content``: it goes to
    ``additional_kwargs["reasoning_content"]`` (a reasoning block in
    ``content_blocks``)."""

    streaming: bool = False
    """Whether ``invoke`` streams too, sending each token to the callbacks'
    ``on_llm_new_token`` (``stream()`` always streams)."""

    _template_cache: tuple[str | None, str, ModelInfo] | None = PrivateAttr(default=None)

    #: The runtime's LLM class.
    _llm_class: ClassVar[type[LocalLLM]]

    @model_validator(mode="before")
    @classmethod
    def _build_llm(cls, values: Any) -> Any:
        """Arguments that are not the chat class's own build its LLM (``llm``)."""
        if not isinstance(values, dict) or "llm" in values:
            return values
        values = _standard_names(cls._llm_class, values)
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
        """The chat template and what it needs of the model, read once per instance."""
        cached = self._template_cache
        if cached is not None and cached[0] == self.chat_template:  # a copy may change it
            return cached[1], cached[2]
        info = self.llm.model_info()
        template = self.chat_template or chat_format(info)
        if template is None:
            msg = (
                f"{info.model} carries no chat template and its family ({info.architecture}) "
                "has no built-in one: give chat_template= (a Jinja chat template)"
            )
            raise ValueError(msg)
        self._template_cache = (self.chat_template, template, info)
        return template, info

    @property
    def _constrains(self) -> bool:
        """Whether the runtime constrains decoding with grammars."""
        return "grammar" in {*self.llm._call_fields, *self.llm._call_only}

    def _turn(self, messages: list[BaseMessage], kwargs: dict[str, Any]) -> _Turn:
        tools = [ToolSpec.of(t) for t in kwargs.pop("tools", None) or []]
        choice = kwargs.pop("tool_choice", None)
        answer_format = kwargs.pop("response_format", None)
        strict = kwargs.pop("strict", None)
        if choice not in (None, "auto", "none") and not tools:
            msg = f"tool_choice={choice!r} needs tools: bind them with bind_tools(tools, ...)"
            raise ValueError(msg)
        mode, allowed = resolve_choice(tools, choice)
        if not tools:
            mode = "none"
        if "grammar" in kwargs and (mode != "none" or answer_format is not None):
            msg = "give tools or grammar, not both: the tools' grammar constrains the answer"
            raise ValueError(msg)
        template, info = self._template()
        syntax = CallSyntax.of(template)
        turns = [_as_dict(m, template, syntax) for m in messages]
        prefix, json_only = "", False
        answer_schema: dict[str, Any] | None = None
        instruction = None
        forced: list[ToolSpec] = []
        extra = self._thinking_switch(template)
        if mode != "none":
            if syntax.native:  # the template offers them in its own words
                extra["tools"] = [t.openai() for t in allowed]
            else:
                instruction = tools_preamble(allowed, forced=mode == "forced")
            if self._constrains:
                bare = mode == "forced" and not syntax.open  # a JSON-schema grammar
                kwargs["grammar"] = call_grammar(
                    self._enforceable(allowed, strict, bare_call=bare),
                    forced=mode == "forced",
                    syntax=syntax,
                    strict=strict is not False,
                )
            elif mode == "forced":  # write the call's opening: the model goes on from it
                forced = allowed
                json_only = True
        elif answer_format is not None:
            schema = answer_format.get("schema")
            if self._constrains:
                constraint = answer_format.get("constraint") or schema
                kwargs["grammar"] = (
                    Grammar.builtin("json")
                    if constraint is None
                    else Grammar.from_json_schema(
                        constraint, strict=answer_format.get("strict") is not False
                    )
                )
            else:
                instruction = _json_instruction(schema)
                prefix, json_only = object_prefix(schema), True
                answer_schema = schema
        if instruction is not None:
            if turns and turns[0]["role"] == "system":
                turns[0] = {**turns[0], "content": f"{turns[0]['content']}\n\n{instruction}"}
            else:
                turns.insert(0, {"role": "system", "content": instruction})
        prompt = _render(template, turns, info, extra)
        if forced:
            prefix = syntax.open + call_prefix(self._chosen(prompt + syntax.open, forced))
        opened = prompt.rstrip().endswith(THINK[0])  # the template opened the thought
        thinking = opened
        if (
            self.reasoning is False
            and _opens_thought(template)
            and "enable_thinking" not in template
        ):
            # A template that always thinks: close the thought before it starts.
            head = prompt.rstrip()[: -len(THINK[0])] if opened else prompt
            prompt = f"{head}{THINK[0]}\n\n{THINK[1]}\n\n"
            thinking = False
        return _Turn(
            prompt=prompt + prefix,
            options=kwargs,
            tools=allowed,
            mode=mode,
            syntax=syntax,
            prefix=prefix,
            json_only=json_only,
            schema=answer_schema,
            thinking=thinking,
        )

    def _schema_engine(self, *, tools: bool = False, bare_call: bool = False) -> str | None:
        """The engine that enforces this runtime's schemas (None: it does not constrain).

        ``tools``: of tool calls, which may differ (ChatLlamafile writes their grammar on
        the client), unless ``bare_call``: the answer is one forced call and nothing
        else, which goes to the schema engine as a JSON schema.
        """
        if not self._constrains:
            return None
        engine: str | None = self.llm._schema_engine
        if tools and not bare_call:
            return self.llm._tool_schema_engine or engine
        return engine

    def _enforceable(
        self, tools: list[ToolSpec], strict: bool | None, *, bare_call: bool
    ) -> list[ToolSpec]:
        """``tools`` as the engine enforces them: refused, or relaxed (``strict=False``)."""
        engine = self._schema_engine(tools=True, bare_call=bare_call)
        if engine is None:
            return tools
        relaxed = [
            prepare(t.parameters, engine, strict=strict, warn=False) for t in tools
        ]  # SchemaNotSupported where strict
        return [replace(t, parameters=p) for t, p in zip(tools, relaxed, strict=True)]

    def _chosen(self, prompt: str, tools: list[ToolSpec]) -> list[ToolSpec]:
        """Of several tools a call must be of, the one the model scores likeliest.

        Where the runtime cannot score, all of them: the model writes the name.
        """
        if len(tools) < 2:
            return tools
        opening = call_prefix(tools)  # '{"name": "'
        names = [f'{opening}{t.name}"' for t in tools]
        choice = self.llm._choose(prompt, names)
        return tools if choice is None else [tools[choice]]

    def _thinking_switch(self, template: str) -> dict[str, Any]:
        """What the template is told of thinking (``enable_thinking``), if anything."""
        if self.reasoning is None:
            return {}
        if "enable_thinking" in template:
            return {"enable_thinking": self.reasoning}
        if self.reasoning and not _opens_thought(template):
            msg = (
                "reasoning=True: this model's chat template has no thinking switch "
                "(enable_thinking) and no <think> block, so it cannot be told to think"
            )
            raise ValueError(msg)
        return {}

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
        yield from reader.start()
        pieces = self.llm._stream(turn.prompt, stop=stop, **reader.options())
        try:
            for chunk in pieces:
                yield from reader.feed(chunk.text, chunk.generation_info)
        finally:
            pieces.close()  # type: ignore[attr-defined]
        yield from reader.end()

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        # Off the event loop: the template may be asked of a server, a choice scored.
        turn = await run_in_thread(lambda: self._turn(messages, dict(kwargs)))
        reader = _Reader(turn, self.llm._ls_model_name())
        for out in reader.start():
            yield out
        pieces = self.llm._astream(turn.prompt, stop=stop, **reader.options())
        try:
            async for chunk in pieces:
                for out in reader.feed(chunk.text, chunk.generation_info):
                    yield out
        finally:
            await pieces.aclose()  # type: ignore[attr-defined]
        for out in reader.end():
            yield out

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        batch = _BATCH.get()
        if batch is not None and batch.owner is self:
            result = batch.take(messages, lambda: batch.run(self._batch_results))
            if result is not None:
                return result
        result = generate_from_stream(self._stream(messages, stop=stop, **kwargs))
        return _as_message(result)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        batch = _BATCH.get()
        if batch is not None and batch.owner is self:
            result = await batch.atake(messages, self._abatch_results)
            if result is not None:
                return result
        result = await agenerate_from_stream(self._astream(messages, stop=stop, **kwargs))
        return _as_message(result)

    # ---------------------------------------------------------------- batches
    # LangChain runs a chat model's batch one conversation at a time (``generate``
    # loops, ``agenerate`` gathers). Here the whole batch goes to the LLM at once, as
    # its own batch does (natively batched, or concurrent requests to a server): the
    # first conversation's ``_generate`` runs them all, the others take their answers.
    # Callbacks and runs stay LangChain's, one per conversation.
    def batch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[AIMessage]:
        """Answer every input; the LLM runs them as one batch where it can."""
        configs = self._one_config(inputs, config, return_exceptions)
        if configs is None:
            return super().batch(inputs, config, return_exceptions=return_exceptions, **kwargs)
        conversations = [self._convert_input(i).to_messages() for i in inputs]
        result = self.generate(conversations, **_run_options(configs), **kwargs)
        return [cast("AIMessage", cast("ChatGeneration", g[0]).message) for g in result.generations]

    async def abatch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[AIMessage]:
        """Answer every input; the LLM runs them as one batch where it can."""
        configs = self._one_config(inputs, config, return_exceptions)
        if configs is None:
            return await super().abatch(
                inputs, config, return_exceptions=return_exceptions, **kwargs
            )
        conversations = [self._convert_input(i).to_messages() for i in inputs]
        result = await self.agenerate(conversations, **_run_options(configs), **kwargs)
        return [cast("AIMessage", cast("ChatGeneration", g[0]).message) for g in result.generations]

    def _one_config(
        self, inputs: list[Any], config: Any, return_exceptions: bool
    ) -> RunnableConfig | None:
        """The batch's one config, or None when it must run input by input."""
        if len(inputs) < 2 or return_exceptions:  # failures per input: LangChain's way
            return None
        configs = get_config_list(config, len(inputs))
        first = configs[0]
        same = all(
            c.get("callbacks") == first.get("callbacks")
            and c.get("tags") == first.get("tags")
            and c.get("metadata") == first.get("metadata")
            and c.get("run_name") == first.get("run_name")
            and c.get("run_id") is None
            for c in configs
        )
        return first if same else None

    def generate(self, messages: list[list[BaseMessage]], *args: Any, **kwargs: Any) -> LLMResult:
        if not self._batched(messages):
            return super().generate(messages, *args, **kwargs)
        token = _BATCH.set(_Batch(self, messages, args, kwargs))
        try:
            return super().generate(messages, *args, **kwargs)
        finally:
            _BATCH.reset(token)

    async def agenerate(
        self, messages: list[list[BaseMessage]], *args: Any, **kwargs: Any
    ) -> LLMResult:
        if not self._batched(messages):
            return await super().agenerate(messages, *args, **kwargs)
        token = _BATCH.set(_Batch(self, messages, args, kwargs))
        try:
            return await super().agenerate(messages, *args, **kwargs)
        finally:
            _BATCH.reset(token)

    def _batched(self, messages: list[list[BaseMessage]]) -> bool:
        """Whether a ``generate`` of these conversations goes to the LLM as one batch.

        Not when a cache is asked first: a hit would leave its batched answer unused.
        """
        if len(messages) < 2:
            return False
        return self.cache is False or (self.cache is None and get_llm_cache() is None)

    def _batch_turns(self, batch: _Batch) -> tuple[list[_Turn], list[str] | None]:
        stop, options = batch.call_options()
        return [self._turn(m, dict(options)) for m in batch.messages], stop

    def _batch_results(self, batch: _Batch) -> list[ChatResult | Exception]:
        turns, stop = self._batch_turns(batch)
        rows = self.llm._outcomes([t.prompt for t in turns], stop, [None] * len(turns),
                                  **turns[0].options)  # fmt: skip
        return [self._answer(t, row) for t, row in zip(turns, rows, strict=True)]

    async def _abatch_results(self, batch: _Batch) -> list[ChatResult | Exception]:
        turns, stop = self._batch_turns(batch)
        rows = await self.llm._aoutcomes([t.prompt for t in turns], stop, [None] * len(turns),
                                         **turns[0].options)  # fmt: skip
        return [self._answer(t, row) for t, row in zip(turns, rows, strict=True)]

    def _answer(self, turn: _Turn, row: Generation | Exception) -> ChatResult | Exception:
        """One conversation's answer from its LLM generation, as a stream would read."""
        if isinstance(row, Exception):
            return row
        reader = _Reader(turn, self.llm._ls_model_name())
        try:
            chunks = [*reader.start(), *reader.feed(row.text, row.generation_info), *reader.end()]
        except Exception as e:
            return e
        return _as_message(generate_from_stream(iter(chunks)))

    # ------------------------------------------------------ tools and schemas
    def bind_tools(
        self,
        tools: Sequence[Any],
        *,
        tool_choice: str | dict[str, Any] | bool | None = None,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Offer ``tools`` to the model.

        ``tool_choice`` is ``"auto"`` (default), ``"any"`` / ``"required"`` (a call is
        forced), ``"none"``, or a tool's name.

        Where the runtime takes grammars, a forced call is constrained to valid JSON
        that validates against the tool's schema, and ``"auto"`` allows either text or
        such a call. A tool argument's schema keyword the runtime cannot enforce raises
        ``SchemaNotSupported`` here, unless ``strict=False`` (then it is relaxed with a
        warning); a call is validated against the whole schema either way.
        """
        specs = [ToolSpec.of(t) for t in tools]
        mode, _ = resolve_choice(specs, tool_choice)  # an unknown choice fails here
        # A forced call is checked as one without tags (the template, read at the call,
        # decides; a call in tags is checked again then).
        engine = self._schema_engine(tools=True, bare_call=mode == "forced")
        for spec in specs:
            prepare(spec.parameters, engine, strict=strict)
        if strict is not None:
            kwargs["strict"] = strict
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
        A JSON schema needs no ``title`` and may have any root (an object, an array, a
        number, an enum); ``function_calling`` needs an object schema with a name, as
        a tool does.

        Where the runtime takes grammars, a schema keyword it cannot enforce raises
        ``SchemaNotSupported`` here, naming the keyword and its JSON pointer; with
        ``strict=False`` it is relaxed with a warning instead. Where it does not
        (CTranslate2, GPT4All), the prompt asks for the schema and the answer starts
        as a JSON object. Every answer is validated against the whole schema (formats
        checked): one that does not validate is an ``OutputParserException`` carrying
        the raw text (``include_raw=True`` puts it in ``parsing_error``).
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
            traced["schema"] = convert_to_openai_tool(
                named(schema) if isinstance(schema, dict) else schema
            )
        parser: Runnable[Any, Any]
        bound: Runnable[LanguageModelInput, Any]
        if method == "function_calling":
            spec = ToolSpec.of(schema)
            bound = self.bind_tools(
                [schema], tool_choice=spec.name, strict=strict, ls_structured_output_format=traced
            )
            parser = RunnableLambda(_first_call_args)
            if isinstance(schema, type) and is_basemodel_subclass(schema):
                parser = parser | RunnableLambda(schema.model_validate)  # type: ignore[attr-defined]
        else:
            json_schema = None
            if schema is not None:
                json_schema = schema if isinstance(schema, dict) else convert_to_json_schema(schema)
            answer = {
                "schema": json_schema,
                "constraint": None
                if json_schema is None
                else prepare(json_schema, self._schema_engine(), strict=strict),
                "strict": strict,
            }
            bound = self.bind(response_format=answer, ls_structured_output_format=traced)
            parser = _json_parser(schema, json_schema)
        if not include_raw:
            return bound | parser
        parsed = RunnablePassthrough.assign(
            parsed=itemgetter("raw") | parser, parsing_error=lambda _: None
        ).with_fallbacks(
            [RunnablePassthrough.assign(parsed=lambda _: None)], exception_key="parsing_error"
        )
        return RunnableMap(raw=bound) | parsed


def _standard_names(llm_class: type[LocalLLM], values: dict[str, Any]) -> dict[str, Any]:
    """LangChain's standard ``max_tokens`` / ``temperature`` in the runtime's own names.

    (``max_length`` / ``sampling_temperature`` on CTranslate2, ``temp`` on GPT4All.)
    """
    values = dict(values)
    for standard, own in (
        ("max_tokens", llm_class._max_tokens_field),
        ("temperature", llm_class._temperature_field),
    ):
        if standard in values and standard not in llm_class.model_fields and own:
            if own in values:
                msg = f"give {standard} or {own} (the same setting), not both"
                raise ValueError(msg)
            values[own] = values.pop(standard)
    return values


# ------------------------------------------------------------------ batches
class _Batch:
    """The conversations of one ``generate``, answered by one LLM batch."""

    def __init__(
        self,
        owner: LocalChatModel,
        messages: list[list[BaseMessage]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        self.owner = owner
        self.messages = messages
        self.args, self.kwargs = args, kwargs
        self.results: list[tuple[list[BaseMessage], ChatResult | Exception]] | None = None
        self.running: asyncio.Future[None] | None = None

    def call_options(self) -> tuple[list[str] | None, dict[str, Any]]:
        """The stop sequences and model options of the ``generate`` call."""
        stop = self.args[0] if self.args else self.kwargs.get("stop")
        skip = {"stop", "callbacks", "tags", "metadata", "run_name", "run_id",
                "ls_structured_output_format", "structured_output_format"}  # fmt: skip
        return stop, {k: v for k, v in self.kwargs.items() if k not in skip}

    def run(self, answer: Callable[[_Batch], list[ChatResult | Exception]]) -> None:
        if self.results is None:
            self.results = list(zip(self.messages, answer(self), strict=True))

    def take(self, messages: list[BaseMessage], run: Callable[[], None]) -> ChatResult | None:
        """This conversation's answer (running the batch first), or None if not in it."""
        run()
        assert self.results is not None
        for i, (asked, result) in enumerate(self.results):
            if asked == messages or _normalized(asked) == messages:
                del self.results[i]
                if isinstance(result, Exception):
                    raise result
                return result
        return None

    async def atake(
        self,
        messages: list[BaseMessage],
        answer: Callable[[_Batch], Awaitable[list[ChatResult | Exception]]],
    ) -> ChatResult | None:
        if self.running is None:  # the first conversation runs the batch
            self.running = asyncio.get_running_loop().create_future()
            try:
                self.results = list(zip(self.messages, await answer(self), strict=True))
            except BaseException as e:
                self.running.set_exception(e)
                raise
            self.running.set_result(None)
        else:
            await asyncio.shield(self.running)
        return self.take(messages, lambda: None)


def _normalized(messages: list[BaseMessage]) -> list[BaseMessage]:
    try:  # what LangChain hands ``_generate``: v1 content blocks in older formats
        from langchain_core.language_models._utils import _normalize_messages
    except ImportError:
        return messages
    return list(_normalize_messages(messages))


def _run_options(config: RunnableConfig) -> dict[str, Any]:
    return {k: config.get(k) for k in ("callbacks", "tags", "metadata", "run_name")}


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


def _as_dict(message: BaseMessage, template: str, syntax: CallSyntax) -> dict[str, Any]:
    role = _ROLES.get(message.type) or ("user" if message.type == "chat" else None)
    if role is None:
        msg = f"cannot send a {message.type!r} message to a chat template"
        raise ValueError(msg)
    content = _text(message)
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


def _render(
    template: str, turns: list[dict[str, Any]], info: ModelInfo, extra: dict[str, Any]
) -> str:
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


# ------------------------------------------------------------------- answers
#: The tags reasoning models wrap their thinking in.
THINK = ("<think>", "</think>")


def _opens_thought(template: str) -> bool:
    return THINK[0] in template


class _Thoughts:
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
                keep = _partial_tail(text, THINK[1])
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


def _partial_tail(text: str, tag: str) -> int:
    """How many of ``text``'s last characters could begin ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class _Reader:
    """Turns the LLM's text pieces into message chunks: text, or one tool call.

    Reasoning (``<think>...</think>``) goes to ``reasoning_content``, never to the text.
    """

    def __init__(self, turn: _Turn, model_name: str) -> None:
        self.turn = turn
        self.model_name = model_name
        self.buffer = ""
        self.calling: bool | None = None if turn.mode == "auto" else turn.mode == "forced"
        self.info: dict[str, Any] = {}
        self.thoughts = _Thoughts(inside=turn.thinking)
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
                yield _reasoning_chunk(part)
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
                yield _reasoning_chunk(part)
            else:
                yield from self._answer(part)
        if self.done:
            self.info["finish_reason"] = "stop"  # the value ended; decoding was stopped
        usage = _usage(self.info)
        metadata = {"model_name": self.model_name, "finish_reason": self.info.get("finish_reason")}
        chunks: list[Any] = []
        content = ""
        if self.calling or (self.calling is None and self.buffer.strip()):
            try:
                call = parse_call(
                    self.buffer,
                    self.turn.tools,
                    forced=self.turn.mode == "forced",
                    syntax=self.turn.syntax,
                )
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


def _reasoning_chunk(text: str) -> ChatGenerationChunk:
    return ChatGenerationChunk(
        message=AIMessageChunk(content="", additional_kwargs={"reasoning_content": text})
    )


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
            additional_kwargs=m.additional_kwargs,
            tool_calls=getattr(m, "tool_calls", []),
            usage_metadata=getattr(m, "usage_metadata", None),
            response_metadata=m.response_metadata,
            id=m.id,
        )
        gens.append(ChatGeneration(message=message, generation_info=gen.generation_info))
    return ChatResult(generations=gens, llm_output=result.llm_output)


def _json_parser(schema: Any, json_schema: dict[str, Any] | None) -> Runnable[Any, Any]:
    """The answer's JSON: a pydantic model's instance, or validated against the schema.

    Partial JSON is parsed while streaming; the whole answer must be complete JSON (an
    answer cut at the token limit is an error, not a shorter object).
    """
    if isinstance(schema, type) and is_basemodel_subclass(schema):
        return _ValidatedPydantic(pydantic_object=schema)
    return _ValidatedJson(answer_schema=json_schema)


def _whole_json(result: list[Any], schema: dict[str, Any] | None = None) -> Any:
    """The whole answer's JSON (validated against ``schema``): OutputParserException."""
    raw = result[0].text
    try:
        return load(raw, schema)
    except SchemaValidationError as e:
        raise OutputParserException(str(e), llm_output=raw) from e


class _ValidatedJson(JsonOutputParser):
    """JSON whose whole answer must validate against a schema (where one is given)."""

    answer_schema: dict[str, Any] | None = None

    def parse_result(self, result: list[Any], *, partial: bool = False) -> Any:
        if partial:
            return super().parse_result(result, partial=True)
        return _whole_json(result, self.answer_schema)


class _ValidatedPydantic(PydanticOutputParser):  # type: ignore[type-arg]
    """A pydantic model's instance from the whole answer, which must be complete JSON."""

    def parse_result(self, result: list[Any], *, partial: bool = False) -> Any:
        if partial:
            return super().parse_result(result, partial=True)
        return self._parse_obj(
            _whole_json(result)
        )  # pydantic v2 or v1; a typed OutputParserException


def _first_call_args(message: AIMessage) -> dict[str, Any]:
    if not message.tool_calls:
        msg = f"the model made no tool call: {message.content!r:.200}"
        raise ToolCallError(msg)
    return dict(message.tool_calls[0]["args"])


def _json_instruction(schema: dict[str, Any] | None) -> str:
    """What asks a model that no grammar constrains for a JSON answer."""
    if schema is None:
        return "Answer with a JSON object and nothing else."
    props = schema.get("properties")
    if isinstance(props, dict) and props and all(isinstance(p, dict) for p in props.values()):
        fields = "\n".join(
            f"- {name} ({spec.get('type', 'any')})"
            + (f": {spec['description']}" if spec.get("description") else "")
            for name, spec in props.items()
        )
        return f"Answer with a JSON object with these fields, and nothing else:\n{fields}"
    return (
        "Answer with a JSON value that validates against this JSON schema, and "
        f"nothing else:\n{json.dumps(_plain_schema(schema))}"
    )


def _plain_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON schema without the keys llama.cpp's converter does not need."""
    return {k: v for k, v in schema.items() if k not in ("title", "description")}
