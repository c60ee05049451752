"""GPT4All's bundled llama.cpp in this process, from a local GGUF file: load, generate."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from langchain_localllms.core.errors import ContextOverflowError
from langchain_localllms.core.events import Echo, Tally
from langchain_localllms.core.imports import require
from langchain_localllms.core.requests import Call
from langchain_localllms.core.threads import Emit, SharedModel
from langchain_localllms.engines.gguf import gguf_token_ids


class GPT4AllEngine:
    """A GGUF model loaded by ``gpt4all`` (never downloaded: ``allow_download=False``).

    Args:
        path: The GGUF file (already checked).
        **load_kwargs: ``gpt4all.GPT4All`` arguments (``n_threads``, ``device``, ...).
    """

    def __init__(self, path: Path, **load_kwargs: Any) -> None:
        gpt4all = require("gpt4all", feature="GPT4All")
        self.path = path
        try:
            model = gpt4all.GPT4All(
                model_name=path.name, model_path=str(path.parent), allow_download=False,
                **load_kwargs,
            )  # fmt: skip
        except (RuntimeError, ValueError) as e:
            msg = (
                f"GPT4All could not load {path}: {e}. Its bundled llama.cpp (gpt4all "
                f"{getattr(gpt4all, '__version__', '2.8')}) knows Llama-family models, "
                "not newer architectures; LlamaCpp from this package runs them."
            )
            raise ValueError(msg) from e
        self.shared = SharedModel(
            model, model.close, runtime="gpt4all", name=f"GPT4All model {path.name}"
        )

    @property
    def model(self) -> Any:
        """The ``gpt4all.GPT4All``."""
        return self.shared.model

    def close(self) -> None:
        """Free the model (at once, or when the running call ends)."""
        self.shared.close()

    def pieces(self, prompt: str, call: Call, tally: Tally) -> Iterator[str]:
        """Generate for one prompt with the call's sampling parameters, piece by piece."""
        with self.shared.use() as model:
            yield from self._pieces(model, prompt, call.params, tally)

    def token_ids(self, text: str) -> list[int]:
        """Token ids of ``text``, read by llama.cpp from the GGUF (gpt4all cannot tokenize)."""
        return gguf_token_ids(self.path, text)

    def _pieces(self, model: Any, prompt: str, p: Mapping[str, Any], tally: Tally) -> Iterator[str]:
        if not prompt:
            msg = "the prompt is empty; GPT4All needs some text to continue"
            raise ValueError(msg)
        if p["echo"]:
            yield Echo(prompt)
        work = _Prompt(model.model, prompt, p)
        items = self.shared.stream(work)
        try:
            for text in items:
                tally.completion_tokens += 1
                if text:
                    yield text
        finally:
            items.close()  # the worker has ended: the counts are final
            tally.prompt_tokens = work.prompt_tokens
            tally.finish_reason = "length" if work.decoded >= p["max_tokens"] else "stop"


class _Prompt:
    """One prompt on gpt4all's ``LLModel``, as a job of the runtime's thread.

    gpt4all's own hooks count the prompt's tokens and hand over every generated token,
    also those whose bytes it holds back until a UTF-8 character is complete: one item
    each (its text, maybe empty), so the reader counts exactly the tokens it took.
    """

    def __init__(self, llmodel: Any, prompt: str, p: Mapping[str, Any]) -> None:
        self.llmodel, self.prompt, self.p = llmodel, prompt, p
        self.raw_decoder = type(llmodel)._callback_decoder
        self.prompt_tokens = 0
        self.decoded = 0
        self.failure: list[str] = []
        self.texts: list[str] = []  # what gpt4all's decoder made of the current token
        self.emit: Emit | None = None  # set when the job runs

    def __call__(self, emit: Emit) -> None:
        self.emit = emit
        p = self.p
        self.llmodel._prompt_callback = self._count_prompt
        self.llmodel._callback_decoder = self._decoder
        try:
            self.llmodel.prompt_model(
                self.prompt,
                "%1",
                self._on_text,
                n_predict=p["max_tokens"],
                temp=p["temp"],
                top_k=1 if p["temp"] == 0 else p["top_k"],
                top_p=p["top_p"],
                min_p=p["min_p"],
                repeat_penalty=p["repeat_penalty"],
                repeat_last_n=p["repeat_last_n"],
                n_batch=p["n_batch"],
                reset_context=True,
            )
        finally:
            del self.llmodel._prompt_callback, self.llmodel._callback_decoder
        if self.failure:
            msg = (
                "GPT4All could not run the prompt: "
                f"{self.failure[0].removeprefix('ERROR: ')} Shorten the prompt or load "
                "the model with a larger n_ctx."
            )
            if "context" in self.failure[0]:  # "The prompt size exceeds the context window"
                raise ContextOverflowError(msg, prompt_tokens=self.prompt_tokens or None)
            raise ValueError(msg)

    def _count_prompt(self, token_id: int) -> bool:
        self.prompt_tokens += 1
        return True

    def _decoder(self, callback: Any) -> Any:
        decode = self.raw_decoder(self.llmodel, callback)

        def raw(token_id: int, response: bytes) -> bool:
            if token_id == -1:  # the backend's error, sent as if it were text
                self.failure.append(response.decode("utf-8", errors="replace"))
                return False
            self.decoded += 1
            self.texts.clear()
            decode(token_id, response)
            if self.emit is None or not self.emit("".join(self.texts)):
                return False
            return bool(self.decoded < self.p["max_tokens"])

        return raw

    def _on_text(self, token_id: int, text: str) -> bool:
        self.texts.append(text)
        return True
