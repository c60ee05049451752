"""Structured output's answers: parsed, and validated against the whole schema."""

from __future__ import annotations

import json
from typing import Any

from langchain_core.exceptions import OutputParserException
from langchain_core.messages import AIMessage
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.runnables import Runnable
from langchain_core.utils.pydantic import is_basemodel_subclass

from langchain_localllms.chat_models._tools import ToolCallError
from langchain_localllms.core.errors import SchemaValidationError
from langchain_localllms.grammars.schemas import load


def json_parser(schema: Any, json_schema: dict[str, Any] | None) -> Runnable[Any, Any]:
    """The answer's JSON: a pydantic model's instance, or validated against the schema.

    Partial JSON is parsed while streaming; the whole answer must be complete JSON (an
    answer cut at the token limit is an error, not a shorter object).
    """
    if isinstance(schema, type) and is_basemodel_subclass(schema):
        return ValidatedPydantic(pydantic_object=schema)
    return ValidatedJson(answer_schema=json_schema)


def whole_json(result: list[Any], schema: dict[str, Any] | None = None) -> Any:
    """The whole answer's JSON (validated against ``schema``): OutputParserException."""
    raw = result[0].text
    try:
        return load(raw, schema)
    except SchemaValidationError as e:
        raise OutputParserException(str(e), llm_output=raw) from e


class ValidatedJson(JsonOutputParser):
    """JSON whose whole answer must validate against a schema (where one is given)."""

    answer_schema: dict[str, Any] | None = None

    def parse_result(self, result: list[Any], *, partial: bool = False) -> Any:
        if partial:
            return super().parse_result(result, partial=True)
        return whole_json(result, self.answer_schema)


class ValidatedPydantic(PydanticOutputParser):  # type: ignore[type-arg]
    """A pydantic model's instance from the whole answer, which must be complete JSON."""

    def parse_result(self, result: list[Any], *, partial: bool = False) -> Any:
        if partial:
            return super().parse_result(result, partial=True)
        return self._parse_obj(
            whole_json(result)
        )  # pydantic v2 or v1; a typed OutputParserException


def first_call_args(message: AIMessage) -> dict[str, Any]:
    if not message.tool_calls:
        msg = f"the model made no tool call: {message.content!r:.200}"
        raise ToolCallError(msg)
    return dict(message.tool_calls[0]["args"])


def json_instruction(schema: dict[str, Any] | None) -> str:
    """What asks a model that no grammar constrains for a JSON answer."""
    if schema is None:
        return "Answer with a JSON object and nothing else."
    props = schema.get("properties")
    if isinstance(props, dict) and props and all(isinstance(p, dict) for p in props.values()):
        fields = "\n".join(
            f"- {name} ({spec.get('type', 'any')})"
            + (f": {spec['description']}" if spec.get("description") else "")
            for name, spec in props.items()
        )
        return f"Answer with a JSON object with these fields, and nothing else:\n{fields}"
    return (
        "Answer with a JSON value that validates against this JSON schema, and "
        f"nothing else:\n{json.dumps(plain_schema(schema))}"
    )


def plain_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON schema without the keys llama.cpp's converter does not need."""
    return {k: v for k, v in schema.items() if k not in ("title", "description")}
