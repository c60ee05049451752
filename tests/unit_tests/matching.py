"""Feed text through a compiled constraint, byte by byte, with no model."""

from __future__ import annotations

from typing import Any

import llguidance

from langchain_localllms.grammars import Grammar
from langchain_localllms.grammars.guidance import Guide


class _Bytes:
    """A tokenizer of 256 one-byte tokens and an end token: any text, in its bytes."""

    tokens = [bytes([i]) for i in range(256)] + [b"<end>"]
    eos_token_id = 256
    bos_token_id = None

    def __call__(self, text: Any) -> list[int]:
        return list(text.encode() if isinstance(text, str) else text)


BYTES = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Bytes()))


def guide(grammar: Grammar, *, closed: bool = True) -> Guide:
    """The grammar as the in-process runtimes compile it, over byte tokens.

    ``closed=False``: objects without ``additionalProperties`` stay open, as JSON
    Schema reads them (the runtimes close them: see ``closed_object``).
    """
    return Guide(BYTES, grammar, closed=closed)


def accepts(compiled: Guide, text: str) -> bool:
    """Whether the constraint admits ``text`` as a whole answer."""
    matcher = compiled.matcher()
    data = list(text.encode())
    return matcher.try_consume_tokens(data) == len(data) and matcher.is_accepting()
