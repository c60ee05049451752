"""CTranslate2 in this process: load a converted model, tokenize, generate.

One :class:`CTranslate2Engine` per loaded model, shared by an LLM instance, its copies
and a chat class over the same model. CTranslate2 runs its own worker threads and
queues concurrent calls itself; its ``generate_batch`` has no logits hook, so nothing
here can constrain decoding with a grammar.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from langchain_localllms.conversion import TOKENIZER_FILES, trained_context
from langchain_localllms.core.detok import IncrementalDetokenizer
from langchain_localllms.core.errors import ContextOverflowError
from langchain_localllms.core.events import Row, Tally
from langchain_localllms.core.files import model_dir
from langchain_localllms.core.imports import require
from langchain_localllms.core.requests import Call
from langchain_localllms.core.stops import StopStream
from langchain_localllms.core.threads import SharedModel, current_cancel, trim_heap

__all__ = [
    "CTranslate2Engine",
    "ct2_dir",
    "read_json",
    "source_context",
    "source_model_type",
]


class CTranslate2Engine:
    """A converted model loaded as a ``ctranslate2.Generator``, with its tokenizer.

    Args:
        path: The CTranslate2 model directory (already checked).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        device_index: The GPU id(s).
        compute_type: The weight type to compute in (or a device -> type map).
        generator_kwargs: More ``ctranslate2.Generator`` arguments (threads, ...).
        tokenizer: A loaded tokenizer, or None to load one.
        tokenizer_name: Where to load the tokenizer from (default: ``path``).
    """

    def __init__(
        self,
        path: Path,
        *,
        device: str,
        device_index: int | list[int],
        compute_type: Any,
        generator_kwargs: Mapping[str, Any],
        tokenizer: Any = None,
        tokenizer_name: str | None = None,
    ) -> None:
        ct2 = require("ctranslate2", feature="CTranslate2")
        used = self._check_device(ct2, device, device_index, compute_type)
        try:
            generator = ct2.Generator(
                str(path),
                device=device,
                device_index=device_index,
                compute_type=compute_type,
                **generator_kwargs,
            )
        except (RuntimeError, ValueError) as e:
            msg = (
                f"CTranslate2 could not load {path} on {used}: {e}. The model may be "
                "truncated, converted by a newer CTranslate2, or need more memory than "
                "is free; re-convert it (CTranslate2.from_pretrained or "
                "ct2-transformers-converter)."
            )
            raise ValueError(msg) from e
        # Released at close(), or at exit while Python can still run the release:
        # CTranslate2's worker threads keep the last job's Python step callback
        # until the Generator ends, and ending it during interpreter shutdown aborts
        # the process ("terminate called without an active exception").
        # unload_model first: dropping the Generator alone returned a third of the
        # weights' memory to the system (measured on Gemma-3-270M).
        self.shared = SharedModel(
            generator,
            generator.unload_model,
            runtime="ctranslate2",
            name=f"CTranslate2 model {path.name}",
        )
        self._load_lock = threading.Lock()
        self._active = 0  # calls generating now
        self._unload_wanted = False
        #: The context the model was trained for, where the directory records it.
        self.trained_context = source_context(path)
        if tokenizer is None:
            tokenizer = self._load_tokenizer(path, tokenizer_name)
        self.shared.set_part("tokenizer", tokenizer)
        config = read_json(path / "config.json")
        self._bos = config.get("bos_token")
        self.end_ids = self._default_end_ids(path, config)

    @property
    def client(self) -> Any:
        """The ``ctranslate2.Generator`` (None once closed)."""
        return None if self.shared.closed else self.shared.model

    @property
    def tokenizer(self) -> Any:
        """The tokenizer; ClosedError once closed."""
        return self.shared.part("tokenizer")

    def close(self) -> None:
        """Free the model and tokenizer, at once or when the running calls end."""
        self.shared.close()

    def unload(self) -> None:
        """Free the weights but keep the model ready: the next call loads them again.

        Calls running now end first (then the weights go).
        """
        with self._load_lock:
            if self._active:
                self._unload_wanted = True
                return
        self._unload()

    def _unload(self) -> None:
        with self._load_lock, self.shared.use() as generator:
            self._unload_wanted = False
            if generator.model_is_loaded and not self._active:
                generator.unload_model()
                trim_heap()  # else glibc may keep the freed weights in its arenas

    @contextlib.contextmanager
    def _generator(self) -> Iterator[Any]:
        """The Generator with its weights loaded, kept loaded until the block ends."""
        with self.shared.use() as generator:
            with self._load_lock:
                self._active += 1
                self._unload_wanted = False  # a new call wants the weights
                try:
                    if not generator.model_is_loaded:
                        generator.load_model()
                except BaseException:
                    self._active -= 1
                    raise
            try:
                yield generator
            finally:
                with self._load_lock:
                    self._active -= 1
                    wanted = self._unload_wanted and not self._active
                if wanted:
                    self._unload()

    def choose(self, prompt: str, options: Sequence[str]) -> int:
        """Which of ``options`` the model finds likeliest to follow ``prompt``.

        Greedy over the options' tokens: where they part, one decoding step says which
        next token the model ranks highest, and only the options with it go on. The
        choice is the model's own, among these only. (``score_batch`` would score whole
        options, but on Gemma 3 it fails for batches and for prompts past the sliding
        window, measured with CTranslate2 4.8.)
        """
        joined = self._encode([prompt + o for o in options], specials=True)
        alive = list(range(len(options)))
        pos = min(
            next(
                (i for i, (a, b) in enumerate(zip(joined[0], ids, strict=False)) if a != b),
                min(len(joined[0]), len(ids)),
            )
            for ids in joined
        )
        while len(alive) > 1:
            going = [i for i in alive if len(joined[i]) > pos]
            if len(going) < len(alive):  # an option ends here: it is the shorter name
                alive = [i for i in alive if i not in going] or alive
                break
            nexts = {joined[i][pos] for i in alive}
            if len(nexts) > 1:
                logits = self._next_logits(joined[alive[0]][:pos])
                best = max(nexts, key=lambda t: float(logits[t]))
                alive = [i for i in alive if joined[i][pos] == best]
            pos += 1
        return alive[0]

    def _next_logits(self, ids: Sequence[int]) -> Any:
        """The model's logits for the token after ``ids``."""
        import numpy as np  # a dependency of ctranslate2

        with self._generator() as generator:
            (result,) = generator.generate_batch(
                [self._tokens(ids)],
                max_length=1,
                return_logits_vocab=True,
                include_prompt_in_result=False,
            )
        step = result.logits[0]  # the first step's logits, per hypothesis
        return np.asarray(step[0] if isinstance(step, list) else step).reshape(-1)

    def token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` in this model's vocabulary (no special tokens)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    @staticmethod
    def _check_device(
        ct2: Any, device: str, device_index: int | list[int], compute_type: Any
    ) -> str:
        """Check device and compute_type before native code; return the device used."""
        gpus = ct2.get_cuda_device_count()
        if device == "auto":
            device = "cuda" if gpus > 0 else "cpu"
        if device == "cuda":
            if gpus == 0:
                msg = (
                    "device='cuda' but CTranslate2 sees no CUDA GPU "
                    "(ctranslate2.get_cuda_device_count() == 0): use device='cpu', or "
                    "device='auto' to take a GPU when there is one"
                )
                raise ValueError(msg)
            ids = device_index if isinstance(device_index, list) else [device_index]
            bad = [i for i in ids if i >= gpus]
            if bad:
                msg = (
                    f"device_index {bad} does not exist: this machine has {gpus} GPU(s), "
                    f"ids 0..{gpus - 1}"
                )
                raise ValueError(msg)
        compute = compute_type
        if isinstance(compute, dict):
            compute = compute.get(device, "default")
        if compute not in ("default", "auto"):
            supported = sorted(ct2.get_supported_compute_types(device))
            if compute not in supported:
                msg = (
                    f"compute_type {compute!r} is not supported on {device} here; "
                    f"choose one of: default, auto, {', '.join(supported)}"
                )
                raise ValueError(msg)
        return device

    @staticmethod
    def _load_tokenizer(path: Path, name: str | None) -> Any:
        if name is None:
            if not any((path / f).is_file() for f in (*TOKENIZER_FILES[:3], "vocab.json")):
                msg = (
                    f"{path} holds no tokenizer files: pass tokenizer_name= (the Hugging "
                    "Face model directory or hub name the model was converted from), or "
                    "convert with --copy_files tokenizer.json tokenizer_config.json"
                )
                raise ValueError(msg)
            name = str(path)
        transformers = require(
            "transformers", feature="CTranslate2 (its tokenizer)", extra="ctranslate2"
        )
        kwargs: dict[str, Any] = {}
        # transformers reads config.json to decide whether to warn about a bad Mistral
        # tokenizer regex; in a converted directory that is CTranslate2's config (no
        # model_type), so it would warn for every model. Only a Mistral source warns.
        if (
            _is_same_dir(name, path)
            and int(transformers.__version__.split(".")[0]) >= 5
            and source_model_type(path) not in _MISTRAL_TYPES
        ):
            kwargs["fix_mistral_regex"] = False
        try:
            return transformers.AutoTokenizer.from_pretrained(name, **kwargs)
        except (OSError, ValueError) as e:
            msg = (
                f"could not load the tokenizer {name!r}: {e}. Give tokenizer_name= the "
                "Hugging Face model directory (or hub name) the CTranslate2 model was "
                "converted from."
            )
            raise (OSError(msg) if isinstance(e, OSError) else ValueError(msg)) from e

    def _default_end_ids(self, path: Path, config: dict[str, Any]) -> list[int]:
        """End-of-sequence ids: the converted model's, plus generation_config.json's."""
        ids: list[int] = []
        eos = config.get("eos_token")
        for token in [eos] if isinstance(eos, str) else (eos or []):
            tid = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(tid, int):
                ids.append(tid)
        gen = path / "generation_config.json"
        extra = read_json(gen).get("eos_token_id") if gen.is_file() else None
        for tid in [extra] if isinstance(extra, int) else (extra or []):
            ids.append(int(tid))
        if not ids and self.tokenizer.eos_token_id is not None:
            ids.append(int(self.tokenizer.eos_token_id))
        return sorted(set(ids))

    # ---------------------------------------------------------------- encoding
    def _encode(self, prompts: list[str], *, specials: bool) -> list[list[int]]:
        """Prompt ids as the tokenizer makes them.

        With the tokenizer's own start token when ``specials`` (not after a static
        prompt); an end token the tokenizer appends is dropped.
        """
        tok = self.tokenizer
        encoded = tok(prompts, add_special_tokens=specials)["input_ids"]
        eos, eos_text = tok.eos_token_id, tok.eos_token
        out = []
        for prompt, ids in zip(prompts, encoded, strict=True):
            ids = list(ids)
            if len(ids) > 1 and ids[-1] == eos and not (eos_text and prompt.endswith(eos_text)):
                ids.pop()
            if not ids and specials:
                if self._bos is None:
                    msg = (
                        "the prompt is empty and neither the tokenizer nor the model "
                        "defines a start token; give a prompt"
                    )
                    raise ValueError(msg)
                ids = [tok.convert_tokens_to_ids(self._bos)]
            out.append(ids)
        return out

    def _static(self, p: Mapping[str, Any]) -> list[int] | None:
        static = p["static_prompt"]
        if static is None:
            return None
        if isinstance(static, str):
            return self._encode([static], specials=True)[0]
        return list(self.tokenizer.convert_tokens_to_ids(static))

    def _limit(self, p: Mapping[str, Any]) -> int:
        """The longest prompt allowed (0: none): ``max_input_length``, else the trained context."""
        limit = p["max_input_length"]
        return int(limit if limit is not None else self.trained_context or 0)

    def _prompts(
        self, prompts: list[str], p: Mapping[str, Any]
    ) -> tuple[list[int] | None, list[list[int]]]:
        """The static prompt's ids (if any) and each prompt's ids.

        CTranslate2 needs at least one start token after a static prompt; if a prompt
        is empty, the static prompt becomes part of every prompt of the call instead.
        """
        static = self._static(p)
        if static is None:
            return None, _fits(self._encode(prompts, specials=True), 0, self._limit(p))
        encoded = _fits(self._encode(prompts, specials=False), len(static), self._limit(p))
        if all(encoded):
            return static, encoded
        return None, [[*static, *ids] for ids in encoded]

    def _tokens(self, ids: Sequence[int]) -> list[str]:
        return list(self.tokenizer.convert_ids_to_tokens(list(ids)))

    def _token_ids(self, tokens: Sequence[str], what: str) -> list[int]:
        ids = []
        unk = self.tokenizer.unk_token_id
        for token in tokens:
            tid = self.tokenizer.convert_tokens_to_ids(token)
            if tid is None or (tid == unk and token != self.tokenizer.unk_token):
                msg = f"{what} {token!r} is not a token of this model's vocabulary"
                raise ValueError(msg)
            ids.append(int(tid))
        return ids

    def _options(self, p: Mapping[str, Any], static: list[int] | None) -> dict[str, Any]:
        """Decoding options for ``generate_tokens`` / ``generate_batch``."""
        topk, temperature = p["sampling_topk"], p["sampling_temperature"]
        if temperature == 0:
            topk, temperature = 1, 1.0
        end = p["end_token"]
        if end is None:
            end_ids = self.end_ids
        elif isinstance(end, str):
            end_ids = self._token_ids([end], "end_token")
        elif all(isinstance(e, str) for e in end):
            end_ids = self._token_ids(end, "end_token")
        else:
            end_ids = [int(e) for e in end]
        options: dict[str, Any] = {
            "max_length": p["max_length"],
            "min_length": p["min_length"],
            "sampling_topk": topk,
            "sampling_topp": p["sampling_topp"],
            "sampling_temperature": temperature,
            "repetition_penalty": p["repetition_penalty"],
            "no_repeat_ngram_size": p["no_repeat_ngram_size"],
            "disable_unk": p["disable_unk"],
            "end_token": end_ids,
        }
        if p["suppress_sequences"]:
            options["suppress_sequences"] = [
                s if isinstance(s, list) else self._tokens(self._encode([s], specials=False)[0])
                for s in p["suppress_sequences"]
            ]
        if static is not None:
            options["static_prompt"] = self._tokens(static)
            options["cache_static_prompt"] = p["cache_static_prompt"]
        return options

    def _detokenizer(self, context: Sequence[int]) -> IncrementalDetokenizer:
        tok = self.tokenizer

        def decode(ids: list[int]) -> str:
            return str(
                tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            )

        return IncrementalDetokenizer(decode, context)

    # --------------------------------------------------------------- generation
    def pieces(self, prompt: str, call: Call, tally: Tally) -> Iterator[str]:
        """Generate for one prompt with the call's decoding parameters, token by token."""
        with self._generator() as generator:
            yield from self._pieces(generator, prompt, call.params, tally)

    def _pieces(
        self, generator: Any, prompt: str, p: Mapping[str, Any], tally: Tally
    ) -> Iterator[str]:
        static, (ids,) = self._prompts([prompt], p)
        options = self._options(p, static)
        end_ids = set(options["end_token"])
        tally.prompt_tokens = len(ids) + len(static or [])
        detok = self._detokenizer([*(static or []), *ids])
        if p["beam_size"] > 1:
            result = generator.generate_batch(
                [self._tokens(ids)],
                beam_size=p["beam_size"],
                patience=p["patience"],
                length_penalty=p["length_penalty"],
                include_prompt_in_result=False,
                **options,
            )[0]
            out = list(result.sequences_ids[0])
            tally.completion_tokens = len(out)
            tally.finish_reason = "length" if len(out) >= p["max_length"] else "stop"
            text = detok.text(out)
            if text:
                yield text
            return
        steps = generator.generate_tokens(self._tokens(ids), **options)
        try:
            tally.finish_reason = "length"
            for step in steps:
                if step.token_id in end_ids:
                    tally.finish_reason = "stop"
                    break
                tally.completion_tokens += 1
                text = detok.push(step.token_id)
                if text:
                    yield text
            tail = detok.flush()
            if tail:
                yield tail
        finally:
            steps.close()  # stops decoding at the next step and waits for it

    def rows(self, prompts: list[str], call: Call) -> list[Row]:
        """Generate for many prompts in one ``generate_batch``."""
        with self._generator() as generator:
            return self._rows(generator, prompts, call.params, call.stops)

    def _rows(
        self, generator: Any, prompts: list[str], p: Mapping[str, Any], stops: list[str]
    ) -> list[Row]:
        static, encoded = self._prompts(prompts, p)
        options = self._options(p, static)
        contexts = [[*(static or []), *ids] for ids in encoded]
        first_step: dict[int, float] = {}
        watches = [_StopWatch(self._detokenizer(c), stops) for c in contexts]
        lock = threading.Lock()

        cancel = current_cancel()

        def on_step(step: Any) -> bool:
            if cancel is not None and cancel.is_set:  # the caller gave up: rows end here
                return True
            with lock:
                first_step.setdefault(step.batch_id, time.perf_counter())
            # Ends this prompt's decoding once its text holds a stop sequence.
            return watches[step.batch_id].push(step.token_id) if stops else False

        beams = p["beam_size"] > 1
        started = time.perf_counter()
        results = generator.generate_batch(
            [self._tokens(ids) for ids in encoded],
            max_batch_size=p["max_batch_size"],
            batch_type=p["batch_type"],
            beam_size=p["beam_size"],
            patience=p["patience"],
            length_penalty=p["length_penalty"],
            include_prompt_in_result=False,
            callback=None if beams else on_step,
            **options,
        )
        rows = []
        for i, (ids, context, result) in enumerate(zip(encoded, contexts, results, strict=True)):
            out = list(result.sequences_ids[0])
            tally = Tally(
                prompt_tokens=len(ids) + len(static or []),
                completion_tokens=len(out),
                finish_reason="length" if len(out) >= p["max_length"] else "stop",
                started=started,
            )
            tally.first_piece = first_step.get(i)
            rows.append(Row(self._detokenizer(context).pieces(out), tally))
        return rows


def source_model_type(path: Path) -> str | None:
    """``model_type`` of the Hugging Face model ``from_pretrained`` converted."""
    value = _source_config(path).get("model_type")
    return value if isinstance(value, str) else None


def source_context(path: Path) -> int | None:
    """The context the model ``from_pretrained`` converted was trained for, if known."""
    about = path / "langchain-localllms.json"
    value = read_json(about).get("context_length") if about.is_file() else None
    if isinstance(value, int) and value > 0:
        return value
    source = _source_config_path(path)
    return trained_context(source) if source is not None else None


def _source_config_path(path: Path) -> Path | None:
    about = path / "langchain-localllms.json"
    source = read_json(about).get("source") if about.is_file() else None
    config = Path(source) / "config.json" if source else None
    return config if config is not None and config.is_file() else None


def _source_config(path: Path) -> dict[str, Any]:
    config = _source_config_path(path)
    return read_json(config) if config is not None else {}


# ------------------------------------------------------------------ detokenizing
class _StopWatch:
    """One prompt's text during a batch, to end its decoding at a stop sequence."""

    def __init__(self, detok: IncrementalDetokenizer, stops: Sequence[str]) -> None:
        self._detok = detok
        self._stops = StopStream(stops)

    def push(self, token_id: int) -> bool:
        self._stops.push(self._detok.push(token_id))
        return self._stops.stopped


# ------------------------------------------------------------------- model files
_MISTRAL_TYPES = ("mistral", "mistral3", "voxtral", "ministral", "pixtral")


def _is_same_dir(name: str, path: Path) -> bool:
    try:
        return Path(name).expanduser().resolve() == path.resolve()
    except OSError:
        return False


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a model directory (``{}`` if it holds another value)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        msg = f"{path} is not readable JSON ({e}); re-convert the model"
        raise ValueError(msg) from e
    return value if isinstance(value, dict) else {}


def ct2_dir(path: str | os.PathLike[str]) -> Path:
    """Check that ``path`` is a CTranslate2 model directory before native code runs."""
    p = Path(path).expanduser()
    if (
        p.is_dir()
        and (p / "config.json").is_file()
        and not (p / "model.bin").is_file()
        and (any(p.glob("*.safetensors")) or any(p.glob("pytorch_model*.bin")))
    ):
        msg = (
            f"{p} is a Hugging Face model directory, not a CTranslate2 one: convert it "
            f"with CTranslate2.from_pretrained({str(p)!r}) or "
            f"ct2-transformers-converter --model {p} --output_dir <dir>"
        )
        raise ValueError(msg)
    return model_dir(p, kind="CTranslate2 model", must_have=("model.bin", "config.json"))


def _fits(encoded: list[list[int]], static: int, limit: int) -> list[list[int]]:
    """``encoded``, if every prompt (after ``static`` tokens) is at most ``limit`` long."""
    for ids in encoded:
        if limit and static + len(ids) > limit:
            msg = (
                f"the prompt is {static + len(ids)} tokens, more than the {limit} the "
                "context holds (max_input_length, by default the context the model was "
                "trained for): shorten it"
            )
            raise ContextOverflowError(msg, prompt_tokens=static + len(ids), context=limit)
    return encoded
