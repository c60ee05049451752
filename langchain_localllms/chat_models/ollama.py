"""Chat with a model served by Ollama, through its ``/api/chat`` route."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models.chat_models import (
    agenerate_from_stream,
    generate_from_stream,
)
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    ToolMessage,
)
from langchain_core.outputs import ChatGenerationChunk, ChatResult

from langchain_localllms.chat_models._answers import as_message, final_chunk
from langchain_localllms.chat_models._base import LocalChatModel
from langchain_localllms.chat_models._messages import ROLES, add_system, message_text
from langchain_localllms.chat_models._tools import (
    ToolCallError,
    ToolSpec,
    answer_call,
    call_mode,
    parse_call,
    render_call,
    tools_preamble,
)
from langchain_localllms.core.events import Tally, Thinking, ToolCallPiece
from langchain_localllms.core.requests import ChatRequest
from langchain_localllms.core.stops import StopStream
from langchain_localllms.engines.ollama import GENERATE_ONLY
from langchain_localllms.grammars import Grammar
from langchain_localllms.llms._base import LocalLLM, standard_names
from langchain_localllms.llms.ollama import Ollama

__all__ = ["ChatOllama"]

#: ``reasoning`` as Ollama's ``think`` takes it: on/off, or an effort level.
Reasoning = bool | Literal["low", "medium", "high"] | None


class ChatOllama(LocalChatModel):
    """A chat model served by `Ollama <https://ollama.com>`_, over ``POST /api/chat``.

    A drop-in for ``langchain_ollama.ChatOllama``: the same arguments (``model``,
    ``base_url``, ``reasoning``, ``validate_model_on_init``, ``temperature``,
    ``num_ctx``, ``num_predict``, ``format``, ``keep_alive``, ...), and every other
    argument of :class:`~langchain_localllms.Ollama`, whose engine it runs on: the same
    pooled connections (sync and natively async), options, stop sequences, usage and
    timings, typed errors (a model that is not pulled is a ``NotFoundError`` that
    says ``ollama pull <model>``; a server that is not running a ``ConnectionError``
    that names the URL) and context checks.

    The server renders the conversation with the model's own template. What the
    model can do comes from ``/api/show``'s ``capabilities``, asked once per instance
    (and per model given per call as ``model=``):

    * **Tools.** With the ``tools`` capability, ``bind_tools`` sends them as
      Ollama's ``tools`` and reads ``message.tool_calls``. A model without it (Gemma
      3, for one: Ollama answers HTTP 400 "does not support tools" to ``tools``) is
      offered them in the system prompt. A forced call (``tool_choice="any"``,
      ``"required"`` or a tool's name), for which Ollama has no option, is
      constrained by ``format`` set to the JSON schema of a call, so it always
      validates against its tool's schema. ``"auto"`` is not constrained (Ollama's
      ``format`` has no "text or a call"): the answer is validated, and a call that
      does not fit its schema is a ``ToolCallError``.
    * **Structured output.** ``with_structured_output`` sends the schema as
      ``format`` (``json_schema``), ``format="json"`` (``json_mode`` without a
      schema) or forces a call (``function_calling``); the answer always parses.
    * **Reasoning.** ``reasoning`` is sent as ``think`` (on a model without the
      ``thinking`` capability, True is Ollama's HTTP 400 "does not support
      thinking"). The server splits the thought from the answer: ``message.thinking``
      goes to ``additional_kwargs["reasoning_content"]``, streamed as it comes, and
      never into ``content``.

    Setup:
        Install Ollama from https://ollama.com/download, then:

        .. code-block:: bash

            ollama serve
            ollama pull llama3.2
            pip install langchain-localllms

    Key init args:
        model: the model name, ``name[:tag]`` (``ollama list`` shows yours).
        base_url: where Ollama listens (``http://localhost:11434``).
        reasoning: ``True`` / ``False`` / ``None`` (the model's default), or an
            effort ``"low"``, ``"medium"``, ``"high"``; sent as ``think``.
        temperature, num_ctx, num_predict, top_k, top_p, seed, ...: Ollama's options
            (``max_tokens`` is taken as ``num_predict``).
        format: ``"json"`` or a JSON schema, for every answer.
        keep_alive: how long the model stays loaded after a call.
        validate_model_on_init: check at construction that the server has the model.
        client_kwargs: more ``httpx`` client arguments (langchain-ollama's
            ``sync_client_kwargs`` / ``async_client_kwargs`` are merged into it).

    Instantiate:
        .. code-block:: python

            from langchain_localllms import ChatOllama

            chat = ChatOllama(model="llama3.2", temperature=0)

    Invoke:
        .. code-block:: python

            chat.invoke([("system", "Answer briefly."), ("human", "Name a colour.")])

    Stream:
        .. code-block:: python

            for chunk in chat.stream("Tell me a story."):
                print(chunk.content, end="", flush=True)

    Async:
        .. code-block:: python

            await chat.ainvoke("Name a colour.")
            async for chunk in chat.astream("Tell me a story."):
                print(chunk.content, end="", flush=True)
    """

    reasoning: Reasoning = None  # type: ignore[assignment]
    """Whether a reasoning model thinks before it answers, sent as Ollama's ``think``:
    True, False, an effort (``"low"``, ``"medium"``, ``"high"``), or None (not sent:
    the model's default; Ollama turns thinking on for models that can think). The
    thought goes to ``additional_kwargs["reasoning_content"]``, never into
    ``content``. Also a per-call option."""

    _llm_class: ClassVar[type[LocalLLM]] = Ollama

    def __init__(self, **data: Any) -> None:
        if "llm" not in data:
            data = _client_kwargs(data)
        given = [k for k in GENERATE_ONLY if data.get(k) is not None]
        if given:
            msg = (
                f"ChatOllama takes no {', '.join(given)}: those are fields of Ollama's "
                "/api/generate, and /api/chat has none (give the system text as a "
                "SystemMessage; the server renders the model's own template)"
            )
            raise TypeError(msg)
        if data.get("chat_template") is not None:
            msg = (
                "ChatOllama takes no chat_template: Ollama renders the model's own "
                "template on the server (give another one in a Modelfile's TEMPLATE and "
                "`ollama create` a model from it)"
            )
            raise TypeError(msg)
        super().__init__(**data)

    @property
    def _ollama(self) -> Ollama:
        llm = self.llm
        assert isinstance(llm, Ollama)
        return llm

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {**super()._identifying_params, "reasoning": self.reasoning}

    def capabilities(self, model: str | None = None) -> frozenset[str]:
        """What the model can do (``/api/show``'s ``capabilities``, asked once)."""
        return self._ollama.capabilities(model)

    # ------------------------------------------------------------- generation
    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        options = dict(kwargs)
        model = options.pop("model", None) or None
        caps = self._ollama.capabilities(model) if _needs_capabilities(messages, options) else None
        plan = self._plan(messages, options, model, caps)
        llm = self._ollama
        call = llm.resolve_call(stop, plan.options)
        tally = Tally()
        reader = _OllamaAnswer(plan, call.stops, model or llm.model)
        pieces = llm.engine.chat(plan.request, call, tally)
        try:
            for piece in pieces:
                yield from reader.feed(piece)
                if reader.stopped:
                    break
        finally:
            pieces.close()  # type: ignore[attr-defined]
        yield from reader.end(tally)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        options = dict(kwargs)
        model = options.pop("model", None) or None
        caps = None
        if _needs_capabilities(messages, options):
            caps = await self._ollama.acapabilities(model)
        plan = self._plan(messages, options, model, caps)
        llm = self._ollama
        call = llm.resolve_call(stop, plan.options)
        tally = Tally()
        reader = _OllamaAnswer(plan, call.stops, model or llm.model)
        pieces = llm.engine.achat(plan.request, call, tally)
        try:
            async for piece in pieces:
                for chunk in reader.feed(piece):
                    yield chunk
                if reader.stopped:
                    break
        finally:
            await pieces.aclose()  # type: ignore[attr-defined]
        for chunk in reader.end(tally):
            yield chunk

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return as_message(generate_from_stream(self._stream(messages, stop=stop, **kwargs)))

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        result = await agenerate_from_stream(self._astream(messages, stop=stop, **kwargs))
        return as_message(result)

    # ---------------------------------------------------------------- request
    def _plan(
        self,
        messages: list[BaseMessage],
        options: dict[str, Any],
        model: str | None,
        caps: frozenset[str] | None,
    ) -> _Plan:
        """The ``/api/chat`` request of one call, and how to read its answer."""
        options = standard_names(Ollama, options)
        tools = [ToolSpec.of(t) for t in options.pop("tools", None) or []]
        choice = options.pop("tool_choice", None)
        mode, allowed = call_mode(tools, choice)
        answer = _answer_format(options)
        if answer is not None:
            if options.get("format") is not None:
                msg = "give format or a structured-output schema, not both"
                raise ValueError(msg)
            options["format"] = answer
        reasoning = options.pop("reasoning", self.reasoning)
        if reasoning is not None:
            if options.get("think") is not None or self._ollama.think is not None:
                msg = "give reasoning or think, not both (reasoning is sent as think)"
                raise ValueError(msg)
            options["think"] = reasoning
        native = caps is not None and "tools" in caps
        turns = _wire_messages(messages, native=native)
        wire_tools = None
        if mode != "none":
            if options.get("format") is not None or self._ollama.format is not None:
                msg = "give tools or format, not both: a forced call's format is the tools'"
                raise ValueError(msg)
            if native:
                wire_tools = [t.openai() for t in allowed]
            else:
                add_system(turns, tools_preamble(allowed, forced=mode == "forced"))
            if mode == "forced":
                schemas = [t.call_schema() for t in allowed]
                options["format"] = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
        request = ChatRequest(turns, tools=wire_tools, model=model)
        return _Plan(request=request, options=options, tools=allowed, mode=mode, native=native)


# ------------------------------------------------------------------ requests
@dataclass
class _Plan:
    """One call's request, and how to read its answer."""

    request: ChatRequest
    options: dict[str, Any] = field(default_factory=dict)
    tools: list[ToolSpec] = field(default_factory=list)
    mode: str = "none"  # "none", "auto" (text or a call), "forced" (a call)
    native: bool = False  # tools went as Ollama's ``tools``


def _client_kwargs(values: dict[str, Any]) -> dict[str, Any]:
    """langchain-ollama's ``sync_client_kwargs`` / ``async_client_kwargs``.

    Both clients here take one ``client_kwargs``; the two are merged into it, and
    must not differ.
    """
    sync = values.get("sync_client_kwargs")
    async_ = values.get("async_client_kwargs")
    if "sync_client_kwargs" not in values and "async_client_kwargs" not in values:
        return values
    if sync and async_ and sync != async_:
        msg = (
            "ChatOllama takes one client_kwargs for its sync and async clients: give "
            "sync_client_kwargs and async_client_kwargs alike, or client_kwargs"
        )
        raise ValueError(msg)
    values = {
        k: v for k, v in values.items() if k not in ("sync_client_kwargs", "async_client_kwargs")
    }
    values["client_kwargs"] = {**(values.get("client_kwargs") or {}), **(sync or async_ or {})}
    return values


def _needs_capabilities(messages: Sequence[BaseMessage], options: dict[str, Any]) -> bool:
    """Whether the request depends on the model's tools capability."""
    if options.get("tools"):
        return True
    return any(
        isinstance(m, ToolMessage) or (isinstance(m, AIMessage) and m.tool_calls) for m in messages
    )


def _answer_format(options: dict[str, Any]) -> Any:
    """Ollama's ``format`` for a structured-output binding, or None.

    The binding is ``response_format={"schema": ...}`` or a ``grammar``.
    """
    answer = options.pop("response_format", None)
    grammar = options.pop("grammar", None)
    if answer is not None and grammar is not None:
        msg = "give grammar or a structured-output schema, not both"
        raise ValueError(msg)
    if answer is not None:
        schema = (
            answer.get("constraint") or answer.get("schema") if isinstance(answer, dict) else None
        )
        return "json" if schema is None else schema
    if grammar is None:
        return None
    g = Grammar.coerce(grammar)
    if g.schema is not None:
        return g.schema
    if g.name == "json":
        return "json"
    msg = (
        "Ollama takes no GBNF grammar, only format='json' or a JSON schema (a dict, a "
        "pydantic model, or Grammar.from_json_schema / from_pydantic)"
    )
    raise ValueError(msg)


def _wire_messages(messages: Sequence[BaseMessage], *, native: bool) -> list[dict[str, Any]]:
    """Ollama's message dicts.

    ``native``: the model's template takes tools, so calls go as ``tool_calls`` and
    results as ``tool`` messages (with ``tool_name``); otherwise a call is written in
    the assistant's text, as the tools preamble asks, and a result is a user turn.
    """
    names: dict[str, str] = {}  # tool call id -> tool name
    out: list[dict[str, Any]] = []
    for message in messages:
        role = ROLES.get(message.type)
        if isinstance(message, ChatMessage):
            role = {"human": "user", "ai": "assistant"}.get(message.role, message.role)
        if role not in ("system", "user", "assistant", "tool"):
            msg = f"ChatOllama cannot send a {message.type!r} message to Ollama"
            raise ValueError(msg)
        content = message_text(message, "ChatOllama")
        turn: dict[str, Any] = {"role": role, "content": content}
        if isinstance(message, AIMessage):
            for call in message.tool_calls:
                if call.get("id"):
                    names[str(call["id"])] = call["name"]
            if message.tool_calls and native:
                turn["tool_calls"] = [
                    {"function": {"name": c["name"], "arguments": c["args"]}}
                    for c in message.tool_calls
                ]
            elif message.tool_calls:
                calls = "\n".join(render_call(c["name"], c["args"]) for c in message.tool_calls)
                turn["content"] = f"{content}\n{calls}" if content else calls
            thinking = message.additional_kwargs.get("reasoning_content")
            if isinstance(thinking, str) and thinking:
                turn["thinking"] = thinking
        if isinstance(message, ToolMessage):
            name = message.name or names.get(message.tool_call_id) or "the tool"
            if native:
                turn["tool_name"] = name
            else:
                turn = {"role": "user", "content": f"Result of {name}: {content}"}
        out.append(turn)
    return out


# ------------------------------------------------------------------- answers
class _OllamaAnswer:
    """Turns the engine's pieces into message chunks.

    The pieces are content, :class:`Thinking` and :class:`ToolCallPiece`.
    """

    def __init__(self, plan: _Plan, stops: list[str], model: str) -> None:
        self.plan = plan
        self.model = model
        self.stops = StopStream(stops)
        # Text that may be a call is held until the end: always for a forced call,
        # and for "auto" when the tools are in the prompt and the text starts with "{".
        self.holding: bool | None = {
            "forced": True,
            "auto": None if not plan.native else False,
        }.get(plan.mode, False)
        self.buffer = ""
        self.native: list[ToolCallPiece] = []  # the calls the server parsed

    @property
    def stopped(self) -> bool:
        return self.stops.stopped

    def feed(self, piece: str | ToolCallPiece) -> Iterator[ChatGenerationChunk]:
        if isinstance(piece, ToolCallPiece):
            self.native.append(piece)
            return
        if isinstance(piece, Thinking):
            chunk = AIMessageChunk(content="", additional_kwargs={"reasoning_content": str(piece)})
            yield ChatGenerationChunk(message=chunk)
            return
        yield from self._text(self.stops.push(piece))

    def _text(self, text: str) -> Iterator[ChatGenerationChunk]:
        if not text:
            return
        if self.holding is None:  # auto, tools in the prompt: a call starts with "{"
            self.buffer += text
            head = self.buffer.lstrip()
            if not head:
                return
            self.holding = head.startswith("{")
            if self.holding:
                return
            text, self.buffer = self.buffer, ""
        if self.holding:
            self.buffer += text
            return
        yield ChatGenerationChunk(message=AIMessageChunk(content=text))

    def end(self, tally: Tally) -> Iterator[ChatGenerationChunk]:
        if not self.stops.stopped:
            yield from self._text(self.stops.flush())
        info = tally.info(self.stops.matched)
        info.pop("thinking", None)  # streamed as reasoning_content
        calls = self._calls(info.get("finish_reason"))
        metadata: dict[str, Any] = {
            "model_name": info.get("model") or self.model,
            "finish_reason": info.get("finish_reason"),
            "done_reason": info.get("finish_reason"),
        }
        yield final_chunk("" if calls else self.buffer, calls, info, metadata)

    def _calls(self, finish: Any) -> list[dict[str, Any]]:
        """The answer's tool calls, each validated against its tool's schema."""
        if self.plan.mode == "none":
            return []
        if self.native:
            return [self._native_call(c) for c in self.native]
        text = self.buffer.strip()
        if self.plan.mode == "auto" and not _names_a_tool(text, self.plan.tools):
            return []  # text, not a call
        call = answer_call(text, self.plan.tools, forced=True, finish=finish, limit="num_predict")
        return [dict(call)] if call else []

    def _native_call(self, piece: ToolCallPiece) -> dict[str, Any]:
        args = piece.arguments
        if isinstance(args, str):  # some servers send the arguments as JSON text
            try:
                args = json.loads(args)
            except ValueError as e:
                msg = f"Ollama sent a tool call whose arguments are not JSON: {args[:200]!r}"
                raise ToolCallError(msg) from e
        text = json.dumps({"name": piece.name, "arguments": args})
        call = dict(parse_call(text, self.plan.tools, forced=True) or {})
        if piece.id:
            call["id"] = piece.id
        return call


def _names_a_tool(text: str, tools: Sequence[ToolSpec]) -> bool:
    """Whether unconstrained text is a JSON object naming a bound tool (a call)."""
    if not text.startswith("{"):
        return False
    try:
        data = json.loads(text)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("name") in {t.name for t in tools}
