"""Hugging Face ``transformers`` models in this process (torch; OpenVINO slots in).

The class keeps the API of ``langchain_huggingface.HuggingFacePipeline`` (and of
``langchain_community``'s), but generates with ``model.generate`` on token ids itself,
so the answer is the decoded *new* token ids: the prompt is never echoed, whatever
the tokenizer does with spaces (``return_full_text=True`` asks for it explicitly).

The work lives in :mod:`langchain_localllms.engines.huggingface`: ``options`` (how
generation parameters merge, and which are refused), ``loading`` (directories, the Hub
cache, torch and OpenVINO) and ``generation`` (the engine: streaming, batches, stops,
grammars). This class is the LangChain face over them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

from langchain_core.language_models.base import LangSmithParams
from pydantic import Field, PrivateAttr, field_validator
from typing_extensions import override

from langchain_localllms.core.events import Row, Tally
from langchain_localllms.core.imports import require
from langchain_localllms.core.requests import Call
from langchain_localllms.engines.huggingface.generation import HFEngine
from langchain_localllms.engines.huggingface.loading import (
    BACKENDS,
    LoadRequest,
    NoPipeline,
    resolve_model_source,
    runs_on_cpu,
)
from langchain_localllms.engines.huggingface.options import (
    CONFIG_AND_GENERATION,
    CPU_BATCH_SIZE,
    DEFAULT_BATCH_SIZE,
    DEFAULT_MODEL_ID,
    DEFAULT_TASK,
    HUB_KWARGS,
    VALID_TASKS,
    Layer,
    Settings,
    generation_keys,
    is_seq2seq_task,
    parse_options,
    pipeline_defaults,
    pipeline_layer,
    resolve,
    valid_task,
)
from langchain_localllms.grammars import GrammarField
from langchain_localllms.llms._base import LocalLLM
from langchain_localllms.prompts import ModelInfo

__all__ = ["VALID_TASKS", "HuggingFacePipeline", "resolve_model_source"]


# ---------------------------------------------------------------- the class
class HuggingFacePipeline(LocalLLM):
    """A Hugging Face ``transformers`` model run in this process.

    A drop-in for ``langchain_huggingface.HuggingFacePipeline`` that never echoes the
    prompt, streams tokens from a worker thread, stops on strings of any length,
    batches prompts in one ``generate`` call, reports usage, and takes grammars.

    Setup:
        .. code-block:: bash

            pip install "langchain-localllms[huggingface]"

    Key init args:
        model_id: a local model directory (offline) or a Hugging Face Hub id.
        task: ``"text-generation"`` (decoder-only) or ``"text2text-generation"``
            (encoder-decoder; ``"summarization"``/``"translation"`` are aliases).
        device / device_map: where the model runs (-1 or "cpu", 0 for cuda:0, "auto").
        model_kwargs: for ``from_pretrained`` (``dtype``, ``revision`` ...); generation
            parameters there (``temperature``, ``max_length``) apply to generation.
        pipeline_kwargs: generation parameters (``max_new_tokens``, ``temperature``,
            ``do_sample``, ``top_k``, ``top_p``, ``repetition_penalty`` ...).
        batch_size: prompts per ``generate`` call in ``batch``/``generate``.
        grammar: constrain the output (GBNF, JSON schema, pydantic model).

    Instantiate:
        .. code-block:: python

            from langchain_localllms import HuggingFacePipeline

            hf = HuggingFacePipeline.from_model_id(
                model_id="path/to/model",
                task="text-generation",
                pipeline_kwargs={"max_new_tokens": 10},
            )
            # or from a transformers pipeline:
            hf = HuggingFacePipeline(pipeline=pipe)

    Invoke:
        .. code-block:: python

            hf.invoke("The first man on the moon was")

    Stream:
        .. code-block:: python

            for piece in hf.stream("The first man on the moon was"):
                print(piece, end="", flush=True)

    Async:
        .. code-block:: python

            await hf.ainvoke("The first man on the moon was")
            await hf.abatch(["One, two,", "Red, green,"])
    """

    pipeline: Any = None
    """A ``transformers`` pipeline to run (text-generation or text2text-generation);
    :meth:`from_model_id` makes one. Its model and tokenizer are used directly."""
    model_id: str | None = None
    """The model: a local directory or a Hub id. With ``pipeline=`` it is only a name
    (default: the pipeline model's ``name_or_path``)."""
    task: str | None = None
    """What the model does: one of ``VALID_TASKS`` (default: text-generation, or the
    pipeline's task)."""
    backend: str = "default"
    """How the model is loaded: ``"default"`` (torch) or ``"openvino"`` (optimum-intel)."""
    device: int | str | None = None
    """Where the loaded model runs: -1 or ``"cpu"``, an int n for ``cuda:n``, or a
    torch device string. Not together with ``device_map``."""
    device_map: str | dict[str, Any] | None = None
    """Accelerate's placement of the weights (``"auto"`` spreads them over devices)."""
    model_kwargs: dict[str, Any] | None = None
    """Keyword arguments for ``from_pretrained`` of the model (and of the tokenizer, for
    ``revision``/``cache_dir``/``token``/``trust_remote_code``...). Generation
    parameters among them apply to generation; anything unknown is an error."""
    pipeline_kwargs: dict[str, Any] | None = None
    """Generation parameters (any ``GenerationConfig`` field) and the pipeline options
    ``return_full_text``, ``prefix``, ``add_special_tokens``. Per call too:
    ``llm.invoke(p, pipeline_kwargs={...})``."""
    batch_size: int | None = Field(default=None, ge=1)
    """Prompts per ``generate`` call when several are given (1: one at a time, with
    per-token callbacks). None: 16 when the model runs on a CPU, 4 on an accelerator."""

    max_new_tokens: int | None = Field(default=None, ge=1)
    """Most tokens to generate (default: the pipeline's, 256 in transformers 5)."""
    temperature: float | None = Field(default=None, ge=0)
    """Sampling temperature; 0 is greedy. A positive one turns sampling on unless
    ``do_sample`` says otherwise."""
    do_sample: bool | None = None
    """Sample (True) or pick the likeliest token (False)."""
    top_k: int | None = Field(default=None, ge=0)
    """Top-k sampling (0: off)."""
    top_p: float | None = Field(default=None, gt=0, le=1)
    """Nucleus sampling."""
    repetition_penalty: float | None = Field(default=None, gt=0)
    """Penalty for repeating tokens (1: off)."""
    seed: int | None = None
    """Seed torch's generator before each call, for repeatable sampling."""
    grammar: GrammarField = None
    """Constrain the output: GBNF text, a :class:`Grammar`, a JSON schema dict or a
    pydantic model class (decoded through an llguidance mask)."""

    schema_engine: ClassVar[str | None] = "llguidance"
    call_fields: ClassVar[tuple[str, ...]] = (
        "max_new_tokens", "temperature", "do_sample", "top_k", "top_p",
        "repetition_penalty", "seed", "grammar",
    )  # fmt: skip
    call_only: ClassVar[tuple[str, ...]] = ("pipeline_kwargs", "skip_prompt")
    _live_fields: ClassVar[tuple[str, ...]] = ("batch_size",)
    _shared_fields: ClassVar[tuple[str, ...]] = ("pipeline",)
    max_tokens_field: ClassVar[str | None] = "max_new_tokens"
    _gen_fields: ClassVar[tuple[str, ...]] = call_fields[:6]

    _engine: HFEngine | None = PrivateAttr(default=None)
    _on_cpu: bool = PrivateAttr(default=True)
    _layers: list[Layer] = PrivateAttr(default_factory=list)
    _model_set: dict[str, Any] = PrivateAttr(default_factory=dict)
    _defaults: dict[str, Any] = PrivateAttr(default_factory=dict)
    _source: str = PrivateAttr(default="")

    @field_validator("device", mode="before")
    @classmethod
    def _device_as_str(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, (int, str)):
            return str(value)  # a torch.device
        return value

    # ------------------------------------------------------------- loading
    @classmethod
    def from_model_id(
        cls,
        model_id: str,
        task: str,
        backend: str = "default",
        device: int | str | None = None,
        device_map: str | dict[str, Any] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        pipeline_kwargs: dict[str, Any] | None = None,
        batch_size: int | None = None,
        **kwargs: Any,
    ) -> HuggingFacePipeline:
        """Load ``model_id`` (a local directory, or a Hub id) for ``task``.

        Args:
            model_id: A directory written by ``save_pretrained`` (loads offline), or
                a Hub id: resolved in the Hugging Face Hub cache first, without the
                network (huggingface_hub's ``snapshot_download``), and downloaded only
                if not cached -- never with ``local_files_only=True`` in
                ``model_kwargs`` or ``HF_HUB_OFFLINE=1``, where a miss is a
                ``FileNotFoundError`` saying what to run. ``revision``, ``cache_dir``
                and ``token`` in ``model_kwargs`` apply to this; ``model_id`` stays
                the Hub id, and the snapshot directory (its commit in the path) is
                what loads and what the cache key holds.
            task: ``"text-generation"``, ``"text2text-generation"``,
                ``"summarization"`` or ``"translation"``.
            backend: ``"default"`` (torch) or ``"openvino"`` (optimum-intel).
            device: -1 or ``"cpu"``; n for ``cuda:n``; any torch device string.
            device_map: Accelerate's weight placement, e.g. ``"auto"``.
            model_kwargs: ``from_pretrained`` options, and generation parameters.
            pipeline_kwargs: Generation parameters and pipeline options.
            batch_size: Prompts per ``generate`` call (None: 16 on a CPU, else 4).
            **kwargs: Other fields (``callbacks``, ``stop``, ``temperature``, ...).
        """
        return cls(
            model_id=model_id,
            task=task,
            backend=backend,
            device=device,
            device_map=device_map,
            model_kwargs=model_kwargs,
            pipeline_kwargs=pipeline_kwargs,
            batch_size=batch_size,
            **kwargs,
        )

    def _setup(self) -> None:
        if self.backend not in BACKENDS:
            msg = (
                f"backend={self.backend!r} is not one this class has; choose from "
                f"{', '.join(map(repr, BACKENDS))}"
            )
            raise ValueError(msg)
        if self.task is not None and not valid_task(self.task):
            msg = f"task={self.task!r} is not supported; choose from {', '.join(VALID_TASKS)}"
            raise ValueError(msg)
        model_kwargs = dict(self.model_kwargs or {})
        gen_kwargs = {
            k: model_kwargs.pop(k)
            for k in list(model_kwargs)
            if k in generation_keys() and k not in CONFIG_AND_GENERATION
        }
        gen_kwargs.update({k: model_kwargs[k] for k in CONFIG_AND_GENERATION if k in model_kwargs})
        # Check every option before loading anything.
        layers = [
            parse_options(gen_kwargs, "model_kwargs"),
            parse_options(self.pipeline_kwargs, "pipeline_kwargs"),
        ]
        given = set(layers[0].generate) | set(layers[1].generate)
        twice = sorted(n for n in self._gen_fields if getattr(self, n) is not None and n in given)
        if twice:
            msg = (
                f"{', '.join(twice)} given both as a field and in model_kwargs/"
                "pipeline_kwargs; give each in one place"
            )
            raise ValueError(msg)
        if self.pipeline is None:
            self._load(model_kwargs)
        else:
            self._adopt(model_kwargs)
        self._layers.extend(layers)
        self._model_set = {
            k: v
            for k, v in self.engine.model.generation_config.to_diff_dict().items()
            if k != "transformers_version"
        }
        self._settings({n: getattr(self, n) for n in self.call_fields})  # check now
        if self.grammar is not None:
            self.engine.compiled(self.grammar)

    def _load(self, model_kwargs: dict[str, Any]) -> None:
        """Load model and tokenizer from ``model_id`` with the chosen backend."""
        if self.model_id is None:
            msg = (
                "give model_id= (a local model directory or a Hub id) or pipeline= "
                "(a transformers pipeline); see HuggingFacePipeline.from_model_id"
            )
            raise ValueError(msg)
        if self.device_map is not None and self.device not in (None, -1):
            msg = (
                f"give device ({self.device!r}) or device_map ({self.device_map!r}), "
                "not both: device_map lets accelerate place the weights"
            )
            raise ValueError(msg)
        if self.device_map is not None and "device_map" in model_kwargs:
            msg = "device_map is given both as an argument and in model_kwargs"
            raise ValueError(msg)
        transformers = require("transformers", feature="HuggingFacePipeline")
        task = self.task or DEFAULT_TASK
        model_kwargs.setdefault("trust_remote_code", False)
        source, offline = resolve_model_source(
            self.model_id,
            revision=model_kwargs.get("revision"),
            cache_dir=model_kwargs.get("cache_dir"),
            local_files_only=model_kwargs.get("local_files_only"),
            token=model_kwargs.get("token"),
            force_download=bool(model_kwargs.get("force_download")),
            extra="openvino" if self.backend == "openvino" else "huggingface",
        )
        self._source = source
        request = LoadRequest(
            source=source,
            task=task,
            device=self.device,
            device_map=self.device_map,
            load_kwargs=model_kwargs,
            offline=offline,
        )
        model = BACKENDS[self.backend](request)
        self._on_cpu = runs_on_cpu(model)
        tok_kwargs = {k: model_kwargs[k] for k in HUB_KWARGS if k in model_kwargs}
        if offline:
            tok_kwargs["local_files_only"] = True
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, **tok_kwargs)
        if tokenizer.pad_token_id is None:  # as langchain_huggingface does, for batches
            eos = model.generation_config.eos_token_id
            tokenizer.pad_token_id = eos[0] if isinstance(eos, list) else eos
        pipe_kwargs = dict(self.pipeline_kwargs or {})
        if is_seq2seq_task(task):
            try:
                pipe = transformers.pipeline(
                    task=task, model=model, tokenizer=tokenizer,
                    batch_size=self.rows_per_generate(),
                    **pipe_kwargs,
                )  # fmt: skip
            except KeyError:  # transformers 5 removed the seq2seq pipelines
                pipe = NoPipeline(task, model, tokenizer)
        else:
            pipe = transformers.pipeline(
                task=task, model=model, tokenizer=tokenizer,
                batch_size=self.rows_per_generate(),
                **pipe_kwargs,
            )  # fmt: skip
        self.pipeline = pipe
        self.task = task
        self._engine = HFEngine(model, tokenizer)
        self._defaults = pipeline_defaults(pipe)

    def _adopt(self, model_kwargs: dict[str, Any]) -> None:
        """Use the model and tokenizer of a ready-made transformers pipeline."""
        pipe = self.pipeline
        task = getattr(pipe, "task", None)
        model = getattr(pipe, "model", None)
        tokenizer = getattr(pipe, "tokenizer", None)
        if model is None or tokenizer is None or not hasattr(model, "generate"):
            msg = (
                "pipeline= must be a transformers text-generation (or text2text-"
                f"generation) pipeline with a tokenizer; got {type(pipe).__name__}"
            )
            raise ValueError(msg)
        if not valid_task(task):
            tasks = ", ".join(VALID_TASKS)
            msg = f"the pipeline's task {task!r} is not supported; use one of {tasks}"
            raise ValueError(msg)
        if self.task is not None and self.task != task:
            msg = f"task={self.task!r} but the pipeline's task is {task!r}"
            raise ValueError(msg)
        if self.device not in (None, -1) or self.device_map is not None:
            msg = (
                "device/device_map apply when this class loads the model; the "
                "pipeline's model is already placed (move it with pipe.model.to(...))"
            )
            raise ValueError(msg)
        if model_kwargs:
            msg = (
                f"model_kwargs {sorted(model_kwargs)} apply when this class loads the "
                "model (from_model_id); with pipeline= only generation parameters can "
                "be given there"
            )
            raise ValueError(msg)
        self.task = task
        if self.model_id is None:
            self.model_id = getattr(model, "name_or_path", None) or DEFAULT_MODEL_ID
        self._source = self.model_id
        self._engine = HFEngine(model, tokenizer)
        self._on_cpu = runs_on_cpu(model)
        self._defaults = pipeline_defaults(pipe)
        self._layers.append(pipeline_layer(pipe))

    def _release(self) -> None:
        super()._release()
        if self._init_args.get("pipeline") is None and self.pipeline is not None:
            # The pipeline this class built (copies hold it too) lets go of the model.
            # A pipeline given with pipeline= is the caller's: its model goes with it.
            self.pipeline.model = self.pipeline.tokenizer = None

    @property
    def engine(self) -> HFEngine:
        """The runtime engine this LLM runs on (no LangChain in it)."""
        engine = super().engine
        assert isinstance(engine, HFEngine)
        return engine

    # ------------------------------------------------------------ identity
    @property
    def _llm_type(self) -> str:
        return "huggingface_pipeline"

    @property
    def model(self) -> Any:
        """The underlying ``transformers`` model."""
        return self.engine.model

    @property
    def tokenizer(self) -> Any:
        """The underlying tokenizer."""
        return self.engine.tokenizer

    @override
    def ls_model_name(self) -> str:
        return str(self.model_id)

    def _identity(self) -> dict[str, Any]:
        settings = self._settings({n: getattr(self, n) for n in self.call_fields})
        return {
            "model_id": self._source or self.model_id,
            "task": self.task,
            "backend": self.backend,
            "device": str(getattr(self.model, "device", "")),
            "dtype": str(getattr(self.model, "dtype", "")),
            "model_kwargs": self.model_kwargs,
            "generation": settings.identity(),
            **super()._identity(),
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        gen = self._settings({n: getattr(self, n) for n in self.call_fields}).generate
        if "ls_temperature" not in params and gen.get("temperature") is not None:
            params["ls_temperature"] = gen["temperature"]
        if "ls_max_tokens" not in params and gen.get("max_new_tokens") is not None:
            params["ls_max_tokens"] = gen["max_new_tokens"]
        return params

    def model_info(self) -> ModelInfo:
        """Architecture, chat template and special tokens from the model and tokenizer."""
        engine = self.engine
        tok = engine.tokenizer
        with engine.tok_lock:
            ids = tok("a")["input_ids"]
        bos = tok.bos_token_id
        return ModelInfo(
            runtime=self._llm_type,
            model=self.ls_model_name(),
            architecture=getattr(engine.model.config, "model_type", None),
            chat_template=getattr(tok, "chat_template", None),
            bos_token=tok.bos_token or "",
            eos_token=tok.eos_token or "",
            adds_bos=bool(ids) and bos is not None and ids[0] == bos,
            context_length=getattr(
                engine.model.config.get_text_config(), "max_position_embeddings", None
            ),
        )

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` in this model's vocabulary (no special tokens)."""
        return self.engine.token_ids(text)

    # ------------------------------------------------------------ settings
    def _settings(
        self, params: Mapping[str, Any], call_options: Mapping[str, Any] | None = None
    ) -> Settings:
        fields = Layer(
            generate={n: params[n] for n in self._gen_fields if params.get(n) is not None}
        )
        layers = [*self._layers, fields]
        if call_options:
            layers.append(parse_options(call_options.get("pipeline_kwargs"), "pipeline_kwargs"))
            if call_options.get("skip_prompt") is not None:
                layers.append(Layer(echo=not call_options["skip_prompt"]))
        out = resolve(layers, self._model_set, self._defaults)
        out.grammar = params.get("grammar")  # a Grammar: fields coerce it, also per call
        out.seed = params.get("seed")
        return out

    def _call_settings(self, call: Call) -> Settings:
        options = {k: call.params.get(k) for k in self.call_only}
        return self._settings(call.params, options)

    # ---------------------------------------------------------- generation
    def _pieces(self, prompt: str, call: Call, tally: Tally) -> Iterator[str]:
        request = dataclasses.replace(call, request=self._call_settings(call))
        yield from self.engine.pieces(prompt, request, tally)

    def rows_per_generate(self) -> int:
        """How many prompts one ``generate`` call of a batch takes.

        ``batch_size``, or the device's default where it is None.
        """
        if self.batch_size is not None:
            return self.batch_size
        return CPU_BATCH_SIZE if self._on_cpu else DEFAULT_BATCH_SIZE

    def _generate_batch(self, prompts: list[str], call: Call) -> list[Row] | None:
        rows = self.rows_per_generate()
        if rows <= 1:
            return None  # one at a time through the stream, with token callbacks
        engine = self.engine
        request = dataclasses.replace(call, request=self._call_settings(call))
        return engine.rows(prompts, request, per_call=rows)
