"""A chat model's batch as one LLM batch.

LangChain runs a chat model's batch one conversation at a time (``generate`` loops,
``agenerate`` gathers). Here the whole batch goes to the LLM at once, as its own batch
does (natively batched, or concurrent requests to a server): the first conversation's
``_generate`` runs them all, the others take their answers. Callbacks and runs stay
LangChain's, one per conversation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, cast

from langchain_core.globals import get_llm_cache
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.chat_models import generate_from_stream
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult, Generation, LLMResult
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import get_config_list

from langchain_localllms.chat_models._answers import AnswerReader, ChatTurn, as_message
from langchain_localllms.chat_models._messages import normalized

if TYPE_CHECKING:
    from langchain_localllms.llms._base import LocalLLM

#: The batched ``generate``/``agenerate`` in progress (see :class:`BatchedChat`).
BATCH: ContextVar[ChatBatch | None] = ContextVar("localllms_chat_batch", default=None)


class BatchedChat(BaseChatModel):
    """``batch``/``abatch``/``generate``/``agenerate`` that hand the LLM one batch.

    A subclass gives ``_turn`` (a conversation's prompt and reader) and ``llm``.
    """

    if TYPE_CHECKING:
        llm: LocalLLM

        def _turn(self, messages: list[BaseMessage], kwargs: dict[str, Any]) -> ChatTurn: ...

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
        result = self.generate(conversations, **run_options(configs), **kwargs)
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
        result = await self.agenerate(conversations, **run_options(configs), **kwargs)
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
        token = BATCH.set(ChatBatch(self, messages, args, kwargs))
        try:
            return super().generate(messages, *args, **kwargs)
        finally:
            BATCH.reset(token)

    async def agenerate(
        self, messages: list[list[BaseMessage]], *args: Any, **kwargs: Any
    ) -> LLMResult:
        if not self._batched(messages):
            return await super().agenerate(messages, *args, **kwargs)
        token = BATCH.set(ChatBatch(self, messages, args, kwargs))
        try:
            return await super().agenerate(messages, *args, **kwargs)
        finally:
            BATCH.reset(token)

    def _batched(self, messages: list[list[BaseMessage]]) -> bool:
        """Whether a ``generate`` of these conversations goes to the LLM as one batch.

        Not when a cache is asked first: a hit would leave its batched answer unused.
        """
        if len(messages) < 2:
            return False
        return self.cache is False or (self.cache is None and get_llm_cache() is None)

    def _batch_turns(self, batch: ChatBatch) -> tuple[list[ChatTurn], list[str] | None]:
        stop, options = batch.call_options()
        return [self._turn(m, dict(options)) for m in batch.messages], stop

    def _batch_results(self, batch: ChatBatch) -> list[ChatResult | Exception]:
        turns, stop = self._batch_turns(batch)
        rows = self.llm.outcomes([t.prompt for t in turns], stop, [None] * len(turns),
                                  **turns[0].options)  # fmt: skip
        return [self._answer(t, row) for t, row in zip(turns, rows, strict=True)]

    async def _abatch_results(self, batch: ChatBatch) -> list[ChatResult | Exception]:
        turns, stop = self._batch_turns(batch)
        rows = await self.llm.aoutcomes([t.prompt for t in turns], stop, [None] * len(turns),
                                         **turns[0].options)  # fmt: skip
        return [self._answer(t, row) for t, row in zip(turns, rows, strict=True)]

    def _answer(self, turn: ChatTurn, row: Generation | Exception) -> ChatResult | Exception:
        """One conversation's answer from its LLM generation, as a stream would read."""
        if isinstance(row, Exception):
            return row
        reader = AnswerReader(turn, self.llm.ls_model_name())
        try:
            chunks = [*reader.start(), *reader.feed(row.text, row.generation_info), *reader.end()]
        except Exception as e:
            return e
        return as_message(generate_from_stream(iter(chunks)))


class ChatBatch:
    """The conversations of one ``generate``, answered by one LLM batch."""

    def __init__(
        self,
        owner: BatchedChat,
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

    def run(self, answer: Callable[[ChatBatch], list[ChatResult | Exception]]) -> None:
        if self.results is None:
            self.results = list(zip(self.messages, answer(self), strict=True))

    def take(self, messages: list[BaseMessage], run: Callable[[], None]) -> ChatResult | None:
        """This conversation's answer (running the batch first), or None if not in it."""
        run()
        assert self.results is not None
        for i, (asked, result) in enumerate(self.results):
            if asked == messages or normalized(asked) == messages:
                del self.results[i]
                if isinstance(result, Exception):
                    raise result
                return result
        return None

    async def atake(
        self,
        messages: list[BaseMessage],
        answer: Callable[[ChatBatch], Awaitable[list[ChatResult | Exception]]],
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


def run_options(config: RunnableConfig) -> dict[str, Any]:
    """The run settings of a batch's one config, as ``generate`` takes them."""
    return {k: config.get(k) for k in ("callbacks", "tags", "metadata", "run_name")}
