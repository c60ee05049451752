"""The official JSON Schema Test Suite (draft 2020-12) against what the runtimes enforce.

For every schema of the suite, the in-process runtimes' constraint (llguidance, as
LlamaCpp and HuggingFacePipeline compile it) is either refused when the schema is
bound (``SchemaNotSupported``), or admits a valid instance and refuses an invalid
one, each fed through it byte by byte. And the validation every answer goes through
agrees with the suite on every instance. Formats are asserted, as a user who writes
``"format": "email"`` means (the suite's ``optional/format`` cases).

The suite ships in the ``jsonschema`` sdist (``make schema-suite`` unpacks it into
the model cache; ``LOCALLLMS_SCHEMA_SUITE`` names the folder).
"""

from __future__ import annotations

import itertools
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from langchain_localllms.errors import SchemaNotSupported, SchemaValidationError
from langchain_localllms.grammars import Grammar
from langchain_localllms.grammars.schemas import prepare, validate
from tests.unit_tests.matching import accepts, guide

_DEFAULT = Path(os.environ.get("LOCALLLMS_CACHE", Path.home() / ".cache/langchain-localllms"))
SUITE = Path(
    os.environ.get("LOCALLLMS_SCHEMA_SUITE", _DEFAULT / "json-schema-test-suite" / "draft2020-12")
)

#: Where the constraint and the suite disagree, and why. Each entry must still
#: disagree (the list only shrinks): (file, schema, instance) -> reason.
KNOWN = {
    ("format.json", "*", "*"): "formats are asserted here; the suite's main folder "
    "treats them as annotations (its optional/format cases assert them)",
    (
        "maxLength.json",
        "maxLength validation",
        "two graphemes is long enough",
    ): "llguidance counts code points, JSON Schema counts graphemes: narrower, never wider",
    (
        "additionalProperties.json",
        "non-ASCII pattern with additionalProperties",
        "matching the pattern is valid",
    ): "llguidance's pattern matches 'á' as two characters (UTF-8 bytes): narrower, never wider",
    (
        "optional/format/date.json",
        "*",
        "a invalid date string with 29 days in February (normal)",
    ): "the date grammar does not know leap years",
    ("optional/format/date.json", "*", "2021 is not a leap year"): "as above",
    ("optional/format/date-time.json", "*", "*leap second*"): "leap seconds are "
    "allowed at any minute by the grammar",
    ("optional/format/time.json", "*", "*leap second*"): "as above",
    ("optional/format/email.json", "*", "a quoted string *"): "quoted local parts "
    "are outside llguidance's email grammar: narrower",
    (
        "optional/format/email.json",
        "*",
        "an IPv6-address-literal after the @ is valid",
    ): "address literals are outside llguidance's email grammar: narrower",
    ("optional/format/ipv6.json", "*", "mixed format *"): "IPv4-in-IPv6 forms are "
    "outside llguidance's ipv6 grammar: narrower",
    ("optional/format/ipv6.json", "*", "a long valid ipv6"): "as above",
}


def _known(file: str, schema: str, instance: str) -> str | None:
    from fnmatch import fnmatchcase

    for (f, s, i), why in KNOWN.items():
        if fnmatchcase(file, f) and fnmatchcase(schema, s) and fnmatchcase(instance, i):
            return why
    return None


def _cases() -> list[tuple[str, dict[str, Any]]]:
    if not SUITE.is_dir():
        if os.environ.get("LOCALLLMS_SCHEMA_SUITE"):
            pytest.fail(f"the JSON Schema Test Suite is not at {SUITE}")
        return []
    files = sorted(SUITE.glob("*.json")) + sorted(SUITE.glob("optional/format/*.json"))
    return [
        (str(f.relative_to(SUITE)), case)
        for f in files
        for case in json.loads(f.read_text(encoding="utf-8"))
    ]


def _serializations(value: Any, limit: int = 48) -> list[Any]:
    """The value as a constraint may write it: key orders, 1.0 as 1 (same JSON value)."""
    if isinstance(value, float) and value.is_integer():
        return [value, int(value)]
    if isinstance(value, list):
        out: list[list[Any]] = [[]]
        for item in value:
            out = [[*o, v] for o in out for v in _serializations(item)][:limit]
        return out
    if isinstance(value, dict):
        found: list[Any] = []
        items = list(value.items())
        orders = itertools.permutations(items) if len(items) <= 4 else [items]
        for order in orders:
            parts: list[list[tuple[str, Any]]] = [[]]
            for key, item in order:
                parts = [[*p, (key, v)] for p in parts for v in _serializations(item)][:limit]
            found.extend(dict(p) for p in parts)
        return found[:limit]
    return [value]


CASES = _cases()


@pytest.mark.skipif(
    not CASES, reason="the JSON Schema Test Suite is not unpacked (make schema-suite)"
)
def test_every_schema_is_refused_or_enforced_exactly():
    counts: Counter[str] = Counter()
    wrong, used = [], set()
    for file, case in CASES:
        schema = case["schema"]
        try:
            grammar = Grammar.from_json_schema(prepare(schema, "llguidance"))
            compiled = guide(grammar, closed=False)
        except SchemaNotSupported:
            counts["refused"] += 1
            continue
        counts["enforced"] += 1
        for test in case["tests"]:
            admitted = any(accepts(compiled, json.dumps(v)) for v in _serializations(test["data"]))
            if admitted == test["valid"]:
                counts["agree"] += 1
                continue
            why = _known(file, case["description"], test["description"])
            if admitted and why is not None:
                # The grammar is wider here: the validation after decoding refuses it.
                with pytest.raises(SchemaValidationError):
                    validate(schema, test["data"], json.dumps(test["data"]))
            if why is None:
                kind = "admits an invalid" if admitted else "refuses a valid"
                wrong.append(
                    f"{file} / {case['description']}: {kind} instance: {test['description']}"
                )
            else:
                counts["known"] += 1
                used.add(why)
    print(dict(counts))
    assert not wrong, "\n".join(wrong)
    stale = [k for k, why in KNOWN.items() if why not in used and why != "as above"]
    assert not stale, f"no longer disagree (remove them from KNOWN): {stale}"
    assert counts["enforced"] > 150  # most of the suite compiles, not refused


@pytest.mark.skipif(
    not CASES, reason="the JSON Schema Test Suite is not unpacked (make schema-suite)"
)
def test_closing_objects_only_narrows():
    # The runtimes close objects that do not say additionalProperties (an answer holds
    # the fields asked for): what the closed constraint admits, the open one admits.
    narrowed = 0
    for _, case in CASES:
        try:
            grammar = Grammar.from_json_schema(prepare(case["schema"], "llguidance"))
            closed, open_ = guide(grammar), guide(grammar, closed=False)
        except SchemaNotSupported:
            continue
        for test in case["tests"]:
            for value in _serializations(test["data"]):
                text = json.dumps(value)
                if accepts(closed, text):
                    assert accepts(open_, text), (case["description"], test["description"])
                elif accepts(open_, text):
                    narrowed += 1
    assert narrowed > 0  # it does close some objects of the suite


@pytest.mark.skipif(
    not CASES, reason="the JSON Schema Test Suite is not unpacked (make schema-suite)"
)
def test_validation_of_answers_agrees_with_the_suite():
    # Every answer of a schema is validated before it is returned (formats are checked
    # by jsonschema's checkers, which are looser than the suite's optional cases: the
    # constraint test above covers formats).
    disagree = []
    for file, case in CASES:
        if "format" in file or file == "vocabulary.json" or not isinstance(case["schema"], dict):
            continue  # formats: see KNOWN; custom metaschemas and boolean roots are refused
        for test in case["tests"]:
            try:
                validate(case["schema"], test["data"], json.dumps(test["data"]))
                ok = True
            except SchemaValidationError:
                ok = False
            except SchemaNotSupported:
                continue
            if ok != test["valid"]:
                disagree.append(f"{file} / {case['description']}: {test['description']}")
    assert not disagree, "\n".join(disagree)
