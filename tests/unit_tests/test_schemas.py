"""Schemas at bind time: refused with the keyword and its pointer, relaxed on request,
named when untitled; answers validated; hostile schemas bounded."""

from __future__ import annotations

import contextlib
import json
import time

import pytest

from langchain_localllms.errors import SchemaNotSupported, SchemaValidationError
from langchain_localllms.grammars import Grammar
from langchain_localllms.grammars.schemas import named, prepare, unsupported, validate
from tests.unit_tests.matching import accepts, guide

TAGS = {
    "type": "object",
    "properties": {"tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}},
}


def test_a_keyword_the_engine_cannot_enforce_is_refused_with_its_pointer():
    with pytest.raises(SchemaNotSupported) as e:
        prepare(TAGS, "llguidance")
    assert (e.value.keyword, e.value.pointer, e.value.runtime) == (
        "uniqueItems",
        "/properties/tags",
        "llguidance",
    )
    assert "strict=False" in str(e.value)
    assert isinstance(e.value, ValueError)


def test_strict_false_relaxes_with_a_warning_and_the_answer_is_still_validated():
    with pytest.warns(UserWarning, match="uniqueItems.*/properties/tags"):
        relaxed = prepare(TAGS, "llguidance", strict=False)
    assert "uniqueItems" not in relaxed["properties"]["tags"]
    assert "uniqueItems" in TAGS["properties"]["tags"]  # the user's schema is untouched
    with pytest.raises(SchemaValidationError, match="non-unique") as e:
        validate(TAGS, {"tags": ["a", "a"]}, '{"tags": ["a", "a"]}')
    assert e.value.raw == '{"tags": ["a", "a"]}'


def test_servers_enforce_less_than_llguidance():
    bounded = {"type": "number", "minimum": 0.5}
    assert unsupported(bounded, "llguidance") == []
    assert unsupported(bounded, "llama.cpp server")[0][1] == "minimum"
    rating = {"type": "integer", "minimum": 1}
    assert unsupported(rating, "llama.cpp server") == []
    assert unsupported(rating, "llama-cpp-python converter")[0][1] == "minimum"
    assert unsupported({"type": "string", "format": "email"}, "llama.cpp server")
    assert unsupported({"$ref": "https://example.com/s.json"}, "llguidance")


def test_no_op_values_and_vendor_keys_are_not_refused():
    schema = {"type": "array", "uniqueItems": False, "minItems": 0, "x-order": 3}
    assert prepare(schema, "llguidance") == schema


def test_an_invalid_schema_is_refused_not_crashed_on():
    with pytest.raises(SchemaNotSupported, match="not a valid JSON schema"):
        prepare({"type": "strnig"}, None)
    with pytest.raises(SchemaNotSupported, match="must be an object"):
        prepare(True, "llguidance")


def test_untitled_schemas_are_named():
    assert named({"type": "object"})["title"] == "Answer"
    assert named({"title": "Mine", "description": "d"})["title"] == "Mine"


def test_bounds_patterns_and_formats_are_enforced():
    # The two schemas that crashed llama.cpp through llama-cpp-python's converter,
    # and the pydantic ge/le bounds it ignored.
    mongo = guide(Grammar.from_json_schema({"type": "string", "pattern": "^[A-Fa-f\\d]{24}$"}))
    assert accepts(mongo, json.dumps("a" * 24))
    assert not accepts(mongo, json.dumps("a" * 23))
    assert not accepts(mongo, json.dumps("g" * 24))
    rating = guide(Grammar.from_json_schema({"type": "integer", "minimum": 1, "maximum": 5}))
    assert [accepts(rating, str(n)) for n in range(7)] == [False] + [True] * 5 + [False]
    event = {
        "type": "object",
        "properties": {f"field{i}": {"type": "string", "maxLength": 100} for i in range(20)},
        "required": [f"field{i}" for i in range(20)],
        "additionalProperties": False,
    }
    compiled = guide(Grammar.from_json_schema(event))
    assert accepts(compiled, json.dumps({f"field{i}": "x" * i for i in range(20)}))
    assert not accepts(compiled, json.dumps({f"field{i}": "x" * 101 for i in range(20)}))


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(10_000)}},
        {"enum": [f"value-{i}" for i in range(100_000)]},
        {"type": "string", "pattern": "^(a+)+$"},
        {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
        {"type": "string", "pattern": "^[a-z]{1000}[0-9]{1000}(x|y){500}$"},
    ],
    ids=["10k-properties", "100k-enum", "catastrophic-pattern", "self-ref", "huge-repeat"],
)
def test_hostile_schemas_compile_or_are_refused_within_a_bound(schema):
    start = time.monotonic()
    with contextlib.suppress(SchemaNotSupported):  # any other error fails the test
        guide(Grammar.from_json_schema(schema))
    assert time.monotonic() - start < 60  # a bound, not a speed target (see make bench)


def test_deep_nesting_is_refused_not_a_recursion_error():
    deep: dict = {"type": "string"}
    for _ in range(3000):
        deep = {"type": "array", "items": deep}
    with pytest.raises(SchemaNotSupported, match="nested deeper"):
        guide(Grammar.from_json_schema(deep))
    with pytest.raises(SchemaNotSupported, match="nested deeper"):
        prepare(deep, "llguidance")


def keyword_table() -> str:
    """The keyword table of docs/structured_output.md, from the engines' own tables."""
    from langchain_localllms.grammars.schemas import (
        ANNOTATIONS,
        ENGINES,
        GUIDANCE_FORMATS,
        SERVER_FORMATS,
    )  # fmt: skip

    columns = {
        "llguidance": "LlamaCpp, HuggingFacePipeline (torch, OpenVINO)",
        "llama.cpp server": "Llamafile `json_schema`, Ollama `format`",
        "llama-cpp-python converter": "ChatLlamafile tool calls (auto, or in tags)",
    }
    keywords = sorted(set().union(*ENGINES.values()) - ANNOTATIONS)
    refused = ["not", "if / then / else", "uniqueItems", "contains", "propertyNames",
               "dependentRequired", "dependentSchemas", "unevaluatedProperties",
               "unevaluatedItems", "$dynamicRef", "remote $ref"]  # fmt: skip
    notes = {
        ("llama.cpp server", "format"): ", ".join(sorted(SERVER_FORMATS)),
        ("llama-cpp-python converter", "format"): ", ".join(sorted(SERVER_FORMATS)),
        ("llguidance", "format"): ", ".join(sorted(GUIDANCE_FORMATS)),
    }
    lines = ["| keyword | " + " | ".join(columns.values()) + " |",
             "|---|" + ":---:|" * len(columns)]  # fmt: skip
    for key in keywords:
        cells = []
        for engine in columns:
            cell = "yes" if key in ENGINES[engine] else "refused"
            if (
                cell == "yes"
                and engine != "llguidance"
                and key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
            ):
                cell = "integers only"
            cells.append(notes.get((engine, key), cell))
        lines.append(f"| `{key}` | " + " | ".join(cells) + " |")
    lines.append("| " + ", ".join(f"`{k}`" for k in refused) + " | "
                 + " | ".join(["refused"] * len(columns)) + " |")  # fmt: skip
    return "\n".join(lines)


def test_the_docs_keyword_table_is_the_engines_tables():
    from pathlib import Path

    page = Path(__file__).parents[2] / "docs" / "structured_output.md"
    assert keyword_table() in page.read_text(encoding="utf-8"), keyword_table()


def test_unknown_keys_are_annotations_and_draft4_bounds_are_read():
    # Real-world schemas carry draft-04's "id", "readonly", "links", "_format", ...
    vendor = {"id": "urn:x", "type": "object", "readonly": True, "links": [],
              "properties": {"a": {"type": "string", "_format": "x"}}}  # fmt: skip
    assert prepare(vendor, "llguidance") == vendor
    draft4 = {"$schema": "http://json-schema.org/draft-04/schema#", "type": "integer",
              "minimum": 1, "maximum": 5, "exclusiveMaximum": True}  # fmt: skip
    modern = prepare(draft4, "llguidance")
    assert modern["exclusiveMaximum"] == 5
    assert "maximum" not in modern
    assert draft4["exclusiveMaximum"] is True  # the user's schema is left as it is
    # A grammar made from the draft-04 schema itself (grammar= per call) reads it too.
    compiled = guide(Grammar.from_json_schema(draft4))
    assert accepts(compiled, "4")
    assert not accepts(compiled, "5")
    with pytest.raises(SchemaValidationError):
        validate(draft4, 5, "5")  # the user's schema, validated by its own draft
