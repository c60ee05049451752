"""Sampling one llama.cpp sequence.

llama-cpp-python's sampler chain, with llguidance's mask first where a grammar
constrains the answer, and GBNF checked by llama.cpp's parser.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from langchain_localllms.core.errors import GrammarSyntaxError
from langchain_localllms.core.imports import require
from langchain_localllms.grammars.guidance import Guide, advance, mask_logits

_log = logging.getLogger(__name__)


def checked_grammar(llm: Any, gbnf: str, *, verbose: bool) -> Any:
    """A ``LlamaGrammar`` of ``gbnf`` that llama.cpp's own parser has accepted."""
    llama_cpp = require("llama_cpp")
    llama_grammar = require("llama_cpp.llama_grammar", feature="LlamaCpp")
    sampler = llama_cpp.llama_sampler_init_grammar(llm._model.vocab, gbnf.encode(), b"root")
    if not sampler:
        msg = (
            "llama.cpp cannot parse this grammar (its parser's message is on stderr; "
            "a repetition like x{0,100} inside another repetition is a usual cause: "
            "llama.cpp refuses grammars that expand past its limit)"
        )
        raise GrammarSyntaxError(msg)
    llama_cpp.llama_sampler_free(sampler)
    return llama_grammar.LlamaGrammar.from_string(gbnf, verbose=verbose)


class Guided:
    """A sampler chain that first masks the tokens llguidance does not allow next.

    Sampling, penalties and seed are the chain's, as ``Llama.generate`` builds it;
    the mask comes first, so they only ever see allowed tokens.
    """

    def __init__(self, llm: Any, p: Mapping[str, Any], guide: Guide) -> None:
        self.matcher = guide.matcher()

        def mask(_ids: Any, logits: Any) -> Any:
            mask_logits(self.matcher, logits)
            return logits

        self.chain = sampler_chain(llm, p, None, [mask])
        self.sampler = self.chain.sampler

    def sample(self, ctx: Any, index: int = -1) -> int:
        """Sample one token (the mask applied first) and tell the matcher."""
        token: int = self.chain.sample(ctx, index)
        advance(self.matcher, token)
        return token

    def forced(self, room: int) -> list[int]:
        """Up to ``room`` tokens the grammar forces next, taken as if sampled.

        Guidance's fast-forward (SGLang's jump-forward): a key or punctuation the
        schema fixes is not sampled token by token. The chain sees them too (its
        penalties count them).
        """
        tokens: list[int] = list(self.matcher.compute_ff_tokens())[:room]
        for token in tokens:
            advance(self.matcher, token)
            self.chain.accept(token)
        return tokens

    def close(self) -> None:
        """Free the sampler chain."""
        self.chain.close()


#: The most tokens fast-forwarded at once (one llama_decode holds them and the last
#: sampled token, within any n_batch).
FORCED_MAX = 32


def forced_run(sampler: Any, room: int) -> list[int]:
    """The tokens the grammar allows no choice for next (at most ``room``); none unguided."""
    room = min(room, FORCED_MAX)
    return sampler.forced(room) if isinstance(sampler, Guided) and room > 0 else []


def make_sampler(llm: Any, p: Mapping[str, Any], grammar: Any) -> Any:
    """A sampler chain for one sequence, built exactly as ``Llama.generate`` builds it."""
    if isinstance(grammar, Guide):
        return Guided(llm, p, grammar)
    return sampler_chain(llm, p, grammar, None)


def sampler_chain(llm: Any, p: Mapping[str, Any], grammar: Any, processors: Any) -> Any:
    """llama-cpp-python's sampler chain for sampling parameters ``p`` (seed set)."""
    llama_cpp = require("llama_cpp")
    llm.set_seed(p["seed"] if p["seed"] >= 0 else llama_cpp.LLAMA_DEFAULT_SEED)
    return llm._init_sampler(
        top_k=p["top_k"],
        top_p=p["top_p"],
        min_p=p["min_p"],
        typical_p=p["typical_p"],
        temp=p["temperature"],
        repeat_penalty=p["repeat_penalty"],
        frequency_penalty=p["frequency_penalty"],
        presence_penalty=p["presence_penalty"],
        mirostat_mode=p["mirostat_mode"],
        mirostat_tau=p["mirostat_tau"],
        mirostat_eta=p["mirostat_eta"],
        grammar=grammar,
        logits_processor=processors,
    )


# ------------------------------------------------------------ exact prefix reuse
# llama.cpp does not compute a token alike in every batch: its CPU kernels pick their
# path and tiling by the number of tokens in a llama_decode (a batch of one takes the
# vector path; repacked K-quants take a GEMM for rows in whole groups of four), and a
# token's KV differs, by up to ~0.75 in Gemma-3-270M Q4_K_M's logits, depending on
# where a prompt was split. So every prompt is evaluated in pieces cut at places that
# depend only on its length (prefill_cuts), and a prefix is reused only up to a cut
# that a cold prefill of the new prompt makes too, with the same cuts before it: each
# reused piece was computed from the same tokens, positions and earlier KV as a cold
# prefill computes it, and the answer is a cold call's whatever the kernels do.

#: The most prompt tokens per llama_decode: 256 evaluate as fast as 512 here (Gemma-3-
#: 270M, 2 cores, 450-token prompt: 791 vs 790 tokens/s median of 14, interleaved;
#: 128: 734), and a prompt is cut at every multiple of this size.
