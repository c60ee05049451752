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

from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import replace
from operator import itemgetter
from typing import Any, ClassVar, Literal

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseLanguageModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.language_models.chat_models import (
    agenerate_from_stream,
    generate_from_stream,
)
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
)
from langchain_core.outputs import (
    ChatGenerationChunk,
    ChatResult,
)
from langchain_core.runnables import (
    Runnable,
    RunnableLambda,
    RunnableMap,
    RunnablePassthrough,
)
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import ConfigDict, PrivateAttr, model_validator

from langchain_localllms.chat_models._answers import (
    THINK,
    AnswerReader,
    ChatTurn,
    as_message,
    opens_thought,
)
from langchain_localllms.chat_models._batching import BATCH, BatchedChat
from langchain_localllms.chat_models._messages import add_system, render_turns, template_turn
from langchain_localllms.chat_models._structured import (
    first_call_args,
    json_instruction,
    json_parser,
)
from langchain_localllms.chat_models._tools import (
    CallSyntax,
    ToolSpec,
    call_grammar,
    call_mode,
    call_prefix,
    object_prefix,
    resolve_choice,
    tools_preamble,
)
from langchain_localllms.core.threads import run_in_thread
from langchain_localllms.grammars import Grammar
from langchain_localllms.grammars.schemas import named, prepare
from langchain_localllms.llms._base import LocalLLM, standard_names
from langchain_localllms.prompts import ModelInfo, chat_format

__all__ = ["LocalChatModel"]


class LocalChatModel(BatchedChat):
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
        values = standard_names(cls._llm_class, values)
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
        return "grammar" in {*self.llm.call_fields, *self.llm.call_only}

    def prepare(self, messages: list[BaseMessage], **options: Any) -> ChatTurn:
        """What a call with these messages and options would send the LLM.

        The rendered prompt, the LLM's options (a grammar among them) and how its answer
        is read.

        Nothing is generated; use it to see the prompt the model's template makes.
        """
        return self._turn(messages, options)

    def _turn(self, messages: list[BaseMessage], kwargs: dict[str, Any]) -> ChatTurn:
        """One call's prompt and options, and how to read its answer."""
        kwargs = standard_names(type(self.llm), kwargs)  # max_tokens per call, too
        tools = [ToolSpec.of(t) for t in kwargs.pop("tools", None) or []]
        choice = kwargs.pop("tool_choice", None)
        answer_format = kwargs.pop("response_format", None)
        strict = kwargs.pop("strict", None)
        mode, allowed = call_mode(tools, choice)
        if "grammar" in kwargs and (mode != "none" or answer_format is not None):
            msg = "give tools or grammar, not both: the tools' grammar constrains the answer"
            raise ValueError(msg)
        template, info = self._template()
        syntax = CallSyntax.of(template)
        turn = ChatTurn(prompt="", options=kwargs, tools=allowed, mode=mode, syntax=syntax)
        extra = self._thinking_switch(template)
        instruction = None
        if mode != "none":
            instruction = self._offer_tools(turn, strict, extra)
        elif answer_format is not None:
            instruction = self._ask_json(turn, answer_format)
        turns = [template_turn(m, template, syntax) for m in messages]
        if instruction is not None:
            add_system(turns, instruction)
        prompt = render_turns(template, turns, info, extra)
        if mode == "forced" and turn.json_only:  # no grammar: write the call's opening
            turn.prefix = syntax.open + call_prefix(self._chosen(prompt + syntax.open, allowed))
        prompt, turn.thinking = self._thought(template, prompt)
        turn.prompt = prompt + turn.prefix
        return turn

    def _offer_tools(
        self, turn: ChatTurn, strict: bool | None, extra: dict[str, Any]
    ) -> str | None:
        """Offer the turn's tools and constrain its answer to a call where the runtime can.

        Returns the instruction that offers them, where the template cannot.
        """
        forced = turn.mode == "forced"
        instruction = None
        if turn.syntax.native:  # the template offers them in its own words
            extra["tools"] = [t.openai() for t in turn.tools]
        else:
            instruction = tools_preamble(turn.tools, forced=forced)
        if self._constrains:
            bare = forced and not turn.syntax.open  # a JSON-schema grammar
            turn.options["grammar"] = call_grammar(
                self._enforceable(turn.tools, strict, bare_call=bare),
                forced=forced,
                syntax=turn.syntax,
                strict=strict is not False,
            )
        elif forced:  # the call's opening is written: the model goes on from it
            turn.json_only = True
        return instruction

    def _ask_json(self, turn: ChatTurn, answer_format: dict[str, Any]) -> str | None:
        """Constrain the answer to the structured-output schema, or ask for it.

        Where the runtime cannot constrain, returns the instruction that asks for the
        schema, and the answer starts as its object.
        """
        schema = answer_format.get("schema")
        if self._constrains:
            constraint = answer_format.get("constraint") or schema
            turn.options["grammar"] = (
                Grammar.builtin("json")
                if constraint is None
                else Grammar.from_json_schema(
                    constraint, strict=answer_format.get("strict") is not False
                )
            )
            return None
        turn.prefix, turn.json_only, turn.schema = object_prefix(schema), True, schema
        return json_instruction(schema)

    def _thought(self, template: str, prompt: str) -> tuple[str, bool]:
        """The prompt, and whether the answer starts inside a thought (``<think>``)."""
        opened = prompt.rstrip().endswith(THINK[0])  # the template opened the thought
        if (
            self.reasoning is False
            and opens_thought(template)
            and "enable_thinking" not in template
        ):
            # A template that always thinks: close the thought before it starts.
            head = prompt.rstrip()[: -len(THINK[0])] if opened else prompt
            return f"{head}{THINK[0]}\n\n{THINK[1]}\n\n", False
        return prompt, opened

    def _constraint_engine(self, *, tools: bool = False, bare_call: bool = False) -> str | None:
        """The engine that enforces this runtime's schemas (None: it does not constrain).

        ``tools``: of tool calls, which may differ (ChatLlamafile writes their grammar on
        the client), unless ``bare_call``: the answer is one forced call and nothing
        else, which goes to the schema engine as a JSON schema.
        """
        if not self._constrains:
            return None
        engine: str | None = self.llm.schema_engine
        if tools and not bare_call:
            return self.llm.tool_schema_engine or engine
        return engine

    def _enforceable(
        self, tools: list[ToolSpec], strict: bool | None, *, bare_call: bool
    ) -> list[ToolSpec]:
        """``tools`` as the engine enforces them: refused, or relaxed (``strict=False``)."""
        engine = self._constraint_engine(tools=True, bare_call=bare_call)
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
        choice = self.llm.choose(prompt, names)
        return tools if choice is None else [tools[choice]]

    def _thinking_switch(self, template: str) -> dict[str, Any]:
        """What the template is told of thinking (``enable_thinking``), if anything."""
        if self.reasoning is None:
            return {}
        if "enable_thinking" in template:
            return {"enable_thinking": self.reasoning}
        if self.reasoning and not opens_thought(template):
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
        reader = AnswerReader(turn, self.llm.ls_model_name())
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
        reader = AnswerReader(turn, self.llm.ls_model_name())
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
        batch = BATCH.get()
        if batch is not None and batch.owner is self:
            result = batch.take(messages, lambda: batch.run(self._batch_results))
            if result is not None:
                return result
        result = generate_from_stream(self._stream(messages, stop=stop, **kwargs))
        return as_message(result)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        batch = BATCH.get()
        if batch is not None and batch.owner is self:
            result = await batch.atake(messages, self._abatch_results)
            if result is not None:
                return result
        result = await agenerate_from_stream(self._astream(messages, stop=stop, **kwargs))
        return as_message(result)

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
        engine = self._constraint_engine(tools=True, bare_call=mode == "forced")
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
        if method == "function_calling":
            bound, parser = self._forced_call(schema, strict, traced)
        else:
            bound, parser = self._json_answer(schema, strict, traced)
        if not include_raw:
            return bound | parser
        parsed = RunnablePassthrough.assign(
            parsed=itemgetter("raw") | parser, parsing_error=lambda _: None
        ).with_fallbacks(
            [RunnablePassthrough.assign(parsed=lambda _: None)], exception_key="parsing_error"
        )
        return RunnableMap(raw=bound) | parsed

    # ------------------------------------------------------------------ batches

    def _forced_call(
        self, schema: Any, strict: bool | None, traced: dict[str, Any]
    ) -> tuple[Runnable[LanguageModelInput, Any], Runnable[Any, Any]]:
        """``function_calling``: a forced call of the schema's tool; its arguments' parser."""
        spec = ToolSpec.of(schema)
        bound = self.bind_tools(
            [schema], tool_choice=spec.name, strict=strict, ls_structured_output_format=traced
        )
        parser: Runnable[Any, Any] = RunnableLambda(first_call_args)
        if isinstance(schema, type) and is_basemodel_subclass(schema):
            parser = parser | RunnableLambda(schema.model_validate)  # type: ignore[attr-defined]
        return bound, parser

    def _json_answer(
        self, schema: Any, strict: bool | None, traced: dict[str, Any]
    ) -> tuple[Runnable[LanguageModelInput, Any], Runnable[Any, Any]]:
        """``json_schema`` / ``json_mode``: the schema's (or JSON's) answer; its validator."""
        json_schema = None
        if schema is not None:
            json_schema = schema if isinstance(schema, dict) else convert_to_json_schema(schema)
        answer = {
            "schema": json_schema,
            "constraint": None
            if json_schema is None
            else prepare(json_schema, self._constraint_engine(), strict=strict),
            "strict": strict,
        }
        bound = self.bind(response_format=answer, ls_structured_output_format=traced)
        return bound, json_parser(schema, json_schema)
