"""Converting a Hugging Face model directory for a runtime, once, into the cache.

* :func:`convert_to_ctranslate2` — what ``CTranslate2.from_pretrained`` runs
  (``ct2-transformers-converter`` as a function), cached in ``$LOCALLLMS_CACHE/ct2``;
* :func:`export_openvino` — what ``HuggingFacePipeline(backend="openvino")`` runs on a
  transformers directory (``optimum-cli export openvino``), cached in
  ``$LOCALLLMS_CACHE/openvino``.

Both are keyed by what the result depends on and built with
:func:`~langchain_localllms.core.files.build_once`, so an interrupted conversion leaves
nothing behind and a finished one is reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from langchain_localllms.core.files import build_once, cache_root, progress, working
from langchain_localllms.core.imports import require

__all__ = ["QUANTIZATIONS", "conversion_key", "convert_to_ctranslate2", "export_openvino"]

#: What CTranslate2's converter takes as ``quantization`` (``None``: the weights' type).
QUANTIZATIONS = (
    "int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16", "float16",
    "bfloat16", "float32",
)  # fmt: skip
#: Files of a Hugging Face model directory that a conversion copies (the tokenizer).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model",
    "sentencepiece.bpe.model", "generation_config.json", "chat_template.jinja",
    "chat_template.json",
)  # fmt: skip
OPENVINO_WEIGHT_FORMATS = ("fp32", "fp16", "int8", "int4")


# ------------------------------------------------------------------- CTranslate2
def _hf_dir(path: str | os.PathLike[str]) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        msg = (
            f"Hugging Face model directory not found: {p}. Give a local model "
            "directory, or a Hub id (`org/name`) to take the model from the Hugging "
            "Face cache (`hf download <name>` puts it there)."
        )
        raise FileNotFoundError(msg)
    if not p.is_dir():
        msg = f"{p} is a file; give the Hugging Face model directory"
        raise NotADirectoryError(msg)
    if (p / "model.bin").is_file():
        msg = f"{p} is already a CTranslate2 model: use CTranslate2(model_path={str(p)!r})"
        raise ValueError(msg)
    if not (p / "config.json").is_file():
        msg = f"{p} is not a Hugging Face model directory: it has no config.json"
        raise ValueError(msg)
    return p


def conversion_key(source: Path, quantization: str | None, version: str) -> str:
    """A short hash of what a conversion depends on.

    The source directory's resolved path, the name, size and modification time of each
    file in it, the quantization and the CTranslate2 version: change any and the
    model is converted again.
    """
    files = sorted(
        (f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in source.iterdir() if f.is_file()
    )
    blob = json.dumps(
        {
            "source": str(source.resolve()),
            "files": files,
            "quantization": quantization,
            "ctranslate2": version,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _source_name(src: Path) -> str:
    """A readable name for a conversion: the directory's own, or ``org--name-<commit>``.

    The latter for a snapshot of the Hugging Face Hub cache, whose own name is the commit.
    """
    real = src.resolve()
    repo = real.parent.parent.name
    if real.parent.name == "snapshots" and repo.startswith("models--"):
        return f"{repo.removeprefix('models--')}-{real.name[:12]}"
    return real.name


def trained_context(config_json: Path) -> int | None:
    """The context a Hugging Face model was trained for, from its ``config.json``."""
    try:
        config = json.loads(config_json.read_text())
    except (OSError, ValueError):
        return None
    for section in (config, config.get("text_config") or {}):
        value = section.get("max_position_embeddings")
        if isinstance(value, int) and value > 0:
            return value
    return None


def _is_converted(path: Path) -> bool:
    return (path / "model.bin").is_file() and (path / "config.json").is_file()


def convert_to_ctranslate2(
    model_dir: str | os.PathLike[str],
    quantization: str | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
    show_progress: bool = True,
) -> Path:
    """Convert a Hugging Face model directory to CTranslate2 once; return the copy.

    The tokenizer files are copied along. The result is cached under a key of the
    source (path, file sizes and times), the quantization and the CTranslate2
    version, and written atomically, so an interrupted conversion leaves nothing.

    Raises:
        FileNotFoundError: ``model_dir`` does not exist.
        ValueError: ``model_dir`` is not a Hugging Face model, ``quantization`` is
            unknown, or CTranslate2 cannot convert this architecture.
    """
    if quantization is not None and quantization not in QUANTIZATIONS:
        msg = f"quantization {quantization!r} is not one of {', '.join(QUANTIZATIONS)} (or None)"
        raise ValueError(msg)
    src = _hf_dir(model_dir)
    ct2 = require("ctranslate2", feature="CTranslate2.from_pretrained")
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root("ct2")
    key = conversion_key(src, quantization, ct2.__version__)
    target = root / f"{_source_name(src)}-{quantization or 'default'}-{key}"
    if _is_converted(target) and not force:
        progress(f"using the CTranslate2 conversion of {src} in {target}", show=show_progress)
        return target
    require("torch", feature="CTranslate2.from_pretrained (conversion loads the model)")
    converters = require("ctranslate2.converters", feature="CTranslate2.from_pretrained")

    def build(tmp: Path) -> None:
        progress(
            f"converting {src} to CTranslate2 ({quantization or 'weights as saved'}) -> "
            f"{target} (once; later calls reuse it)",
            show=show_progress,
        )
        began = time.perf_counter()
        copy = [name for name in TOKENIZER_FILES if (src / name).is_file()]
        try:
            with working(f"converting {_source_name(src)} to CTranslate2", show=show_progress):
                converter = converters.TransformersConverter(str(src), copy_files=copy)
                converter.convert(str(tmp), quantization=quantization, force=True)
        except ValueError as e:
            msg = f"CTranslate2 cannot convert {src}: {e}"
            raise ValueError(msg) from e
        seconds = time.perf_counter() - began
        about = {
            "source": str(src.resolve()),
            "quantization": quantization,
            "ctranslate2": ct2.__version__,
            "seconds": round(seconds, 1),
            # The context it was trained for: CTranslate2's own config does not keep it.
            "context_length": trained_context(src / "config.json"),
        }
        (tmp / "langchain-localllms.json").write_text(json.dumps(about, indent=1))
        progress(f"converted in {seconds:.1f}s -> {target}", show=show_progress)

    return build_once(target, build, ready=_is_converted, force=force)


# ---------------------------------------------------------------------- OpenVINO
def _is_exported(path: Path) -> bool:
    return any((path / f).is_file() for f in ("openvino_model.xml", "openvino_encoder_model.xml"))


def export_openvino(cls: Any, source: Path, weight_format: str | None) -> Path:
    """Export a transformers directory to OpenVINO once; return the cached export.

    ``cls`` is the optimum-intel model class of the task (``OVModelForCausalLM``, ...).
    """
    if not source.is_dir():
        msg = f"backend='openvino' exports local directories only; {source} is not one"
        raise FileNotFoundError(msg)
    config = source / "config.json"
    stamp = f"{source.resolve()}|{config.stat().st_mtime_ns if config.is_file() else 0}"
    key = hashlib.sha256(f"{stamp}|{weight_format}".encode()).hexdigest()[:16]
    target = cache_root("openvino", f"{source.name}-{weight_format or 'fp32'}-{key}")

    def build(tmp: Path) -> None:
        progress(
            f"exporting {source} to OpenVINO ({weight_format or 'fp32'}) -> {target} "
            "(once; later loads reuse it)"
        )
        options: dict[str, Any] = {"export": True, "compile": False}
        if weight_format in ("int8", "int4"):
            intel = require("optimum.intel", feature='HuggingFacePipeline(backend="openvino")')
            options["quantization_config"] = intel.OVWeightQuantizationConfig(
                bits=8 if weight_format == "int8" else 4
            )
        else:  # no automatic int8 compression of large models: fp32/fp16 as asked
            options["load_in_8bit"] = False
        with working(f"exporting {source.name} to OpenVINO ({weight_format or 'fp32'})"):
            model = cls.from_pretrained(str(source), **options)
            if weight_format == "fp16":
                model.half()
            model.save_pretrained(str(tmp))
            transformers = require("transformers")
            transformers.AutoTokenizer.from_pretrained(str(source)).save_pretrained(str(tmp))

    return build_once(target, build, ready=_is_exported)
