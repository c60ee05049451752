"""make demo: a real model answers, streamed, then a line of timings."""

from __future__ import annotations

import sys
import time

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.prompts import PromptTemplate

import modelkit
from langchain_localllms import LlamaCpp


class Timings(BaseCallbackHandler):
    """Keeps the usage and timings LlamaCpp reports at the end of the stream."""

    info: dict = {}

    def on_llm_end(self, response, **kwargs):
        self.info = response.generations[0][0].generation_info or {}


def main() -> None:
    path = modelkit.path("gemma-gguf")
    t0 = time.perf_counter()
    llm = LlamaCpp(model_path=str(path), temperature=0.2, max_tokens=80, repeat_penalty=1.1)
    load_s = time.perf_counter() - t0
    prompt = PromptTemplate.from_template("Question: {question}\nAnswer: Let's think step by step.")
    chain = prompt | llm
    question = "Why is the sky blue?"
    print(f"Model: {path.name} (Gemma-3-270M base, Q4_K_M), loaded in {load_s:.1f}s")
    print(f"Question: {question}\nAnswer: Let's think step by step.", end="", flush=True)
    timings = Timings()
    for piece in chain.stream({"question": question}, config={"callbacks": [timings]}):
        print(piece, end="", flush=True)
    t = timings.info.get("timings", {})
    print(
        f"\n\n[{timings.info.get('prompt_tokens')} prompt tokens at "
        f"{t.get('prompt_tokens_per_second')} tok/s, {timings.info.get('completion_tokens')} "
        f"tokens generated at {t.get('completion_tokens_per_second')} tok/s, "
        f"finish_reason={timings.info.get('finish_reason')}]"
    )


if __name__ == "__main__":
    sys.exit(main())
