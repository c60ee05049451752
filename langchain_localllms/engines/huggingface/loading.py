"""Loading a transformers model: from a directory or the Hub cache, with torch or OpenVINO.

How a model is loaded is the only thing a backend changes (:data:`BACKENDS`): the
default backend loads torch models with ``AutoModelFor*``; ``"openvino"`` loads
``optimum.intel`` models (exporting a transformers directory once), whose
``generate`` takes the same arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from langchain_localllms.conversion import OPENVINO_WEIGHT_FORMATS, export_openvino
from langchain_localllms.core.hub import hub_snapshot, is_repo_id
from langchain_localllms.core.imports import require
from langchain_localllms.engines.huggingface.options import is_seq2seq_task


# -------------------------------------------------------------- model sources
def resolve_model_source(
    model_id: str, *, revision: str | None = None, cache_dir: str | None = None,
    local_files_only: bool | None = None, token: str | bool | None = None,
    force_download: bool = False, extra: str = "huggingface",
) -> tuple[str, bool]:  # fmt: skip
    """Where to load ``model_id`` from: a local directory, or its Hub cache snapshot.

    A Hub id is resolved by :func:`~langchain_localllms.core.hub.hub_snapshot`: the cache
    first, a download only on a miss and never offline.

    Returns:
        ``(source, offline)``: the directory to load, and whether to load it with
        ``local_files_only=True`` (always: every file is on this machine by then).

    Raises:
        FileNotFoundError: a path that does not exist, or a Hub id that is neither in
            the local cache nor downloadable now.
    """
    p = Path(model_id).expanduser()
    if p.is_dir():
        return str(p.resolve()), True
    if not is_repo_id(model_id):
        what = "a file, not a directory" if p.exists() else "not found"
        msg = (
            f"model directory {model_id!r} is {what} (resolved from {Path.cwd()}). "
            "Give the directory that holds config.json and the weights "
            "(what save_pretrained() writes)."
        )
        raise FileNotFoundError(msg)
    snapshot = hub_snapshot(
        model_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
        token=token, force_download=force_download, feature="HuggingFacePipeline",
        extra=extra,
    )  # fmt: skip
    return str(snapshot), True


# -------------------------------------------------------------------- backends
@dataclass
class LoadRequest:
    """What a backend needs to load a model."""

    source: str
    """A local directory or a Hub id (see :func:`resolve_model_source`)."""
    task: str
    device: Any
    device_map: Any
    load_kwargs: dict[str, Any]
    """``model_kwargs`` less the generation parameters."""
    offline: bool


def _torch_device(device: Any) -> Any:
    """The torch device for ``device`` (None: leave the model where it loads)."""
    torch = require("torch", feature="HuggingFacePipeline")
    if device is None or device == -1:
        return None
    if isinstance(device, bool) or (isinstance(device, int) and device < -1):
        msg = f"device={device!r}: use -1 or 'cpu' for the CPU, n >= 0 for CUDA GPU n"
        raise ValueError(msg)
    try:
        dev = torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    except (RuntimeError, TypeError) as e:
        msg = f"device={device!r} is not a torch device ('cpu', 'cuda:0', 'mps', or an int)"
        raise ValueError(msg) from e
    if dev.type == "cuda":
        count = torch.cuda.device_count()
        index = dev.index or 0
        if index >= count:
            msg = (
                f"device={device!r} asks for CUDA GPU {index}, but torch "
                f"{torch.__version__} sees {count} GPU(s) (CUDA available: "
                f"{torch.cuda.is_available()}). Use device=-1 or 'cpu' to run on the "
                "CPU, or install a CUDA build of torch on a machine with a GPU."
            )
            raise ValueError(msg)
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        msg = f"device={device!r}: this torch build or machine has no MPS (Apple GPU)"
        raise ValueError(msg)
    return dev


def _load_torch(req: LoadRequest) -> Any:
    """The default backend: ``AutoModelForCausalLM`` / ``AutoModelForSeq2SeqLM``."""
    transformers = require("transformers", feature="HuggingFacePipeline")
    seq2seq = is_seq2seq_task(req.task)
    auto = transformers.AutoModelForSeq2SeqLM if seq2seq else transformers.AutoModelForCausalLM
    device = _torch_device(req.device)
    kwargs = dict(req.load_kwargs)
    if req.device_map is not None:
        kwargs["device_map"] = req.device_map
    if req.offline:
        kwargs["local_files_only"] = True
    try:
        model = auto.from_pretrained(req.source, **kwargs)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        msg = (
            f"model_kwargs: {e}. A model_kwargs key must be a from_pretrained() option "
            "(dtype, revision, attn_implementation, ...), an attribute of the model's "
            "config, or a generation parameter (temperature, max_length, ...)."
        )
        raise ValueError(msg) from e
    except ValueError as e:
        if "Unrecognized configuration class" not in str(e):
            raise
        kind = "encoder-decoder (seq2seq)" if seq2seq else "decoder-only (causal LM)"
        msg = f"{req.source} is not a {kind} model, which task={req.task!r} needs: {e}"
        raise ValueError(msg) from e
    if device is not None:
        model.to(device)
    model.eval()
    return model


def _load_openvino(req: LoadRequest) -> Any:
    """``backend="openvino"``: optimum-intel's ``OVModelFor*``.

    ``model_id`` may be an exported OpenVINO directory (``openvino_model.xml``), or a
    plain transformers directory, which is exported once (``weight_format`` in
    ``model_kwargs``: fp32, fp16, int8 or int4) and cached under
    ``$LOCALLLMS_CACHE/openvino``. ``model_kwargs`` ``device`` ("CPU", "GPU", ...) and
    ``ov_config`` go to OpenVINO, as in LangChain's page.
    """
    intel = require("optimum.intel", feature='HuggingFacePipeline(backend="openvino")')
    seq2seq = is_seq2seq_task(req.task)
    cls = intel.OVModelForSeq2SeqLM if seq2seq else intel.OVModelForCausalLM
    kwargs = dict(req.load_kwargs)
    kwargs.pop("trust_remote_code", None)  # exported graphs run no Python from the model
    weight_format = kwargs.pop("weight_format", None)
    if weight_format is not None and weight_format not in OPENVINO_WEIGHT_FORMATS:
        msg = f"weight_format={weight_format!r}: choose one of {', '.join(OPENVINO_WEIGHT_FORMATS)}"
        raise ValueError(msg)
    device = kwargs.pop("device", None)
    if device is None:
        device = "CPU" if req.device in (None, -1, "cpu") else str(req.device).upper()
    if req.device_map is not None:
        msg = "device_map is for torch models; OpenVINO takes model_kwargs={'device': 'CPU'}"
        raise ValueError(msg)
    source = Path(req.source)
    xml = "openvino_model.xml" if not seq2seq else "openvino_encoder_model.xml"
    if not (source / xml).is_file():
        source = export_openvino(cls, source, weight_format)
    elif weight_format is not None:
        msg = (
            f"{source} is already exported to OpenVINO; weight_format applies when "
            "exporting a transformers directory (or use optimum-cli --weight-format)"
        )
        raise ValueError(msg)
    try:
        return cls.from_pretrained(str(source), device=device, **kwargs)
    except RuntimeError as e:
        msg = f"OpenVINO could not load {source} on device {device!r}: {e}"
        raise ValueError(msg) from e


#: backend name -> loader. A loader returns a model whose ``generate`` takes the
#: arguments of transformers' ``GenerationMixin.generate``; everything else is shared.
BACKENDS: dict[str, Callable[[LoadRequest], Any]] = {
    "default": _load_torch,
    "openvino": _load_openvino,
}


class NoPipeline:
    """Stands in for ``hf.pipeline`` where transformers has no pipeline for the task.

    transformers 5 removed the text2text-generation, summarization and translation
    pipelines; the model and tokenizer still generate, through this class.
    """

    def __init__(self, task: str, model: Any, tokenizer: Any) -> None:
        self.task = task
        self.model = model
        self.tokenizer = tokenizer
        self.device = getattr(model, "device", None)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Refuse: transformers has no pipeline for this task to call."""
        msg = (
            f"this transformers version has no {self.task!r} pipeline to call; use "
            "the HuggingFacePipeline instance (invoke, stream, batch) instead"
        )
        raise NotImplementedError(msg)

    def __repr__(self) -> str:
        return f"<model and tokenizer for {self.task!r}: {type(self.model).__name__}>"


def runs_on_cpu(model: Any) -> bool:
    """Whether the model computes on the CPU (OpenVINO models name their device)."""
    ov_device = getattr(model, "_device", None)
    if isinstance(ov_device, str):
        return ov_device.upper().startswith("CPU")
    device = getattr(model, "device", None)
    return getattr(device, "type", "cpu") == "cpu"
