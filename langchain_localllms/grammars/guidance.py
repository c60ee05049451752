"""llguidance: the constraint engine of the runtimes that decode in this process.

It compiles JSON schemas with the widest coverage of the engines JSONSchemaBench
measured (Guidance, built on it, led; arXiv 2501.10868): integer and number bounds,
string lengths, patterns, formats, ``$ref``, ``anyOf`` / ``allOf``. It refuses what it
cannot enforce, with a message, instead of relaxing it, and keeps compiling and
masking within fixed limits (:func:`_limits`), so no schema hangs or crashes the
process. A token mask comes from a matcher per sequence; the runtime applies it to
the logits before sampling, and takes the tokens it forces without sampling them
(:meth:`Guide.matcher`'s ``compute_ff_tokens``).
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from langchain_localllms.core.errors import GrammarSyntaxError, SchemaNotSupported
from langchain_localllms.core.imports import require
from langchain_localllms.grammars.schemas import check_depth, modern_bounds, rewritten

if TYPE_CHECKING:
    from langchain_localllms.grammars import Grammar

__all__ = ["JSON_STYLE", "Guide", "advance", "bounded_integers", "grammar_text", "mask_logits"]

#: How constrained JSON is written: one line, ``", "`` and ``": "``, no other
#: whitespace (a small model given free whitespace can write newlines until its
#: token limit).
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_FEATURE = "grammars and JSON schemas with this runtime"

#: The largest integer a grammar lets a model write where its schema sets no bound:
#: 16 digits, as llama.cpp's schema converter allows. Unbounded, a small model can
#: write zeros until its token limit (measured: Gemma-3-270M's forced ``"days":
#: 1000...`` ran past 64 tokens), which never parses.
INTEGER_BOUND = 10**16 - 1


def bounded_integers(node: dict[str, Any]) -> None:
    """Give an integer schema without a bound +-:data:`INTEGER_BOUND` (a node edit)."""
    types = node.get("type")
    if types == "integer" or (isinstance(types, list) and "integer" in types):
        if "minimum" not in node and "exclusiveMinimum" not in node:
            node["minimum"] = -INTEGER_BOUND
        if "maximum" not in node and "exclusiveMaximum" not in node:
            node["maximum"] = INTEGER_BOUND


def _llg() -> Any:
    return require("llguidance", feature=_FEATURE)


def _limits() -> Any:
    """The bounds on grammar size and per-token work.

    llguidance's defaults, but for the grammar size: 10k-property schemas compile in
    seconds, not minutes.
    """
    return _llg().LLParserLimits(max_grammar_size=200_000)


def closed_object(node: dict[str, Any]) -> None:
    """Let an object admit only its listed properties, where it says nothing (a node edit).

    An answer then holds the fields asked for (Gemma-3-270M, given an open ``Person``,
    went on with ``"salary": 1000...`` until its token limit), as llama.cpp's converter
    and xgrammar's strict mode write objects. It only narrows: every answer still
    validates. :func:`_styled` leaves a schema with ``allOf`` open (closing one of its
    parts would refuse the others' properties).
    """
    open_keys = ("additionalProperties", "patternProperties", "unevaluatedProperties")
    if isinstance(node.get("properties"), dict) and not any(k in node for k in open_keys):
        node["additionalProperties"] = False


def _styled(schema: dict[str, Any], lenient: bool, closed: bool = True) -> dict[str, Any]:
    """The schema as llguidance compiles it.

    Written as :data:`JSON_STYLE`, with draft 4's bounds as 2020-12 writes them,
    integers bounded, objects closed (:func:`closed_object`), and (``lenient``)
    keywords it cannot enforce left out.
    """
    close = closed and "allOf" not in json.dumps(schema)

    def edit(node: dict[str, Any]) -> None:
        modern_bounds(node)
        bounded_integers(node)
        if close:
            closed_object(node)

    # Relaxed (strict=False): keywords llguidance does not implement are left out, and
    # oneOf is read as anyOf (an answer that matches two branches fails validation).
    style = {**JSON_STYLE, **({"lenient": True, "coerce_one_of": True} if lenient else {})}
    edited = rewritten(schema, edit)
    return {**edited, "x-guidance": {**style, **schema.get("x-guidance", {})}}


def grammar_text(g: Grammar, *, closed: bool = True) -> str:
    """``g`` as an llguidance grammar: a JSON schema, a GBNF template around one, GBNF.

    ``closed``: objects admit only their listed properties (:func:`closed_object`).
    """
    llg = _llg()
    if g.schema is not None or g.slot is not None:
        check_depth(g.schema if g.slot is None else g.slot[1])
    if g.schema is not None:
        try:
            styled = _styled(g.schema, g.lenient, closed)
            return str(llg.LLMatcher.grammar_from_json_schema(styled))
        except ValueError as e:
            raise SchemaNotSupported(f"llguidance cannot read this JSON schema: {e}") from e
    gbnf_to_lark = require("llguidance.gbnf_to_lark", feature=_FEATURE)
    if g.slot is None:
        return str(llg.LLMatcher.grammar_from_lark(_to_lark(gbnf_to_lark, g.gbnf)))
    assert g.template is not None
    rule, schema = g.slot
    placeholder = "slot-value-7e3b9a05"  # a literal no template writes
    lark = _to_lark(gbnf_to_lark, f"{g.template.rstrip()}\n{rule} ::= {json.dumps(placeholder)}\n")
    # The converter names the slot as it likes (json-call -> JSON_CALL): find it by
    # its placeholder, and make it a rule that is the schema's JSON.
    found = re.search(rf"^(\w+)\s*:\s*{re.escape(json.dumps(placeholder))}\s*$", lark, re.M)
    if found is None:
        msg = f"cannot place the JSON value {rule!r} in the grammar {g!r}"
        raise GrammarSyntaxError(msg)
    name = found.group(1)
    lark = re.sub(rf"\b{name}\b", "slot_value", lark[: found.start()] + lark[found.end() :])
    value = json.dumps(_styled(schema, g.lenient, closed))
    return str(llg.LLMatcher.grammar_from_lark(f"{lark}\nslot_value: %json {value}\n"))


def _to_lark(gbnf_to_lark: Any, gbnf: str) -> str:
    try:
        return str(gbnf_to_lark.gbnf_to_lark(gbnf))
    except Exception as e:
        msg = f"llguidance cannot read this GBNF grammar: {e}"
        raise GrammarSyntaxError(msg) from e


_RELAX = (
    ". Pass strict=False to relax what it cannot enforce (the answer is still validated "
    "against the whole schema)"
)


class Guide:
    """A grammar compiled for one tokenizer; each sequence decodes with a copy of it."""

    def __init__(self, tokenizer: Any, g: Grammar, *, closed: bool = True) -> None:
        text = grammar_text(g, closed=closed)
        self._matcher = _llg().LLMatcher(tokenizer, text, limits=_limits(), log_level=0)
        if self._matcher.is_error():
            detail = self._matcher.get_error().strip()[:500]
            if g.schema is None and g.slot is None:  # GBNF the user wrote
                raise GrammarSyntaxError(f"llguidance cannot compile this grammar: {detail}")
            raise SchemaNotSupported(
                f"llguidance cannot enforce this grammar: {detail}{_RELAX}", runtime="llguidance"
            )

    def matcher(self) -> Any:
        """A fresh matcher at the grammar's start."""
        return self._matcher.deep_copy()


def mask_logits(matcher: Any, logits: Any) -> None:
    """Set to -inf, in place, every logit of a token ``matcher`` does not allow next.

    ``logits`` is a 1-D float32 numpy array over the vocabulary (or wider: tokens
    past the tokenizer's vocabulary are never allowed).
    """
    np = require("numpy")
    mask = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
    allowed = np.unpackbits(mask, bitorder="little").view(bool)
    n = min(len(allowed), len(logits))
    logits[:n][~allowed[:n]] = -np.inf
    logits[n:] = -np.inf


def advance(matcher: Any, token: int) -> None:
    """Tell ``matcher`` the token that was sampled (it must have allowed it)."""
    if not matcher.consume_token(token):
        msg = f"the grammar refused token {token}, which its mask allowed: {matcher.get_error()}"
        raise RuntimeError(msg)
