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

import json
import threading
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any, ClassVar

import pydantic
from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    BaseCallbackManager,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models.base import LangSmithParams
from langchain_core.outputs import GenerationChunk
from langchain_core.runnables import Runnable, RunnableLambda
from pydantic import ConfigDict, Field, field_validator, model_validator
from typing_extensions import Self

from langchain_localllms.core.errors import ClosedError
from langchain_localllms.core.events import Tally
from langchain_localllms.core.redact import redact
from langchain_localllms.core.requests import Call, Refused, refuse
from langchain_localllms.core.stops import check_stops
from langchain_localllms.core.threads import iterate_in_thread, run_in_thread
from langchain_localllms.llms._assemble import Assembler
from langchain_localllms.llms._batching import CALL_OPTIONS, BatchedLLM
from langchain_localllms.prompts import ModelInfo

#: The ``_stream``/``_astream`` option (for this package's chat models) that ends a
#: generation early: a callable asked after each chunk; True stops decoding, and the
#: final chunk still carries the usage so far.
UNTIL = "_until"


def identity_value(value: Any) -> Any:
    """Render a parameter so that equal behaviour gives equal cache keys."""
    if hasattr(value, "identity"):
        return value.identity
    if isinstance(value, type) and issubclass(value, pydantic.BaseModel):
        return json.dumps(value.model_json_schema(), sort_keys=True)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, default=repr)
    return value


class LocalLLM(BatchedLLM):
    """Base class of every runtime in this package (not used directly)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, protected_namespaces=())

    stop: list[str] | None = None
    """Stop sequences: the answer ends before the first one (which is not included).
    Give them here or per call, not both."""

    max_concurrency: int | None = Field(default=1, ge=1)
    """How many prompts of a batch run at once (beyond the runtime's own batching);
    None: the runtime's own choice (one at a time in this process)."""

    #: Fields that may also be given per call (``llm.invoke(p, temperature=0)``).
    call_fields: ClassVar[tuple[str, ...]] = ()
    #: Fields that hold loaded runtime objects (a pipeline, a tokenizer): copies share
    #: them, as they share what ``_setup`` loaded.
    _shared_fields: ClassVar[tuple[str, ...]] = ()
    #: Fields read at every call rather than when loading (a copy may change them).
    _live_fields: ClassVar[tuple[str, ...]] = ()
    #: Options that exist only per call or need no field (e.g. ``grammar``).
    call_only: ClassVar[tuple[str, ...]] = ()
    #: The engine that enforces JSON schemas while decoding, a key of
    #: ``grammars.schemas.ENGINES`` (None: the runtime does not constrain decoding), and
    #: the one for tool calls where it differs.
    schema_engine: ClassVar[str | None] = None
    tool_schema_engine: ClassVar[str | None] = None
    #: Whether a ``streaming`` field decides if ``invoke`` sends tokens to callbacks.
    _streaming_gates_tokens: ClassVar[bool] = False
    #: Names of the fields LangSmith reports as temperature / max tokens.
    temperature_field: ClassVar[str | None] = "temperature"
    max_tokens_field: ClassVar[str | None] = "max_tokens"

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
        reload = sorted(set(update or {}) & self.load_fields())
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
        a closed instance raises :class:`~langchain_localllms.core.errors.ClosedError`.
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

    @property
    def engine(self) -> Any:
        """The runtime engine this LLM runs on (no LangChain in it).

        For code that works at the runtime's level: the chat class over this LLM,
        benchmarks, tests. Raises ``ClosedError`` once the LLM was closed.
        """
        self._check_open()
        engine = getattr(self, "_engine", None)
        if engine is None:
            msg = f"{type(self).__name__} has no engine"
            raise NotImplementedError(msg)
        return engine

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
    def standard_fields(cls) -> dict[str, str | None]:
        """LangChain's standard setting names -> this class's field (None: it has none)."""
        return {"max_tokens": cls.max_tokens_field, "temperature": cls.temperature_field}

    @classmethod
    def load_fields(cls) -> set[str]:
        """Fields read when the model is loaded (all but per-call and LangChain ones)."""
        live = {*cls.call_fields, *cls._live_fields}
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
        return {name: getattr(self, name) for name in self.call_fields}

    @property
    def _identifying_params(self) -> dict[str, Any]:
        # Also the cache key and every callback's invocation_params: no credentials.
        params = {k: identity_value(redact(v, k)) for k, v in self._identity().items()}
        params["stop"] = self.stop
        call = CALL_OPTIONS.get()
        if call:
            params["call_options"] = {
                k: identity_value(redact(v, k)) for k, v in sorted(call.items())
            }
        return params

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            yield name, redact(value, name)

    def ls_model_name(self) -> str:
        return self._llm_type

    def model_info(self) -> ModelInfo:
        """What this runtime knows of its model (architecture, chat template, ...)."""
        return ModelInfo(runtime=self._llm_type, model=self.ls_model_name())

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = self._llm_type
        params["ls_model_name"] = self.ls_model_name()
        for key, name in (
            ("ls_temperature", self.temperature_field),
            ("ls_max_tokens", self.max_tokens_field),
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

        if "grammar" not in (*self.call_fields, *self.call_only):
            msg = f"{type(self).__name__} cannot constrain decoding with a grammar"
            raise NotImplementedError(msg)
        from langchain_localllms.grammars.schemas import prepare

        g = Grammar.coerce(grammar)
        if g.schema is not None:
            prepare(g.schema, self.schema_engine, strict=not g.lenient)
        return self.bind(grammar=g) | RunnableLambda(g.parse, name="parse_grammar_output")

    # ------------------------------------------------------------ call options
    def _check_call_options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Validate per-call options; an unknown one is an error, never dropped."""
        kwargs = refuse(self._refused, kwargs, type(self).__name__)
        allowed = set(self.call_fields) | set(self.call_only)
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

    def resolve_call(self, stop: list[str] | None, kwargs: dict[str, Any]) -> Call:
        """One call's parameters: the instance's defaults merged with its options, checked.

        For faces that drive this LLM's engine themselves (the chat classes).
        """
        self._check_open()
        if stop is not None and self.stop:  # stop=[] at init: no stop sequences
            msg = (
                f"stop was given both to {type(self).__name__}(stop=...) and to this "
                "call; give it in one place"
            )
            raise ValueError(msg)
        options = self._check_call_options(kwargs)
        params = {name: getattr(self, name) for name in self.call_fields}
        params.update(options)
        return Call(params=params, stops=check_stops(stop or self.stop))

    # --------------------------------------------------------- runtime hooks
    def _pieces(self, prompt: str, call: Call, tally: Tally) -> Iterator[str]:
        raise NotImplementedError

    async def _apieces(self, prompt: str, call: Call, tally: Tally) -> AsyncIterator[str]:
        """Native async runtimes override; others run ``_pieces`` in a worker thread."""
        async for piece in iterate_in_thread(lambda: self._pieces(prompt, call, tally)):
            yield piece

    def choose(self, prompt: str, options: list[str]) -> int | None:
        """Which of ``options`` the model would write after ``prompt``, if it can say.

        None: the runtime cannot score text. For runtimes without grammars: a choice
        among fixed continuations (which tool to call) that is still the model's.
        """
        return None

    def _llm_output_extra(self) -> dict[str, Any]:
        return {"model_name": self.ls_model_name()}

    # ----------------------------------------------------------- LangChain API
    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        until = kwargs.pop(UNTIL, None)
        call = self.resolve_call(stop, kwargs)
        tally = Tally()
        assembler = Assembler(call.stops, tally)
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
        call = self.resolve_call(stop, kwargs)
        tally = Tally()
        assembler = Assembler(call.stops, tally)
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


class _Lifecycle:
    """Whether an instance (and its copies) was closed."""

    def __init__(self) -> None:
        self.closed = False
        self.lock = threading.Lock()


def _rebuild(cls: type[LocalLLM], args: dict[str, Any]) -> LocalLLM:
    return cls(**args)


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


def standard_names(llm_class: type[LocalLLM], values: Mapping[str, Any]) -> dict[str, Any]:
    """LangChain's standard setting names in the runtime's own.

    ``max_tokens``, ``temperature`` and a server's ``timeout`` become ``max_length`` /
    ``sampling_temperature`` on CTranslate2, ``temp`` on GPT4All, ``n_predict`` on
    Llamafile, ...

    A standard name set to None is not set. Both names given is an error.
    """
    out = dict(values)
    for standard, own in llm_class.standard_fields().items():
        if standard not in out or standard in llm_class.model_fields or not own:
            continue
        value = out.pop(standard)
        if value is None:
            continue
        if out.get(own) is not None:
            msg = f"give {standard} or {own} (the same setting), not both"
            raise ValueError(msg)
        out[own] = value
    return out
