"""What every local LLM class shares.

A runtime implements three things:

* ``_pieces(prompt, call, tally)`` — a generator of text pieces as the runtime decodes
  them (closing it must stop decoding), filling ``tally`` with token counts;
* ``_identity()`` — everything that changes the output (model, sampling, grammar);
* optionally ``_apieces`` (native async), ``_generate_batch`` (true batching) and
  ``_concurrency`` (how many prompts may run at once).

This class turns that into LangChain's ``invoke``/``batch``/``stream`` and their async
forms, with stop sequences, ``on_llm_new_token`` callbacks, usage and timings, and a
cache key that also holds per-call options.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pydantic
from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    BaseCallbackManager,
    CallbackManagerForLLMRun,
    Callbacks,
)
from langchain_core.language_models import BaseLLM
from langchain_core.language_models.base import LangSmithParams
from langchain_core.outputs import Generation, GenerationChunk, LLMResult, RunInfo
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda
from langchain_core.runnables.config import get_config_list
from pydantic import ConfigDict, Field, field_validator, model_validator
from typing_extensions import Self

from langchain_localllms._native import current_cancel, iterate_in_thread, run_in_thread
from langchain_localllms._redact import redact
from langchain_localllms._stop import StopStream, check_stops
from langchain_localllms._usage import Tally, llm_output
from langchain_localllms.errors import ClosedError
from langchain_localllms.prompts import ModelInfo

#: The ``_stream``/``_astream`` option (for this package's chat models) that ends a
#: generation early: a callable asked after each chunk; True stops decoding, and the
#: final chunk still carries the usage so far.
UNTIL = "_until"

#: Per-call options of the ``generate``/``agenerate`` call in progress, so that the
#: cache key (built by LangChain from ``self.dict()``) includes them.
_CALL_OPTIONS: ContextVar[dict[str, Any] | None] = ContextVar(
    "langchain_localllms_call_options", default=None
)
#: The prompts of the ``batch``/``abatch`` with ``return_exceptions=True`` in progress:
#: one prompt's failure is its own, and the others still get their answers. (A call
#: made meanwhile for other prompts, from a callback say, fails as usual.)
_ISOLATE: ContextVar[frozenset[str]] = ContextVar(
    "langchain_localllms_isolate", default=frozenset()
)


def _isolating(prompts: list[str]) -> bool:
    """Whether failures of this call are per prompt (it is an isolating batch's)."""
    batch = _ISOLATE.get()
    return bool(batch) and all(p in batch for p in prompts)


Outcome = Generation | Exception
"""One prompt's result: its generation, or the error that ended it."""


class _PartialFailure(Exception):
    """Some prompts of an isolating batch failed; carries every prompt's outcome."""

    def __init__(self, prompts: list[str], outcomes: list[Outcome]) -> None:
        super().__init__("some prompts of the batch failed")
        self.prompts = prompts
        self.outcomes = outcomes

    def _matches(self, prompts: list[str]) -> list[int | None]:
        """Each batch prompt's place among those that ran (None: the cache answered it).

        LangChain runs the prompts the cache misses, in order: a subsequence.
        """
        j, places = 0, list[int | None]()
        for prompt in prompts:
            if j < len(self.prompts) and prompt == self.prompts[j]:
                places.append(j)
                j += 1
            else:
                places.append(None)
        return places

    def unmatched(self, prompts: list[str]) -> list[int]:
        """The batch prompts the cache answered."""
        return [i for i, j in enumerate(self._matches(prompts)) if j is None]

    def place(self, prompts: list[str], cached: Callable[[int], Any]) -> list[Any]:
        """Each batch prompt's text or error; ``cached(i)`` for those the cache answered."""
        out: list[Any] = []
        for i, j in enumerate(self._matches(prompts)):
            outcome = cached(i) if j is None else self.outcomes[j]
            out.append(outcome.text if isinstance(outcome, Generation) else outcome)
        return out


@dataclass(frozen=True)
class Refused:
    """A parameter a runtime does not take: why, and what to do instead.

    ``None`` ("not set") and the values in ``accept`` (what the runtime does anyway)
    pass, since code written for other LangChain classes often passes them. Any other
    value is an ``error`` that names the parameter and says why, or, with
    ``no_effect``, a warning (once per class and parameter) that it changes nothing
    here: for parameters that ``langchain_community`` took and the runtime ignores.
    """

    why: str
    accept: tuple[Any, ...] = ()
    error: type[Exception] = TypeError
    no_effect: bool = False

    def check(self, name: str, value: Any, where: str) -> None:
        """Raise (or warn) unless ``value`` is None or accepted."""
        if value is None or any(value is a or value == a for a in self.accept):
            return
        if self.no_effect:
            if (where, name) not in _WARNED:
                _WARNED.add((where, name))
                warnings.warn(
                    f"{where} ignores {name}={value!r}: {self.why}", UserWarning, stacklevel=6
                )
            return
        shown = f"{name}={value!r}" if self.accept else f"{name}="
        msg = f"{where} does not take {shown}: {self.why}"
        raise self.error(msg)


_WARNED: set[tuple[str, str]] = set()


def refuse(table: Mapping[str, Refused], values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Check ``values`` against ``table``; return the values that are not in it."""
    for name in table.keys() & values.keys():
        table[name].check(name, values[name], where)
    return {k: v for k, v in values.items() if k not in table}


@dataclass
class Call:
    """The resolved parameters of one generation: instance defaults + call options."""

    params: dict[str, Any]
    stops: list[str] = field(default_factory=list)


def identity_value(value: Any) -> Any:
    """Render a parameter so that equal behaviour gives equal cache keys."""
    if hasattr(value, "identity"):
        return value.identity
    if isinstance(value, type) and issubclass(value, pydantic.BaseModel):
        return json.dumps(value.model_json_schema(), sort_keys=True)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, default=repr)
    return value


class LocalLLM(BaseLLM):
    """Base class of every runtime in this package (not used directly)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, protected_namespaces=())

    stop: list[str] | None = None
    """Stop sequences: the answer ends before the first one (which is not included).
    Give them here or per call, not both."""

    max_concurrency: int | None = Field(default=1, ge=1)
    """How many prompts of a batch run at once (beyond the runtime's own batching);
    None: the runtime's own choice (one at a time in this process)."""

    #: Fields that may also be given per call (``llm.invoke(p, temperature=0)``).
    _call_fields: ClassVar[tuple[str, ...]] = ()
    #: Fields that hold loaded runtime objects (a pipeline, a tokenizer): copies share
    #: them, as they share what ``_setup`` loaded.
    _shared_fields: ClassVar[tuple[str, ...]] = ()
    #: Fields read at every call rather than when loading (a copy may change them).
    _live_fields: ClassVar[tuple[str, ...]] = ()
    #: Options that exist only per call or need no field (e.g. ``grammar``).
    _call_only: ClassVar[tuple[str, ...]] = ()
    #: The engine that enforces JSON schemas while decoding, a key of
    #: ``grammars.schemas.ENGINES`` (None: the runtime does not constrain decoding), and
    #: the one for tool calls where it differs.
    _schema_engine: ClassVar[str | None] = None
    _tool_schema_engine: ClassVar[str | None] = None
    #: Whether a ``streaming`` field decides if ``invoke`` sends tokens to callbacks.
    _streaming_gates_tokens: ClassVar[bool] = False
    #: Names of the fields LangSmith reports as temperature / max tokens.
    _temperature_field: ClassVar[str | None] = "temperature"
    _max_tokens_field: ClassVar[str | None] = "max_tokens"

    _init_args: dict[str, Any] = pydantic.PrivateAttr(default_factory=dict)
    #: Shared with copies (as the loaded model is): closing one closes them all.
    _life: _Lifecycle = pydantic.PrivateAttr(default_factory=lambda: _Lifecycle())

    def __init__(self, **data: Any) -> None:
        super().__init__(**data)
        self._init_args = dict(data)
        self._setup()

    # ------------------------------------------------------------------ copies
    # Copies share what ``_setup`` loaded (private attributes): the model stays loaded
    # while any copy lives. A copy that changes how the model is loaded loads anew.
    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Any:
        """Copy this instance; the copy shares the loaded model.

        If ``update`` changes a setting the model was loaded with (``n_ctx``,
        ``model_path``, ``base_url``, ...), the copy is built anew with it instead, so
        it never runs the old model under the new setting.
        """
        reload = sorted(set(update or {}) & self._load_fields())
        if reload:
            return type(self)(**{**self._init_args, **(update or {})})
        copied = super().model_copy(update=update, deep=deep)
        copied._init_args = {**self._init_args, **(update or {})}
        return copied

    def __deepcopy__(self, memo: dict[int, Any] | None = None) -> Any:
        memo = {} if memo is None else memo
        shared = [*(self.__pydantic_private__ or {}).values()]
        shared += [getattr(self, name) for name in self._shared_fields]
        for value in shared:
            memo[id(value)] = value  # shared, never copied (loaded models, native handles)
        return super().__deepcopy__(memo)

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled as its settings; unpickling loads the model again.
        return (_rebuild, (type(self), self._init_args))

    # --------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Free the model now (native memory, connections); once, idempotent.

        A call running on another thread ends first, then the memory goes. The
        copies of this instance share its model, so they are closed with it. Using
        a closed instance raises :class:`~langchain_localllms.errors.ClosedError`.
        ``with LlamaCpp(...) as llm:`` closes at the end of the block.
        """
        with self._life.lock:
            if self._life.closed:
                return
            self._life.closed = True
        self._release()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (on this instance or a copy)."""
        return self._life.closed

    def _release(self) -> None:
        """Free what ``_setup`` loaded: the runtime engine's ``close()``, if any."""
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.close()

    def _check_open(self) -> None:
        if self._life.closed:
            msg = (
                f"this {type(self).__name__} was closed (close(), or the end of its with "
                "block); create a new instance to use the model again"
            )
            raise ClosedError(msg)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await run_in_thread(self.close)  # may wait for a call on another thread

    @classmethod
    def _load_fields(cls) -> set[str]:
        """Fields read when the model is loaded (all but per-call and LangChain ones)."""
        live = {*cls._call_fields, *cls._live_fields}
        return set(cls.model_fields) - set(LocalLLM.model_fields) - live

    def _setup(self) -> None:
        """Load the runtime once the fields are valid (errors reach the user unwrapped)."""

    #: Parameters other LangChain classes (or the runtime's own API) take that this
    #: class does not: at construction and per call, each is an error that says why
    #: and what to do instead, unless it is None or an accepted value.
    _refused: ClassVar[dict[str, Refused]] = {}

    @model_validator(mode="before")
    @classmethod
    def _accept_callback_manager(cls, values: Any) -> Any:
        """``callback_manager=`` (the seeds' spelling) is an alias of ``callbacks=``."""
        if isinstance(values, dict):
            values = refuse(cls._refused, values, cls.__name__)
        if isinstance(values, dict) and "callback_manager" in values:
            values = dict(values)
            manager = values.pop("callback_manager")
            if values.get("callbacks") is not None and manager is not None:
                msg = "give callbacks or callback_manager, not both"
                raise ValueError(msg)
            if manager is not None and not isinstance(manager, BaseCallbackManager):
                msg = "callback_manager must be a CallbackManager"
                raise TypeError(msg)
            values["callbacks"] = manager
        return values

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop_field(cls, value: Any) -> list[str] | None:
        return None if value is None else check_stops(value)

    # ------------------------------------------------------------------ identity
    def _identity(self) -> dict[str, Any]:
        """Everything that changes this instance's output (subclasses extend)."""
        return {name: getattr(self, name) for name in self._call_fields}

    @property
    def _identifying_params(self) -> dict[str, Any]:
        # Also the cache key and every callback's invocation_params: no credentials.
        params = {k: identity_value(redact(v, k)) for k, v in self._identity().items()}
        params["stop"] = self.stop
        call = _CALL_OPTIONS.get()
        if call:
            params["call_options"] = {
                k: identity_value(redact(v, k)) for k, v in sorted(call.items())
            }
        return params

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            yield name, redact(value, name)

    def _ls_model_name(self) -> str:
        return self._llm_type

    def model_info(self) -> ModelInfo:
        """What this runtime knows of its model (architecture, chat template, ...)."""
        return ModelInfo(runtime=self._llm_type, model=self._ls_model_name())

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = self._llm_type
        params["ls_model_name"] = self._ls_model_name()
        for key, name in (
            ("ls_temperature", self._temperature_field),
            ("ls_max_tokens", self._max_tokens_field),
        ):
            if name is not None:
                value = kwargs.get(name, getattr(self, name, None))
                if value is not None:
                    params[key] = value  # type: ignore[literal-required]
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` in this model's own vocabulary (never GPT-2's).

        LangChain's default downloads GPT-2's tokenizer from the Hub: a network call,
        and the wrong vocabulary. Classes that can tokenize override this.
        """
        msg = (
            f"{type(self).__name__} cannot tokenize with its model's vocabulary, and this "
            "package never downloads another one"
        )
        raise NotImplementedError(msg)

    def get_num_tokens(self, text: str) -> int:
        """Tokens of ``text`` in this model's vocabulary."""
        return len(self.get_token_ids(text))

    def with_grammar(self, grammar: Any) -> Runnable[Any, Any]:
        """A runnable that constrains decoding with ``grammar`` and parses the answer.

        ``grammar`` is anything ``Grammar.coerce`` takes; a pydantic model class gives
        instances of it, a JSON schema or a built-in JSON grammar gives parsed JSON
        validated against the schema. A schema keyword the runtime cannot enforce
        raises ``SchemaNotSupported`` here (``Grammar.from_json_schema(s,
        strict=False)`` relaxes it with a warning instead).

        Example:
            .. code-block:: python

                class Person(pydantic.BaseModel):
                    name: str
                    age: int

                person = llm.with_grammar(Person).invoke("Describe a person in JSON:")
        """
        from langchain_localllms.grammars import Grammar

        if "grammar" not in (*self._call_fields, *self._call_only):
            msg = f"{type(self).__name__} cannot constrain decoding with a grammar"
            raise NotImplementedError(msg)
        from langchain_localllms.grammars.schemas import prepare

        g = Grammar.coerce(grammar)
        if g.schema is not None:
            prepare(g.schema, self._schema_engine, strict=not g.lenient)
        return self.bind(grammar=g) | RunnableLambda(g.parse, name="parse_grammar_output")

    # ------------------------------------------------------------ call options
    def _check_call_options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Validate per-call options; an unknown one is an error, never dropped."""
        kwargs = refuse(self._refused, kwargs, type(self).__name__)
        allowed = set(self._call_fields) | set(self._call_only)
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            msg = (
                f"{type(self).__name__} got unknown option(s) {', '.join(unknown)}. "
                f"Options it takes per call: {', '.join(sorted(allowed)) or 'none'}."
            )
            raise TypeError(msg)
        checked = {}
        fields = type(self).model_fields
        for name, value in kwargs.items():
            if name in fields:
                try:
                    value = _field_adapter(type(self), name).validate_python(value)
                except pydantic.ValidationError as e:
                    problem = "; ".join(err["msg"] for err in e.errors())
                    msg = f"{type(self).__name__}: bad value {value!r} for {name}: {problem}"
                    raise ValueError(msg) from e
            checked[name] = value
        return checked

    def _resolve(self, stop: list[str] | None, kwargs: dict[str, Any]) -> Call:
        """Merge instance defaults with the options of one call."""
        self._check_open()
        if stop is not None and self.stop:  # stop=[] at init: no stop sequences
            msg = (
                f"stop was given both to {type(self).__name__}(stop=...) and to this "
                "call; give it in one place"
            )
            raise ValueError(msg)
        options = self._check_call_options(kwargs)
        params = {name: getattr(self, name) for name in self._call_fields}
        params.update(options)
        return Call(params=params, stops=check_stops(stop or self.stop))

    # --------------------------------------------------------- runtime hooks
    def _pieces(self, prompt: str, call: Call, tally: Tally) -> Iterator[str]:
        raise NotImplementedError

    async def _apieces(self, prompt: str, call: Call, tally: Tally) -> AsyncIterator[str]:
        """Native async runtimes override; others run ``_pieces`` in a worker thread."""
        async for piece in iterate_in_thread(lambda: self._pieces(prompt, call, tally)):
            yield piece

    def _generate_batch(self, prompts: list[str], call: Call) -> list[Row] | None:
        """Runtimes that batch natively return one :class:`Row` per prompt, else None.

        The base cuts each row at its stops and reports usage as it does for streams.
        """
        return None

    def _choose(self, prompt: str, options: list[str]) -> int | None:
        """Which of ``options`` the model would write after ``prompt``, if it can say.

        None: the runtime cannot score text. For runtimes without grammars: a choice
        among fixed continuations (which tool to call) that is still the model's.
        """
        return None

    def _llm_output_extra(self) -> dict[str, Any]:
        return {"model_name": self._ls_model_name()}

    # ----------------------------------------------------------- LangChain API
    def generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        callbacks: Callbacks | list[Callbacks] = None,
        *,
        tags: list[str] | list[list[str]] | None = None,
        metadata: dict[str, Any] | list[dict[str, Any]] | None = None,
        run_name: str | list[str] | None = None,
        run_id: uuid.UUID | list[uuid.UUID | None] | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        _check_prompts(prompts)
        self._check_open()  # also before a cache hit
        token = _CALL_OPTIONS.set(self._check_call_options(kwargs) or None)
        try:
            return super().generate(
                prompts,
                stop,
                callbacks,
                tags=tags,
                metadata=metadata,
                run_name=run_name,
                run_id=run_id,
                **kwargs,
            )
        finally:
            _CALL_OPTIONS.reset(token)

    async def agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        callbacks: Callbacks | list[Callbacks] = None,
        *,
        tags: list[str] | list[list[str]] | None = None,
        metadata: dict[str, Any] | list[dict[str, Any]] | None = None,
        run_name: str | list[str] | None = None,
        run_id: uuid.UUID | list[uuid.UUID | None] | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        _check_prompts(prompts)
        self._check_open()  # also before a cache hit
        token = _CALL_OPTIONS.set(self._check_call_options(kwargs) or None)
        try:
            return await super().agenerate(
                prompts,
                stop,
                callbacks,
                tags=tags,
                metadata=metadata,
                run_name=run_name,
                run_id=run_id,
                **kwargs,
            )
        finally:
            _CALL_OPTIONS.reset(token)

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        until = kwargs.pop(UNTIL, None)
        call = self._resolve(stop, kwargs)
        tally = Tally()
        assembler = _Assembler(call.stops, tally)
        pieces = self._pieces(prompt, call, tally)
        try:
            for piece in pieces:
                chunk = assembler.feed(piece)
                if chunk is not None:
                    if run_manager:
                        run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                    yield chunk
                if assembler.stopped or (until is not None and until()):
                    break
        finally:
            pieces.close()  # type: ignore[attr-defined]
        final = assembler.finish()
        if run_manager:
            run_manager.on_llm_new_token(final.text, chunk=final)
        yield final

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        until = kwargs.pop(UNTIL, None)
        call = self._resolve(stop, kwargs)
        tally = Tally()
        assembler = _Assembler(call.stops, tally)
        pieces = self._apieces(prompt, call, tally)
        try:
            async for piece in pieces:
                chunk = assembler.feed(piece)
                if chunk is not None:
                    if run_manager:
                        await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                    yield chunk
                if assembler.stopped or (until is not None and until()):
                    break
        finally:
            await pieces.aclose()  # type: ignore[attr-defined]
        final = assembler.finish()
        if run_manager:
            await run_manager.on_llm_new_token(final.text, chunk=final)
        yield final

    # Per run: LangChain core hands ``_generate`` only the first prompt's run manager,
    # so tokens of every prompt would reach one run. These helpers get all of them:
    # each prompt streams to, ends in, or fails in its own run.
    def _generate_helper(
        self,
        prompts: list[str],
        stop: list[str] | None,
        run_managers: list[CallbackManagerForLLMRun],
        *,
        new_arg_supported: bool,
        **kwargs: Any,
    ) -> LLMResult:
        managers: list[Any] = list(run_managers) or [None] * len(prompts)
        try:
            outcomes = self._outcomes(prompts, stop, managers, **kwargs)
        except BaseException as e:  # the call as a whole (an interrupt, say)
            for m in run_managers:
                m.on_llm_error(e, response=LLMResult(generations=[]))
            raise
        for m, o in zip(run_managers, outcomes, strict=True):
            if isinstance(o, Exception):
                m.on_llm_error(o, response=LLMResult(generations=[]))
            else:
                m.on_llm_end(LLMResult(generations=[[o]], llm_output=self._llm_output([[o]])))
        return self._result(prompts, outcomes, run_managers)

    async def _agenerate_helper(
        self,
        prompts: list[str],
        stop: list[str] | None,
        run_managers: list[AsyncCallbackManagerForLLMRun],
        *,
        new_arg_supported: bool,
        **kwargs: Any,
    ) -> LLMResult:
        managers: list[Any] = list(run_managers) or [None] * len(prompts)
        try:
            outcomes = await self._aoutcomes(prompts, stop, managers, **kwargs)
        except BaseException as e:
            await asyncio.gather(
                *(m.on_llm_error(e, response=LLMResult(generations=[])) for m in run_managers)
            )
            raise
        await asyncio.gather(
            *(
                m.on_llm_error(o, response=LLMResult(generations=[]))
                if isinstance(o, Exception)
                else m.on_llm_end(LLMResult(generations=[[o]], llm_output=self._llm_output([[o]])))
                for m, o in zip(run_managers, outcomes, strict=True)
            )
        )
        return self._result(prompts, outcomes, run_managers)

    def _result(
        self, prompts: list[str], outcomes: list[Outcome], managers: Sequence[Any]
    ) -> LLMResult:
        """The call's result, or its first failure (every failure inside an isolating batch)."""
        failures = [o for o in outcomes if isinstance(o, Exception)]
        if failures:
            if _isolating(prompts):
                raise _PartialFailure(prompts, outcomes)
            raise failures[0]
        gens = [[o] for o in outcomes if isinstance(o, Generation)]
        run = [RunInfo(run_id=m.run_id) for m in managers] or None
        return LLMResult(generations=gens, llm_output=self._llm_output(gens), run=run)

    def _outcomes(
        self, prompts: list[str], stop: list[str] | None, managers: list[Any], **kwargs: Any
    ) -> list[Outcome]:
        """Each prompt's generation or error; a native batch where the runtime has one."""
        call = self._resolve(stop, kwargs) if len(prompts) > 1 else None
        split = _isolating(prompts)
        rows = self._batch_rows(prompts, call, split) if call and self._batches_natively() else None
        if call is not None and rows is not None:
            done = self._finish_rows(rows, call)
            for m, chunks in zip(managers, self._row_tokens(rows, managers), strict=True):
                for chunk in chunks:  # its tokens to its own run, in order
                    m.on_llm_new_token(chunk.text, chunk=chunk)
            return done

        tokens = self._tokens_in_generate()

        def one(prompt: str, manager: Any) -> Outcome:
            try:
                return _join(self._stream(prompt, stop, manager if tokens else None, **kwargs))
            except Exception as e:
                return e

        workers = min(self._concurrency(), len(prompts)) if len(prompts) > 1 else 1
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                return list(pool.map(one, prompts, managers))
        outcomes: list[Outcome] = []
        for prompt, manager in zip(prompts, managers, strict=True):
            outcome = one(prompt, manager)
            outcomes.append(outcome)
            if isinstance(outcome, Exception) and not _isolating(prompts):
                # The call fails with this error: the rest need not run.
                outcomes += [outcome] * (len(prompts) - len(outcomes))
                break
        return outcomes

    async def _aoutcomes(
        self, prompts: list[str], stop: list[str] | None, managers: list[Any], **kwargs: Any
    ) -> list[Outcome]:
        call = self._resolve(stop, kwargs) if len(prompts) > 1 else None
        rows = None
        if call is not None and self._batches_natively():
            split = _isolating(prompts)  # read here: the worker thread has its own context
            rows = await run_in_thread(lambda: self._batch_rows(prompts, call, split))
        if call is not None and rows is not None:
            done = self._finish_rows(rows, call)
            for m, chunks in zip(managers, self._row_tokens(rows, managers), strict=True):
                for chunk in chunks:
                    await m.on_llm_new_token(chunk.text, chunk=chunk)
            return done
        limit = asyncio.Semaphore(await self._aconcurrency() if len(prompts) > 1 else 1)

        tokens = self._tokens_in_generate()

        async def one(prompt: str, manager: Any) -> Outcome:
            async with limit:
                try:
                    chunks = [
                        c
                        async for c in self._astream(
                            prompt, stop, manager if tokens else None, **kwargs
                        )
                    ]
                except Exception as e:
                    return e
                return _join(iter(chunks))

        return list(
            await asyncio.gather(*(one(p, m) for p, m in zip(prompts, managers, strict=True)))
        )

    @staticmethod
    def _finish_rows(rows: list[Row | Exception], call: Call) -> list[Outcome]:
        """Native batch rows cut at their stops, with usage, as streams would be."""
        return [row.finish(call.stops) if isinstance(row, Row) else row for row in rows]

    def _row_tokens(
        self, rows: list[Row | Exception], managers: list[Any]
    ) -> list[list[GenerationChunk]]:
        """Per run, the chunks its callbacks get (after :meth:`_finish_rows`)."""
        send = self._tokens_in_generate()
        return [
            row.chunks if send and m is not None and isinstance(row, Row) else []
            for row, m in zip(rows, managers, strict=True)
        ]

    def _batch_rows(
        self, prompts: list[str], call: Call, split: bool
    ) -> list[Row | Exception] | None:
        """The native batch's rows, or per prompt the error that failed it.

        None: the runtime streams these prompts one at a time instead. When the batch
        fails and ``split`` (failures are per prompt), its halves are tried apart: a
        prompt that fails on its own fails alone, and the others still batch.
        """
        try:
            rows = self._generate_batch(prompts, call)
        except Exception as e:
            cancel = current_cancel()
            if not split or len(prompts) == 1 or (cancel is not None and cancel.is_set):
                return [e] * len(prompts)
            mid = len(prompts) // 2
            left = self._batch_rows(prompts[:mid], call, split)
            right = self._batch_rows(prompts[mid:], call, split)
            return [*(left or [e] * mid), *(right or [e] * (len(prompts) - mid))]
        return None if rows is None else list(rows)

    # Direct callers of the hooks (LangChain calls the helpers above).
    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        return self._result(
            prompts, self._outcomes(prompts, stop, [run_manager] * len(prompts), **kwargs), []
        )

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        outcomes = await self._aoutcomes(prompts, stop, [run_manager] * len(prompts), **kwargs)
        return self._result(prompts, outcomes, [])

    # Failures per prompt: LangChain core's ``batch(return_exceptions=True)`` fails every
    # prompt of a generate call when one fails.
    def batch(
        self,
        inputs: list[Any],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[str]:
        if not return_exceptions or not inputs:
            return super().batch(inputs, config, return_exceptions=return_exceptions, **kwargs)
        out: list[Any] = []
        for part, confs in _parts(inputs, get_config_list(config, len(inputs))):
            prompts = [self._convert_input(x) for x in part]
            texts = [p.to_string() for p in prompts]
            token = _ISOLATE.set(frozenset(texts))
            try:
                result = self.generate_prompt(prompts, **_per_prompt(confs), **kwargs)
                out += [g[0].text for g in result.generations]
            except _PartialFailure as e:
                # Prompts the cache answered: asked again, one by one (the cache answers).
                cached = {
                    i: self.batch([part[i]], confs[i], return_exceptions=True, **kwargs)[0]
                    for i in e.unmatched(texts)
                }
                out += e.place(texts, cached.__getitem__)
            except Exception as e:
                out += [e] * len(part)
            finally:
                _ISOLATE.reset(token)
        return out

    async def abatch(
        self,
        inputs: list[Any],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[str]:
        if not return_exceptions or not inputs:
            return await super().abatch(
                inputs, config, return_exceptions=return_exceptions, **kwargs
            )
        out: list[Any] = []
        for part, confs in _parts(inputs, get_config_list(config, len(inputs))):
            prompts = [self._convert_input(x) for x in part]
            texts = [p.to_string() for p in prompts]
            token = _ISOLATE.set(frozenset(texts))
            try:
                result = await self.agenerate_prompt(prompts, **_per_prompt(confs), **kwargs)
                out += [g[0].text for g in result.generations]
            except _PartialFailure as e:
                cached = {
                    i: (await self.abatch([part[i]], confs[i], return_exceptions=True, **kwargs))[0]
                    for i in e.unmatched(texts)
                }
                out += e.place(texts, cached.__getitem__)
            except Exception as e:
                out += [e] * len(part)
            finally:
                _ISOLATE.reset(token)
        return out

    def _llm_output(self, gens: list[list[Generation]]) -> dict[str, Any]:
        return llm_output(gens, **self._llm_output_extra())

    def _concurrency(self) -> int:
        return self.max_concurrency or 1

    async def _aconcurrency(self) -> int:
        """``_concurrency`` for the async path (runtimes that must ask override)."""
        return self._concurrency()

    def _tokens_in_generate(self) -> bool:
        """Whether ``invoke``/``generate`` send tokens to callbacks.

        A ``streaming`` field says, where the class has one that means this.
        """
        return bool(getattr(self, "streaming", True)) if self._streaming_gates_tokens else True

    def _batches_natively(self) -> bool:
        return type(self)._generate_batch is not LocalLLM._generate_batch


class _Lifecycle:
    """Whether an instance (and its copies) was closed."""

    def __init__(self) -> None:
        self.closed = False
        self.lock = threading.Lock()


@dataclass
class Row:
    """One prompt's answer from a native batch, before stops are applied.

    ``pieces`` holds the text of each generated token in order (empty where a token
    completes no character yet), so the stop that ends the answer also ends its token
    count; ``prefix`` is text shown before the answer (an echoed prompt).
    """

    pieces: list[str]
    tally: Tally
    prefix: str = ""
    chunks: list[GenerationChunk] = field(default_factory=list)
    """After :meth:`finish`: the chunks a stream of this answer would have given."""

    def finish(self, stops: Sequence[str]) -> Generation:
        """Cut at the first stop and build usage, exactly as a stream would."""
        assembler = _Assembler(stops, self.tally)
        chunks = [assembler.feed(Echo(self.prefix))] if self.prefix else []
        for n, piece in enumerate(self.pieces, 1):
            chunks.append(assembler.feed(piece))
            if assembler.stopped:
                self.tally.completion_tokens = n
                break
        self.chunks = [c for c in chunks if c is not None] + [assembler.finish()]
        final = self.chunks[-1]
        body = "".join(c.text for c in self.chunks)
        return Generation(text=body, generation_info=final.generation_info)


def _parts(
    inputs: list[Any], configs: list[RunnableConfig]
) -> Iterator[tuple[list[Any], list[RunnableConfig]]]:
    """Sub-batches of ``max_concurrency`` prompts, as LangChain core's ``batch`` makes them."""
    size = configs[0].get("max_concurrency") or len(inputs)
    for i in range(0, len(inputs), size):
        yield inputs[i : i + size], [{**c, "max_concurrency": None} for c in configs[i : i + size]]


def _per_prompt(configs: list[RunnableConfig]) -> dict[str, Any]:
    return {
        key: [c.get(key) for c in configs] for key in ("callbacks", "tags", "metadata", "run_name")
    }


class Echo(str):
    """The prompt, given back in front of the answer (``echo``).

    No stop applies to it, and it is not a generated token.
    """

    __slots__ = ()


class _Assembler:
    """Stop handling and the final chunk with usage, shared by the sync and async loops."""

    def __init__(self, stops: Sequence[str], tally: Tally) -> None:
        self._stops = StopStream(stops)
        self._tally = tally

    @property
    def stopped(self) -> bool:
        return self._stops.stopped

    def feed(self, piece: str) -> GenerationChunk | None:
        if isinstance(piece, Echo):
            return GenerationChunk(text=str(piece)) if piece else None
        self._tally.mark_piece()
        text = self._stops.push(piece)
        return GenerationChunk(text=text) if text else None

    def finish(self) -> GenerationChunk:
        text = "" if self._stops.stopped else self._stops.flush()
        return GenerationChunk(text=text, generation_info=self._tally.info(self._stops.matched))


def _rebuild(cls: type[LocalLLM], args: dict[str, Any]) -> LocalLLM:
    return cls(**args)


def _check_prompts(prompts: Any) -> None:
    if isinstance(prompts, str) or not isinstance(prompts, list):
        msg = f"generate() takes a list of prompt strings, got {type(prompts).__name__}"
        raise TypeError(msg)
    for p in prompts:
        if not isinstance(p, str):
            msg = f"prompts must be strings, got {type(p).__name__}: {p!r:.60}"
            raise TypeError(msg)


def _join(chunks: Iterator[GenerationChunk]) -> Generation:
    total: GenerationChunk | None = None
    for chunk in chunks:
        total = chunk if total is None else total + chunk
    assert total is not None  # the stream always ends with a final chunk
    return Generation(text=total.text, generation_info=total.generation_info)


_ADAPTERS: dict[tuple[type, str], pydantic.TypeAdapter[Any]] = {}


def _field_adapter(cls: type[pydantic.BaseModel], name: str) -> pydantic.TypeAdapter[Any]:
    """A validator for one field, so per-call values obey the field's constraints."""
    key = (cls, name)
    if key not in _ADAPTERS:
        from typing import Annotated

        info = cls.model_fields[name]
        annotation: Any = info.annotation
        if info.metadata:
            annotation = Annotated[(annotation, *info.metadata)]
        _ADAPTERS[key] = pydantic.TypeAdapter(annotation)
    return _ADAPTERS[key]
