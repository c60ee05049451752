"""One grammar type for every runtime that can constrain decoding.

A :class:`Grammar` is made from GBNF text, a ``.gbnf`` file, a JSON schema or a
pydantic model, and is checked when it is made: a syntax error is a ``ValueError``
naming the line and column, before any native code sees it.

Runtimes take what they can use: llama.cpp and transformers in process compile it
with llguidance (:mod:`.guidance`; GBNF without a schema goes to llama.cpp's own
grammar sampler), the llama.cpp server takes GBNF or a JSON schema, Ollama a JSON
schema. What each enforces of a schema is in :mod:`.schemas`.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import pydantic

from langchain_localllms.core.errors import GrammarSyntaxError
from langchain_localllms.core.imports import require
from langchain_localllms.grammars.schemas import load

__all__ = [
    "Grammar",
    "GrammarField",
    "GrammarSyntaxError",
    "check_gbnf",
    "json_schema_of",
]


class Grammar:
    """A decoding constraint: GBNF text, a JSON schema, or both.

    Make one with :meth:`from_string`, :meth:`from_file`, :meth:`from_json_schema`,
    :meth:`from_pydantic` or :meth:`builtin`; :meth:`coerce` accepts any of those
    inputs (a GBNF string, a path, a schema dict, a pydantic class).
    """

    def __init__(
        self,
        *,
        gbnf: str | None = None,
        schema: dict[str, Any] | None = None,
        model: type[pydantic.BaseModel] | None = None,
        name: str | None = None,
        template: str | None = None,
        slot: tuple[str, dict[str, Any]] | None = None,
        lenient: bool = False,
    ) -> None:
        if gbnf is None and schema is None and slot is None:
            msg = "a Grammar needs GBNF text or a JSON schema"
            raise ValueError(msg)
        if gbnf is not None:
            check_gbnf(gbnf, source=name)
        if slot is not None:
            if template is None:
                msg = "a Grammar with a slot needs the GBNF template around it"
                raise ValueError(msg)
            check_gbnf(f'{template}\n{slot[0]} ::= "{{}}"\n', source=name)
        self._gbnf = gbnf
        self.schema = schema
        self.model = model
        self.name = name
        #: GBNF rules around a JSON value, and (``slot``) the rule that is the value and
        #: its schema: see :meth:`around_schema`.
        self.template = template
        self.slot = slot
        #: Keywords the engine cannot enforce are left out of the constraint (the
        #: answer is validated against them): ``strict=False``.
        self.lenient = lenient

    # --------------------------------------------------------------- makers
    @classmethod
    def from_string(cls, gbnf: str, *, name: str | None = None) -> Grammar:
        """A grammar from GBNF text (checked now)."""
        if not isinstance(gbnf, str):
            msg = f"GBNF grammar must be a string, got {type(gbnf).__name__}"
            raise TypeError(msg)
        return cls(gbnf=gbnf, name=name)

    @classmethod
    def from_file(cls, path: str | Path) -> Grammar:
        """A grammar from a ``.gbnf`` file."""
        p = Path(path).expanduser()
        if not p.is_file():
            msg = f"grammar file not found: {p}" + (" (it is a directory)" if p.is_dir() else "")
            raise FileNotFoundError(msg)
        return cls(gbnf=p.read_text(encoding="utf-8"), name=str(p))

    @classmethod
    def from_json_schema(cls, schema: dict[str, Any] | str, *, strict: bool = True) -> Grammar:
        """A grammar that only admits JSON matching ``schema``.

        ``strict=False``: keywords the runtime cannot enforce while decoding are left
        out of the constraint (with a warning) instead of refused; the answer is
        validated against the whole schema either way.
        """
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                msg = f"the JSON schema is not valid JSON: {e}"
                raise ValueError(msg) from e
        if not isinstance(schema, dict):
            msg = f"a JSON schema must be an object, got {type(schema).__name__}"
            raise TypeError(msg)
        return cls(schema=schema, lenient=not strict)

    @classmethod
    def from_pydantic(cls, model: type[pydantic.BaseModel]) -> Grammar:
        """A grammar for JSON that parses into the pydantic ``model``."""
        return cls(schema=model.model_json_schema(), model=model, name=model.__name__)

    @classmethod
    def around_schema(
        cls,
        template: str,
        rule: str,
        schema: dict[str, Any],
        *,
        name: str | None = None,
        strict: bool = True,
    ) -> Grammar:
        """GBNF ``template`` in which the rule ``rule`` is a JSON value of ``schema``.

        ``template`` names ``rule`` without defining it (``root ::= "<tag>" value
        "</tag>" | text ...``); it is checked now. The value's own rules come from the
        runtime's converter when it is used: llguidance's in process, llama-cpp-
        python's for GBNF sent to a server (:attr:`gbnf`).
        """
        return cls(template=template, slot=(rule, schema), name=name, lenient=not strict)

    @classmethod
    def builtin(cls, name: str) -> Grammar:
        """A grammar shipped with the package: ``"json"`` or ``"list"``."""
        names = sorted(p.name[:-5] for p in _builtin_dir().iterdir() if p.name.endswith(".gbnf"))
        if name not in names:
            msg = f"no built-in grammar {name!r}; built-ins: {', '.join(names)}"
            raise ValueError(msg)
        text = (_builtin_dir() / f"{name}.gbnf").read_text(encoding="utf-8")
        return cls(gbnf=text, name=name)

    @classmethod
    def coerce(cls, value: Any) -> Grammar:
        """Turn what a user passes as ``grammar=`` into a Grammar."""
        if isinstance(value, Grammar):
            return value
        if isinstance(value, type) and issubclass(value, pydantic.BaseModel):
            return cls.from_pydantic(value)
        if isinstance(value, dict):
            return cls.from_json_schema(value)
        if isinstance(value, Path):
            return cls.from_file(value)
        if isinstance(value, str):
            return cls.from_string(value)
        gbnf = getattr(value, "_grammar", None)  # a llama_cpp.LlamaGrammar
        if isinstance(gbnf, str):
            return cls.from_string(gbnf)
        msg = (
            "grammar must be GBNF text, a Grammar, a JSON-schema dict or a pydantic "
            f"model class, got {type(value).__name__}"
        )
        raise TypeError(msg)

    # ---------------------------------------------------------------- views
    @property
    def gbnf(self) -> str:
        """The grammar as GBNF (a schema is converted by llama.cpp's converter)."""
        if self._gbnf is None:
            schema = self.slot[1] if self.slot is not None else self.schema
            assert schema is not None
            mod = require("llama_cpp.llama_grammar", feature="JSON schema to GBNF")
            try:
                rules = mod.json_schema_to_gbnf(json.dumps(schema))
            except Exception as e:
                msg = f"cannot turn this JSON schema into a grammar: {e}"
                raise ValueError(msg) from e
            if self.slot is not None:  # the value's rules in the template's slot
                value = re.sub(r"^root\s*::=", f"{self.slot[0]} ::=", rules, count=1, flags=re.M)
                rules = f"{(self.template or '').rstrip()}\n{value}"
            self._gbnf = rules
        return self._gbnf

    @property
    def identity(self) -> str:
        """A stable text for cache keys."""
        lenient = "lenient:" if self.lenient else ""
        if self.slot is not None:
            schema = json.dumps(self.slot[1], sort_keys=True)
            return f"{lenient}template:{self.template}\n{self.slot[0]}:schema:{schema}"
        if self.schema is not None:
            return f"{lenient}schema:" + json.dumps(self.schema, sort_keys=True)
        return "gbnf:" + (self._gbnf or "")

    def parse(self, text: str) -> Any:
        """Parse constrained output: a pydantic object, JSON, or the text itself.

        JSON of a schema is validated against it (formats checked): an answer that
        breaks its schema raises :class:`SchemaValidationError` with the raw text.
        """
        if self.model is not None:
            return self.model.model_validate_json(text)
        if self.schema is not None:
            return load(text, self.schema)
        if self.name in ("json", "list"):
            return json.loads(text)
        return text

    def __repr__(self) -> str:
        kind = "schema" if self.schema is not None or self.slot is not None else "gbnf"
        return f"Grammar({kind}, name={self.name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Grammar) and other.identity == self.identity

    def __hash__(self) -> int:
        return hash(self.identity)


def _builtin_dir() -> Any:
    return resources.files(__name__)


# ------------------------------------------------------------------ GBNF check
_NAME = re.compile(r"[A-Za-z0-9-]+")


class _Parser:
    """A syntax check of GBNF as llama.cpp's grammar parser reads it."""

    def __init__(self, text: str, source: str | None) -> None:
        self.t = text
        self.i = 0
        self.source = source
        self.defined: set[str] = set()
        self.used: dict[str, int] = {}
        self.empty: list[int] = []  # where an alternative has no element

    def fail(self, what: str, at: int | None = None) -> GrammarSyntaxError:
        pos = self.i if at is None else at
        line = self.t.count("\n", 0, pos) + 1
        col = pos - (self.t.rfind("\n", 0, pos) + 1) + 1
        where = f"{self.source}:" if self.source else "line "
        return GrammarSyntaxError(f"GBNF grammar error at {where}{line}:{col}: {what}")

    def space(self, newlines: bool) -> None:
        t = self.t
        while self.i < len(t):
            c = t[self.i]
            if c in " \t" or (newlines and c in "\r\n"):
                self.i += 1
            elif c == "#":
                while self.i < len(t) and t[self.i] not in "\r\n":
                    self.i += 1
            else:
                break

    def name(self) -> str:
        m = _NAME.match(self.t, self.i)
        if not m:
            raise self.fail("expected a rule name")
        self.i = m.end()
        return m.group()

    def parse(self) -> None:
        self.space(True)
        while self.i < len(self.t):
            start = self.i
            rule = self.name()
            self.space(False)
            if not self.t.startswith("::=", self.i):
                raise self.fail(f"expected '::=' after rule name {rule!r}")
            self.i += 3
            self.space(True)
            self.alternates(nested=False)
            if self.i < len(self.t) and self.t[self.i] not in "\r\n":
                raise self.fail("expected a newline or the end of the grammar")
            if rule in self.defined:
                raise self.fail(f"rule {rule!r} is defined twice", start)
            self.defined.add(rule)
            self.space(True)
        if "root" not in self.defined:
            raise GrammarSyntaxError("GBNF grammar has no 'root' rule")
        for rule, pos in self.used.items():
            if rule not in self.defined:
                raise self.fail(f"undefined rule {rule!r}", pos)

    def alternates(self, nested: bool) -> None:
        while True:
            start = self.i
            if not self.sequence(nested):
                self.empty.append(start)
            if self.i >= len(self.t) or self.t[self.i] != "|":
                return
            self.i += 1
            self.space(True)

    def sequence(self, nested: bool) -> bool:
        """Parse one alternative; return whether it had any element."""
        t = self.t
        last_ok = False  # whether a repetition operator may follow
        start = self.i
        while self.i < len(t):
            c = t[self.i]
            if c == '"':
                self.literal('"')
                last_ok = True
            elif c == "[":
                self.char_class()
                last_ok = True
            elif c == "(":
                self.i += 1
                self.space(True)
                self.alternates(nested=True)
                if self.i >= len(t) or t[self.i] != ")":
                    raise self.fail("expected ')'")
                self.i += 1
                last_ok = True
            elif c == ".":
                self.i += 1
                last_ok = True
            elif c in "*+?":
                if not last_ok:
                    raise self.fail(f"'{c}' with nothing before it to repeat")
                self.i += 1
                last_ok = False
            elif c == "{":
                if not last_ok:
                    raise self.fail("'{' with nothing before it to repeat")
                self.repetition()
                last_ok = False
            elif c == "<" or c == "!":
                end = t.find(">", self.i)
                if end == -1:
                    raise self.fail("unclosed token reference '<'")
                self.i = end + 1
                last_ok = True
            elif _NAME.match(t, self.i):
                pos = self.i
                ref = self.name()
                self.space(nested)
                if t.startswith("::=", self.i):
                    self.i = pos
                    raise self.fail("a new rule starts here: end the previous rule with a newline")
                self.used.setdefault(ref, pos)
                last_ok = True
                continue
            else:
                break
            self.space(nested)
        return self.i > start

    def literal(self, close: str) -> None:
        start = self.i
        self.i += 1
        while self.i < len(self.t) and self.t[self.i] != close:
            if self.t[self.i] in "\r\n":
                raise self.fail("unterminated literal (no closing quote)", start)
            self.char()
        if self.i >= len(self.t):
            raise self.fail("unterminated literal (no closing quote)", start)
        self.i += 1

    def char_class(self) -> None:
        start = self.i
        self.i += 1
        if self.i < len(self.t) and self.t[self.i] == "^":
            self.i += 1
        while self.i < len(self.t) and self.t[self.i] != "]":
            self.char()
            if self.t.startswith("-", self.i) and not self.t.startswith("-]", self.i):
                self.i += 1
                self.char()
        if self.i >= len(self.t):
            raise self.fail("unterminated character class (no ']')", start)
        self.i += 1

    def char(self) -> None:
        t = self.t
        if self.i >= len(t) or t[self.i] in "\r\n":
            raise self.fail("unexpected end of line")
        if t[self.i] != "\\":
            self.i += 1
            return
        self.i += 1
        if self.i >= len(t):
            raise self.fail("unfinished escape")
        e = t[self.i]
        hex_len = {"x": 2, "u": 4, "U": 8}.get(e)
        if hex_len:
            digits = t[self.i + 1 : self.i + 1 + hex_len]
            if len(digits) != hex_len or not all(d in "0123456789abcdefABCDEF" for d in digits):
                raise self.fail(f"\\{e} needs {hex_len} hex digits")
            self.i += 1 + hex_len
        elif e in 'nrt\\"[]-/^':
            self.i += 1
        else:
            raise self.fail(f"unknown escape '\\{e}'")

    def repetition(self) -> None:
        m = re.compile(r"\{\s*(\d+)?\s*(,\s*(\d+)?\s*)?\}").match(self.t, self.i)
        if not m or (m.group(1) is None and m.group(2) is None):
            raise self.fail("malformed repetition, expected {m}, {m,} or {m,n}")
        lo, hi = m.group(1), m.group(3)
        if lo is not None and hi is not None and int(hi) < int(lo):
            raise self.fail(f"repetition {{{lo},{hi}}} has max < min")
        self.i = m.end()


def check_gbnf(text: str, *, source: str | None = None) -> None:
    """Raise :class:`GrammarSyntaxError` (a ``ValueError``) if ``text`` is not GBNF."""
    _parsed(text, source)


def _parsed(text: str, source: str | None = None) -> _Parser:
    if not text.strip():
        msg = "the GBNF grammar is empty"
        raise GrammarSyntaxError(msg)
    parser = _Parser(text, source)
    parser.parse()
    return parser


def _optional_grammar(value: Any) -> Grammar | None:
    return None if value is None else Grammar.coerce(value)


#: The type of a ``grammar`` field: whatever :meth:`Grammar.coerce` takes, validated
#: into a :class:`Grammar` both at construction and per call.
GrammarField = Annotated[Any, pydantic.BeforeValidator(_optional_grammar)]


def json_schema_of(value: Any, *, field: str, gbnf_refused: str) -> dict[str, Any]:
    """A JSON schema from a dict, JSON text, a pydantic model class or a schema Grammar.

    Args:
        value: What the user gave.
        field: The argument's name, for messages.
        gbnf_refused: What to say when ``value`` is a GBNF-only Grammar.
    """
    if isinstance(value, type) and issubclass(value, pydantic.BaseModel):
        return value.model_json_schema()
    if isinstance(value, Grammar):
        if value.schema is None:
            raise ValueError(gbnf_refused)
        return value.schema
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            msg = f"{field} must be a JSON schema, got the string {value[:80]!r}"
            raise ValueError(msg) from None
    if not isinstance(value, dict):
        msg = (
            f"{field} must be a JSON-schema dict, JSON text or a pydantic model class, "
            f"got {type(value).__name__}"
        )
        raise TypeError(msg)
    return value
