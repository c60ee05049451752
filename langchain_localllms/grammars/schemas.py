"""JSON schemas as each runtime can enforce them: keyword tables, refusal, validation.

A runtime that constrains decoding enforces some JSON Schema keywords and not others.
What it cannot enforce is refused when the schema is bound
(:class:`~langchain_localllms.core.errors.SchemaNotSupported`, naming the keyword and its
JSON pointer) unless the user passes ``strict=False``; then the keyword is dropped
from the constraint with a warning. Either way every answer is validated against the
user's whole schema (:func:`validate`), so an answer that breaks it is an error,
never a result.

The tables are what the JSON Schema Test Suite shows each engine enforces
(``tests/unit_tests/test_schema_suite.py`` checks them against every case of it).
"""

from __future__ import annotations

import copy
import functools
import json
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from langchain_localllms.core.errors import SchemaNotSupported, SchemaValidationError
from langchain_localllms.core.imports import require

__all__ = [
    "ENGINES",
    "GUIDANCE",
    "SERVER",
    "check_depth",
    "load",
    "modern_bounds",
    "named",
    "prepare",
    "rewritten",
    "subschemas",
    "unsupported",
    "validate",
]

#: Every keyword of JSON Schema (drafts 4 to 2020-12) that constrains an instance. A
#: key outside this set constrains nothing (an annotation, a vendor key such as
#: ``id``, ``readonly``, ``links``): it is accepted everywhere, as validators ignore it.
ASSERTIONS = frozenset(
    {
        "type", "enum", "const", "multipleOf", "maximum", "exclusiveMaximum", "minimum",
        "exclusiveMinimum", "maxLength", "minLength", "pattern", "maxItems", "minItems",
        "uniqueItems", "maxContains", "minContains", "maxProperties", "minProperties",
        "required", "dependentRequired", "dependentSchemas", "dependencies", "properties",
        "patternProperties", "additionalProperties", "propertyNames", "items", "prefixItems",
        "additionalItems", "contains", "unevaluatedItems", "unevaluatedProperties", "allOf",
        "anyOf", "oneOf", "not", "if", "then", "else", "$ref", "$dynamicRef", "$recursiveRef",
        "format", "$defs", "definitions",
    }
)  # fmt: skip

#: Keywords that constrain nothing (annotations), accepted by every engine.
ANNOTATIONS = frozenset(
    {
        "title", "description", "default", "examples", "$schema", "$id", "$comment",
        "deprecated", "readOnly", "writeOnly", "$anchor", "contentMediaType",
        "contentEncoding", "x-guidance",
    }
)  # fmt: skip

#: What llguidance enforces (LlamaCpp and HuggingFacePipeline / OpenVINO in process).
#: ``oneOf`` only where its branches cannot overlap (llguidance refuses it otherwise).
GUIDANCE = ANNOTATIONS | {
    "type", "enum", "const", "properties", "required", "additionalProperties",
    "patternProperties", "items", "prefixItems", "minItems", "maxItems", "minLength",
    "maxLength", "pattern", "format", "minimum", "maximum", "exclusiveMinimum",
    "exclusiveMaximum", "multipleOf", "anyOf", "allOf", "oneOf", "$ref", "$defs",
    "definitions", "minProperties", "maxProperties",
}  # fmt: skip

#: What llama.cpp's schema converter enforces (llama-server's ``json_schema``, which
#: llamafile and Ollama's ``format`` use): bounds only on integers, four formats.
SERVER = ANNOTATIONS | {
    "type", "enum", "const", "properties", "required", "additionalProperties", "items",
    "prefixItems", "minItems", "maxItems", "minLength", "maxLength", "pattern",
    "format", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "anyOf",
    "allOf", "$ref", "$defs", "definitions",
}  # fmt: skip
SERVER_FORMATS = frozenset({"date", "time", "date-time", "uuid"})
#: The formats llguidance writes grammars for (others it refuses).
GUIDANCE_FORMATS = frozenset(
    {"date", "time", "date-time", "duration", "email", "hostname", "ipv4", "ipv6", "uri", "uuid"}
)

#: What llama-cpp-python's Python converter enforces (GBNF made on the client, for
#: ChatLlamafile's tool calls): no numeric bounds (its source: "TODO: support minimum").
CLIENT_GBNF = SERVER - {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}

#: Engine name -> the keywords it enforces.
ENGINES: Mapping[str, frozenset[str]] = {
    "llguidance": GUIDANCE,
    "llama.cpp server": SERVER,
    "llama-cpp-python converter": CLIENT_GBNF,
}

#: Keywords whose value holds schemas: one, a list, or a name -> schema map.
_ONE = (
    "additionalProperties", "items", "not", "if", "then", "else", "contains",
    "propertyNames", "unevaluatedProperties", "unevaluatedItems", "additionalItems",
)  # fmt: skip
_LIST = ("prefixItems", "anyOf", "allOf", "oneOf")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
#: Values that constrain nothing, whatever the engine.
_NO_OPS = {"uniqueItems": False, "minItems": 0, "minLength": 0, "minProperties": 0}


def _escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


def subschemas(schema: Any, pointer: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every object schema inside ``schema`` (itself first), with its JSON pointer."""
    if not isinstance(schema, dict):
        return
    yield pointer, schema
    for key in _ONE:
        if isinstance(schema.get(key), dict):
            yield from subschemas(schema[key], f"{pointer}/{key}")
    for key in (*_LIST, "items"):
        if isinstance(schema.get(key), list):
            for i, sub in enumerate(schema[key]):
                yield from subschemas(sub, f"{pointer}/{key}/{i}")
    for key in _MAP:
        if isinstance(schema.get(key), dict):
            for name, sub in schema[key].items():
                yield from subschemas(sub, f"{pointer}/{key}/{_escape(str(name))}")


def _refused(key: str, value: Any, node: Mapping[str, Any], engine: str) -> str | None:
    """Why ``engine`` cannot enforce ``key: value`` in ``node`` (None: it can)."""
    if key in _NO_OPS and type(value) is type(_NO_OPS[key]) and value == _NO_OPS[key]:
        return None
    if key not in ASSERTIONS:
        return None  # an annotation or a vendor key: it constrains nothing
    if key not in ENGINES[engine]:
        return f"{engine} does not enforce {key!r}"
    if key == "$ref" and not str(value).startswith("#"):
        return f"a $ref outside this schema ({value!r}) cannot be resolved offline"
    if engine == "llguidance" and key == "format" and value not in GUIDANCE_FORMATS:
        return f"llguidance enforces no format {value!r}"
    if engine != "llguidance":
        types = node.get("type")
        if key == "format" and value not in SERVER_FORMATS:
            return f"llama.cpp's converter enforces no format {value!r}"
        if key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum") and (
            types != "integer"
        ):
            return f"llama.cpp's converter enforces {key!r} only on integers"
    return None


def unsupported(schema: Any, engine: str) -> list[tuple[str, str, str]]:
    """``(pointer, keyword, why)`` for each keyword of ``schema`` ``engine`` cannot enforce."""
    found = []
    for pointer, node in subschemas(schema):
        for key, value in node.items():
            why = _refused(key, value, node, engine)
            if why is not None:
                found.append((pointer, key, why))
    return found


def prepare(
    schema: Any, engine: str | None, *, strict: bool | None = True, warn: bool = True
) -> dict[str, Any]:
    """``schema`` as ``engine`` will enforce it, or :class:`SchemaNotSupported`.

    ``engine`` None: the runtime does not constrain decoding (the answer is only
    validated): the schema is taken as it is. ``strict`` False drops what the engine
    cannot enforce, with one warning that lists it.
    """
    if isinstance(schema, bool) or not isinstance(schema, dict):
        msg = f"a JSON schema must be an object, got {type(schema).__name__}"
        raise SchemaNotSupported(msg, runtime=engine or "")
    _check_schema(schema)
    if engine is None:
        return schema
    checked: dict[str, Any] = rewritten(schema, modern_bounds)
    found = unsupported(checked, engine)
    if not found:
        return checked
    if strict is not False:
        pointer, key, why = found[0]
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        msg = (
            f"the JSON schema has {key!r} at {pointer or '/'} that {engine} cannot enforce "
            f"while decoding: {why}{more}. Remove it, or pass strict=False to relax it "
            "(the answer is still validated against the whole schema)"
        )
        raise SchemaNotSupported(msg, keyword=key, pointer=pointer, runtime=engine)
    relaxed: dict[str, Any] = copy.deepcopy(checked)
    nodes = dict(subschemas(relaxed))
    for pointer, key, _ in found:
        nodes[pointer].pop(key, None)
    listed = ", ".join(f"{key!r} at {pointer or '/'}" for pointer, key, _ in found)
    if warn:
        warnings.warn(
            f"strict=False: {engine} does not enforce {listed}; the answer is validated "
            "against them after decoding",
            stacklevel=3,
        )
    return relaxed


def rewritten(schema: Any, edit: Callable[[dict[str, Any]], None]) -> Any:
    """A copy of ``schema`` with ``edit`` applied to each schema in it (itself first).

    The user's schema is left as it is: it is what answers are validated against.
    """
    copied = copy.deepcopy(schema)
    for _, node in subschemas(copied):
        edit(node)
    return copied


def modern_bounds(node: dict[str, Any]) -> None:
    """Draft 4's ``"maximum": 5, "exclusiveMaximum": true`` as 2020-12 writes it.

    Engines read ``exclusiveMaximum`` as a number.
    """
    for exclusive, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        flag = node.get(exclusive)
        if isinstance(flag, bool):
            del node[exclusive]
            if flag and bound in node:
                node[exclusive] = node.pop(bound)


def named(schema: dict[str, Any], default: str = "Answer") -> dict[str, Any]:
    """``schema`` with a ``title`` (and a ``description``), as LangChain's tools need."""
    if schema.get("title") and "description" in schema:
        return schema
    return {"title": default, "description": "", **schema}


#: The deepest nesting of a schema (or an answer) that is compiled or validated.
MAX_DEPTH = 128


def check_depth(value: Any, what: str = "the JSON schema") -> None:
    """:class:`SchemaNotSupported` for ``value`` nested deeper than :data:`MAX_DEPTH`.

    Compilers and validators recurse: a deeper schema would end in a RecursionError.
    """
    level = [value] if isinstance(value, (dict, list)) else []
    for _ in range(MAX_DEPTH + 1):
        level = [
            v
            for node in level
            for v in (node.values() if isinstance(node, dict) else node)
            if isinstance(v, (dict, list))
        ]
        if not level:
            return
    msg = f"{what} is nested deeper than {MAX_DEPTH} levels"
    raise SchemaNotSupported(msg)


def _check_schema(schema: dict[str, Any]) -> None:
    """A schema that is not a valid JSON schema is refused (SchemaNotSupported)."""
    check_depth(schema)
    try:
        _validator(_key(schema))
    except SchemaNotSupported:
        raise
    except Exception as e:
        msg = f"not a valid JSON schema: {e}"
        raise SchemaNotSupported(msg) from e


def _key(schema: Any) -> str:
    return json.dumps(schema, sort_keys=True, default=str)


@functools.lru_cache(maxsize=256)
def _validator(key: str) -> Any:
    jsonschema = require("jsonschema", feature="JSON schema validation")
    schema = json.loads(key)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/" + "/".join(_escape(str(p)) for p in e.absolute_path)
        msg = f"not a valid JSON schema at {where}: {e.message}"
        raise SchemaNotSupported(msg) from None
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def load(raw: str, schema: dict[str, Any] | None = None) -> Any:
    """The JSON value of a whole answer, validated against ``schema`` where one is given.

    Raises :class:`SchemaValidationError` (with ``raw``) for text that is not complete
    JSON (an answer cut at the token limit is never read as a shorter value) or a
    value that breaks the schema.
    """
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        msg = (
            f"the answer is not complete JSON ({e}; was it cut at the token limit?): {raw[:200]!r}"
        )
        raise SchemaValidationError(msg, raw=raw, errors=[str(e)]) from e
    return value if schema is None else validate(schema, value, raw)


def validate(schema: dict[str, Any], value: Any, raw: str) -> Any:
    """``value`` if it validates against ``schema``, else :class:`SchemaValidationError`."""
    check_depth(value, "the answer")
    try:
        errors = sorted(_validator(_key(schema)).iter_errors(value), key=lambda e: list(e.path))
    except SchemaNotSupported:
        raise
    except Exception as e:  # an unresolvable $ref, a bad pattern: the schema's fault
        msg = f"cannot validate against this schema: {e}"
        raise SchemaNotSupported(msg) from e
    if not errors:
        return value
    found = [
        f"{'/' + '/'.join(_escape(str(p)) for p in e.absolute_path)}: {e.message}" for e in errors
    ]
    msg = f"the answer does not validate against its schema: {'; '.join(found[:3])}"
    raise SchemaValidationError(msg, raw=raw, errors=found)
