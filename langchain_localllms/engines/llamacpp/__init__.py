"""llama.cpp in this process (llama-cpp-python), split by concern.

``engine``: load, tokenize, single calls with prefix reuse; ``prefix``: where a prefill
is cut so a cached prefix is exact; ``sampling``: the sampler chain and grammars;
``slots``: the batch context and its sequences; ``batching``: the continuous batch.
GGUF metadata, vocabulary, automatic context and the build check are in
:mod:`langchain_localllms.engines.gguf`, shared with the other GGUF runtimes.
"""

from langchain_localllms.engines.llamacpp.engine import LlamaCppEngine

__all__ = ["LlamaCppEngine"]
