"""GPT4All's bundled llama.cpp in this process, from a local GGUF file: load, generate."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from langchain_localllms._base import Echo
from langchain_localllms._imports import require
from langchain_localllms._native import Emit, SharedModel
from langchain_localllms._usage import Tally
from langchain_localllms.errors import ContextOverflowError


class GPT4AllEngine:
    """A GGUF model loaded by ``gpt4all`` (never downloaded: ``allow_download=False``).

    Args:
        path: The GGUF file (already checked).
        **load_kwargs: ``gpt4all.GPT4All`` arguments (``n_threads``, ``device``, ...).
    """

    def __init__(self, path: Path, **load_kwargs: Any) -> None:
        gpt4all = require("gpt4all", feature="GPT4All")
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

    def pieces(self, prompt: str, p: Mapping[str, Any], tally: Tally) -> Iterator[str]:
        """Generate for one prompt with sampling parameters ``p``, piece by piece."""
        with self.shared.use() as model:
            yield from self._pieces(model, prompt, p, tally)

    def _pieces(self, model: Any, prompt: str, p: Mapping[str, Any], tally: Tally) -> Iterator[str]:
        if not prompt:
            msg = "the prompt is empty; GPT4All needs some text to continue"
            raise ValueError(msg)
        if p["echo"]:
            yield Echo(prompt)
        engine = model.model  # gpt4all's LLModel
        raw_decoder = type(engine)._callback_decoder
        counts = {"prompt": 0, "decoded": 0}
        failure: list[str] = []

        def work(emit: Emit) -> None:
            def count_prompt(token_id: int) -> bool:
                counts["prompt"] += 1
                return True

            texts: list[str] = []  # what gpt4all's decoder made of the current token

            def count_completion(callback: Any) -> Any:
                # Every generated token passes here, also those whose bytes gpt4all
                # holds back until a UTF-8 character is complete: one item each (its
                # text, maybe empty), so the reader counts exactly the tokens it took.
                decode = raw_decoder(engine, callback)

                def raw(token_id: int, response: bytes) -> bool:
                    if token_id == -1:  # the backend's error, sent as if it were text
                        failure.append(response.decode("utf-8", errors="replace"))
                        return False
                    counts["decoded"] += 1
                    texts.clear()
                    decode(token_id, response)
                    if not emit("".join(texts)):
                        return False
                    return bool(counts["decoded"] < p["max_tokens"])

                return raw

            def on_text(token_id: int, text: str) -> bool:
                texts.append(text)
                return True

            engine._prompt_callback = count_prompt
            engine._callback_decoder = count_completion
            try:
                engine.prompt_model(
                    prompt,
                    "%1",
                    on_text,
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
                del engine._prompt_callback, engine._callback_decoder
            if failure:
                msg = (
                    "GPT4All could not run the prompt: "
                    f"{failure[0].removeprefix('ERROR: ')} Shorten the prompt or load "
                    "the model with a larger n_ctx."
                )
                if "context" in failure[0]:  # "The prompt size exceeds the context window"
                    raise ContextOverflowError(msg, prompt_tokens=counts["prompt"] or None)
                raise ValueError(msg)

        items = self.shared.stream(work)
        try:
            for text in items:
                tally.completion_tokens += 1
                if text:
                    yield text
        finally:
            items.close()  # the worker has ended: the counts are final
            tally.prompt_tokens = counts["prompt"]
            tally.finish_reason = "length" if counts["decoded"] >= p["max_tokens"] else "stop"
