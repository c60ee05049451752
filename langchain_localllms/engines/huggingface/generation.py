"""Generating with a transformers model: the engine, one ``generate`` call, stops, grammars.

* streaming runs ``generate`` in a worker thread that hands token ids to the reader
  (:class:`~langchain_localllms.core.threads.SharedModel`): an error there is raised in
  the caller, and a reader that stops early stops generation at the next token;
* stop strings of any length end generation early (a stopping criterion) and are cut
  by the shared stop handling;
* a batch runs as one left-padded ``generate`` call, with the same per-prompt token
  limits and answers as single calls;
* ``grammar=`` constrains decoding through an llguidance logits mask.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from langchain_localllms.core.detok import CONTEXT_TOKENS, IncrementalDetokenizer
from langchain_localllms.core.errors import ContextOverflowError
from langchain_localllms.core.events import Echo, Row, Tally
from langchain_localllms.core.imports import require
from langchain_localllms.core.requests import Call
from langchain_localllms.core.threads import Emit, SharedModel, current_cancel
from langchain_localllms.engines.huggingface.options import Settings
from langchain_localllms.grammars import Grammar
from langchain_localllms.grammars.guidance import Guide, advance


# ------------------------------------------------------------- decode, stop
class _Ended:
    """Per-row record of where and why each sequence of a batch ended."""

    def __init__(self) -> None:
        self.at: dict[int, tuple[int, str]] = {}

    def mark(self, row: int, n_new: int, why: str) -> None:
        self.at.setdefault(row, (n_new, why))


def _make_stopper(
    torch: Any,
    transformers: Any,
    *,
    start: int,
    limits: list[int],
    eos: frozenset[int],
    stops: list[str],
    windows: Callable[[int, list[int], int], str],
    ended: _Ended,
    cancel: threading.Event,
) -> Any:
    """A stopping criterion: per-row token limits, EOS, stop strings, cancellation."""
    longest = max((len(s.encode("utf-8")) for s in stops), default=0)

    class Stopper(transformers.StoppingCriteria):  # type: ignore[misc]
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            n_new = input_ids.shape[1] - start
            done = []
            for row in range(input_ids.shape[0]):
                if row not in ended.at:
                    new = input_ids[row, start:].tolist()
                    if new and new[-1] in eos:
                        ended.mark(row, n_new - 1, "eos")
                    elif stops and any(s in windows(row, new, longest + 4) for s in stops):
                        ended.mark(row, n_new, "stop")
                    elif n_new >= limits[row]:
                        ended.mark(row, n_new, "length")
                done.append(row in ended.at or cancel.is_set())
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return Stopper()


def _make_grammar_mask(
    torch: Any, transformers: Any, guide: Guide, vocab: int, ended: _Ended
) -> Any:
    """A logits processor that lets through only tokens the grammar allows.

    One llguidance matcher per row; rows that already ended are left alone (their
    tokens are padding). Applied before temperature/top-k/top-p, so sampling only
    sees allowed tokens.
    """
    fill = require("llguidance.torch", feature="grammar= with HuggingFacePipeline")
    fill_row = fill.fill_next_token_bitmask

    class GrammarMask(transformers.LogitsProcessor):  # type: ignore[misc]
        def __init__(self) -> None:
            self.matchers: list[Any] = []
            self.bitmask: Any = None

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            rows = input_ids.shape[0]
            if not self.matchers:
                self.matchers = [guide.matcher() for _ in range(rows)]
                self.bitmask = torch.full((rows, (vocab + 31) // 32), -1, dtype=torch.int32)
            else:
                for row, matcher in enumerate(self.matchers):
                    if row not in ended.at and not matcher.is_stopped():
                        advance(matcher, int(input_ids[row, -1]))
            for row, matcher in enumerate(self.matchers):
                if row in ended.at:
                    self.bitmask[row] = -1  # all allowed: the row is padding now
                else:  # a finished grammar allows only the end of the answer
                    fill_row(matcher, self.bitmask, row)
            bits = self.bitmask.to(scores.device)
            shifts = torch.arange(32, device=scores.device, dtype=torch.int32)
            allowed = ((bits.unsqueeze(-1) >> shifts) & 1).bool().view(rows, -1)
            width = scores.shape[-1]
            if allowed.shape[-1] < width:  # logits wider than the tokenizer: no token there
                pad = torch.zeros(
                    rows, width - allowed.shape[-1], dtype=torch.bool, device=scores.device
                )
                allowed = torch.cat([allowed, pad], dim=-1)
            return scores.masked_fill(~allowed[:, :width], float("-inf"))

    return GrammarMask()


class HFEngine:
    """A loaded transformers model and its tokenizer: what generation needs of them.

    Shared by an LLM instance and its copies (and by a chat class over the same
    model). The tokenizer is used under one lock (tokenizers are not thread-safe); the
    model by one ``generate`` at a time (:class:`~langchain_localllms.core.threads.SharedModel`).
    """

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
        self.tok_lock = threading.RLock()
        name = getattr(model, "name_or_path", None) or type(model).__name__
        self.shared = SharedModel(
            model,
            None,
            runtime="huggingface",
            name=f"model {name}",
            parts={"tokenizer": tokenizer},
        )
        self._grammars: dict[str, Any] = {}

    @property
    def model(self) -> Any:
        """The transformers (or optimum-intel) model; ClosedError once closed."""
        return self.shared.model

    @property
    def tokenizer(self) -> Any:
        """The tokenizer; ClosedError once closed."""
        return self.shared.part("tokenizer")

    def close(self) -> None:
        """Free the model and tokenizer, at once or when the running calls end."""
        self.shared.close()
        self._grammars.clear()

    def token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` in this model's vocabulary (no special tokens)."""
        with self.shared.use(), self.tok_lock:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def compiled(self, g: Grammar) -> Guide:
        """``g`` compiled by llguidance for this tokenizer (cached)."""
        hit = self._grammars.get(g.identity)
        if hit is not None:
            return hit  # type: ignore[no-any-return]
        tokenizer = self._grammars.get("\0tokenizer")
        if tokenizer is None:
            hf = require("llguidance.hf", feature="grammar= with HuggingFacePipeline")
            with self.tok_lock:
                try:
                    tokenizer = hf.from_tokenizer(
                        self.tokenizer,
                        n_vocab=self.vocab_size,
                        eos_token=sorted(self.eos_ids({})) or None,
                    )
                except ValueError as e:
                    msg = f"grammars need a fast (Rust) tokenizer for this model: {e}"
                    raise ValueError(msg) from e
            self._grammars["\0tokenizer"] = tokenizer
        guide = Guide(tokenizer, g)
        self._grammars[g.identity] = guide
        return guide

    @property
    def vocab_size(self) -> int:
        """The width of the model's logits."""
        return int(self.model.config.get_text_config().vocab_size)

    def eos_ids(self, gen: Mapping[str, Any]) -> frozenset[int]:
        """The ids that end an answer: the call's ``eos_token_id``, else the model's."""
        eos = gen.get("eos_token_id", self.model.generation_config.eos_token_id)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return frozenset()
        return frozenset([eos] if isinstance(eos, int) else eos)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``, special tokens left out, spaces exactly as generated."""
        with self.tok_lock:
            text: str = self.tokenizer.decode(
                ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
        return text

    def pieces(self, prompt: str, call: Call, tally: Tally) -> Iterator[str]:
        """Generate for one prompt, piece by piece (a worker thread runs ``generate``).

        ``call.request`` is the call's :class:`Settings`.
        """
        with self.shared.use():
            yield from self._pieces(prompt, call.request, call.stops, tally)

    def _pieces(
        self, prompt: str, settings: Settings, stops: list[str], tally: Tally
    ) -> Iterator[str]:
        job = _Job(self, [prompt], settings, stops)
        tally.prompt_tokens = job.prompt_tokens[0]
        if settings.echo:
            yield Echo(prompt)
        decoder = IncrementalDetokenizer(self.decode, job.contexts[0])
        eos = job.eos

        def work(emit: Emit) -> None:
            job.generate(_EmitStreamer(emit, job.cancel))

        steps = self.shared.stream(work)
        try:
            next(steps, None)  # the prompt (or the decoder's start token) comes first
            for value in steps:
                for token in value.reshape(-1).tolist():
                    if token in eos:
                        tally.finish_reason = "stop"
                        continue
                    if tally.finish_reason == "stop":
                        continue  # padding after the end
                    tally.completion_tokens += 1
                    text = decoder.push(token)
                    if text:
                        yield text
        finally:
            steps.close()
        tail = decoder.flush()
        if tail:
            yield tail
        if tally.finish_reason is None:
            why = job.ended.at.get(0, (0, "length"))[1]
            tally.finish_reason = "stop" if why in ("eos", "stop") else "length"

    def rows(self, prompts: list[str], call: Call, *, per_call: int = 1) -> list[Row]:
        """Generate for many prompts, ``per_call`` of them in each ``generate`` call.

        ``call.request`` is the call's :class:`Settings`.
        """
        with self.shared.use():
            return self._rows(prompts, call.request, call.stops, per_call)

    def _rows(
        self, prompts: list[str], settings: Settings, stops: list[str], per_call: int
    ) -> list[Row]:
        rows = per_call
        answers = []
        cancel = current_cancel()
        for i in range(0, len(prompts), rows):
            if cancel is not None and cancel.is_set:
                break  # the caller gave up: nobody reads the rest
            chunk = prompts[i : i + rows]
            job = _Job(self, chunk, settings, stops)
            if cancel is not None:
                cancel.on_set(job.cancel.set)  # the stopping criterion ends it at a step
            clock = _FirstToken()
            out = self.shared.run(functools.partial(job.generate, clock))
            for row, prompt in enumerate(chunk):
                ids, why = job.answer(out, row)
                tally = Tally(
                    prompt_tokens=job.prompt_tokens[row],
                    completion_tokens=len(ids),
                    finish_reason="stop" if why in ("eos", "stop") else "length",
                )
                tally.first_piece = clock.at or time.perf_counter()
                pieces = IncrementalDetokenizer(self.decode, job.contexts[row]).pieces(ids)
                answers.append(Row(pieces, tally, prefix=prompt if settings.echo else ""))
        return answers


class _FirstToken:
    """A streamer that only notes when the first new token arrived."""

    def __init__(self) -> None:
        self.at: float | None = None
        self._puts = 0

    def put(self, value: Any) -> None:
        self._puts += 1
        if self._puts == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


class _EmitStreamer:
    """A streamer that hands token ids to the reader; stops generating once it is gone."""

    def __init__(self, emit: Emit, cancel: threading.Event) -> None:
        self._emit = emit
        self._cancel = cancel

    def put(self, value: Any) -> None:
        if not self._emit(value):
            self._cancel.set()  # the stopping criterion ends generate() at the next step

    def end(self) -> None:
        pass


class _Job:
    """One ``generate`` call over a batch of prompts (left-padded if decoder-only)."""

    def __init__(
        self, engine: HFEngine, prompts: list[str], settings: Settings, stops: list[str]
    ) -> None:
        self.torch = require("torch", feature="HuggingFacePipeline")
        transformers = require("transformers", feature="HuggingFacePipeline")
        self.engine = engine
        self.seed = settings.seed
        self.cancel = threading.Event()
        gen = dict(settings.generate)
        self.eos = engine.eos_ids(gen)
        rows = self._encode(prompts, settings)
        self.prompt_tokens = [len(r) for r in rows]
        gen["pad_token_id"] = self._pad_id(gen)
        self._pad(rows, gen["pad_token_id"])
        self.limits = self._limits(gen)
        gen["max_new_tokens"] = max(self.limits)
        self.generate_kwargs = gen
        self.ended = _Ended()
        stopper = _make_stopper(
            self.torch, transformers, start=self.start, limits=self.limits, eos=self.eos,
            stops=stops, windows=self._window, ended=self.ended, cancel=self.cancel,
        )  # fmt: skip
        processors = list(settings.processors)
        if settings.grammar is not None:
            guide = engine.compiled(settings.grammar)
            mask = _make_grammar_mask(
                self.torch, transformers, guide, engine.vocab_size, self.ended
            )
            processors.insert(0, mask)
        self.processors = transformers.LogitsProcessorList(processors)
        self.criteria = transformers.StoppingCriteriaList([stopper, *settings.criteria])

    def _encode(self, prompts: list[str], settings: Settings) -> list[list[int]]:
        kwargs = {}
        if settings.add_special_tokens is not None:
            kwargs["add_special_tokens"] = settings.add_special_tokens
        with self.engine.tok_lock:
            rows = [
                self.engine.tokenizer(settings.prefix + p, **kwargs)["input_ids"] for p in prompts
            ]
        if not all(rows):
            msg = "the prompt is empty and this tokenizer adds no start token; give a prompt"
            raise ValueError(msg)
        config = self.engine.model.config.get_text_config()
        limit = getattr(config, "max_position_embeddings", None)
        longest = max(len(r) for r in rows)
        if not self.engine.seq2seq and limit and longest >= limit:
            msg = (
                f"the prompt is {longest} tokens but this model's context holds at most "
                f"{limit} (max_position_embeddings): shorten the prompt"
            )
            raise ContextOverflowError(msg, prompt_tokens=longest, context=limit)
        return rows

    def _pad_id(self, gen: Mapping[str, Any]) -> int:
        pad = self.engine.tokenizer.pad_token_id
        if pad is None:
            pad = gen.get("pad_token_id", self.engine.model.generation_config.pad_token_id)
        if pad is None:
            pad = min(self.eos) if self.eos else 0
        return int(pad)

    def _pad(self, rows: list[list[int]], pad: int) -> None:
        """Make the input tensors; decoder-only prompts are padded on the left.

        So every prompt ends where generation starts.
        """
        torch = self.torch
        longest = max(len(r) for r in rows)
        fill = [[pad] * (longest - len(r)) for r in rows]
        if self.engine.seq2seq:
            ids = [r + f for r, f in zip(rows, fill, strict=True)]
            mask = [[1] * len(r) + [0] * len(f) for r, f in zip(rows, fill, strict=True)]
            self.contexts: list[list[int]] = [[] for _ in rows]
            self.start = 1  # generated sequences begin with the decoder start token
        else:
            ids = [f + r for r, f in zip(rows, fill, strict=True)]
            mask = [[0] * len(f) + [1] * len(r) for r, f in zip(rows, fill, strict=True)]
            self.contexts = [r[-CONTEXT_TOKENS:] for r in rows]
            self.start = longest
        device = getattr(self.engine.model, "device", None)
        self.inputs = {
            "input_ids": torch.tensor(ids, dtype=torch.long, device=device),
            "attention_mask": torch.tensor(mask, dtype=torch.long, device=device),
        }

    def _limits(self, gen: dict[str, Any]) -> list[int]:
        """Return the new-token budget of each prompt.

        ``max_length`` counts the prompt (as in transformers), so each row gets its own
        budget and a batch answers like single calls.
        """
        max_new = gen.pop("max_new_tokens", None)
        max_length = gen.pop("max_length", None)
        if max_new is not None:
            return [int(max_new)] * len(self.prompt_tokens)
        if max_length is None:
            max_length = self.engine.model.generation_config.max_length or 20
        used = [1] * len(self.prompt_tokens) if self.engine.seq2seq else self.prompt_tokens
        limits = [int(max_length) - n for n in used]
        if min(limits) <= 0:
            msg = (
                f"max_length={max_length} counts the prompt too, and a prompt is "
                f"{max(used)} tokens: raise max_length or set max_new_tokens"
            )
            raise ValueError(msg)
        return limits

    def _window(self, row: int, new: list[int], size: int) -> str:
        """Decoded text of a row's last ``size`` new tokens, for the stop check."""
        decode = self.engine.decode
        if len(new) > size:
            return decode(new[-size:])
        # the start of the answer: decoded with context
        return IncrementalDetokenizer(decode, self.contexts[row]).text(new)

    def generate(self, streamer: Any) -> Any:
        """Run ``model.generate`` (the caller holds the model); None if cancelled first."""
        if self.cancel.is_set():
            return None
        if self.seed is not None:
            self.torch.manual_seed(self.seed)
        with self.torch.inference_mode():
            return self.engine.model.generate(
                **self.inputs,
                **self.generate_kwargs,
                logits_processor=self.processors,
                stopping_criteria=self.criteria,
                streamer=streamer,
            )

    def answer(self, out: Any, row: int) -> tuple[list[int], str]:
        """The new ids of one row, cut where it ended, and why it ended."""
        new = out[row, self.start :].tolist()
        n, why = self.ended.at.get(row, (len(new), "length"))
        new = new[: min(n, self.limits[row])]
        for i, token in enumerate(new):
            if token in self.eos:
                return new[:i], "eos"
        return new, why
