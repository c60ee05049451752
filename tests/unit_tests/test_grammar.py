import json

import pydantic
import pytest

from langchain_localllms.grammars import Grammar, GrammarSyntaxError, check_gbnf


@pytest.mark.parametrize(
    ("gbnf", "where", "what"),
    [
        ('root ::= "abc', "1:10", "unterminated literal"),
        ("root ::= item\n", "1:10", "undefined rule 'item'"),
        ('root ::= "a"\nroot ::= "b"', "2:1", "defined twice"),
        ("root ::= [a-z", "1:10", "character class"),
        ('root ::= "a"{3,1}', "1:13", "max < min"),
        ('root ::= ("a" | "b"', "1:20", "expected ')'"),
        ('root ::= "\\q"', "1:12", "unknown escape"),
        ('root ::= "a" x ::= "b"', "1:14", "new rule starts here"),
    ],
)
def test_syntax_errors_name_line_and_column(gbnf, where, what):
    with pytest.raises(GrammarSyntaxError, match=where) as e:
        check_gbnf(gbnf)
    assert what in str(e.value)
    assert isinstance(e.value, ValueError)


def test_root_rule_is_required():
    with pytest.raises(ValueError, match="no 'root' rule"):
        Grammar.from_string('start ::= "a"')


def test_builtins_are_valid_and_listed_on_a_typo():
    assert "object" in Grammar.builtin("json").gbnf
    assert "item" in Grammar.builtin("list").gbnf
    with pytest.raises(ValueError, match="json, list"):
        Grammar.builtin("jsn")


def test_from_file(tmp_path):
    f = tmp_path / "g.gbnf"
    f.write_text('root ::= "yes" | "no"\n')
    assert Grammar.from_file(f).gbnf.startswith("root")
    f.write_text('root ::= "yes" |\n  "no" | maybe\n')
    with pytest.raises(GrammarSyntaxError, match=f"{f}:2:"):
        Grammar.from_file(f)
    with pytest.raises(FileNotFoundError):
        Grammar.from_file(tmp_path / "missing.gbnf")


class Person(pydantic.BaseModel):
    name: str
    age: int


def test_coerce_and_identity():
    g1 = Grammar.coerce(Person)
    assert g1.schema["required"] == ["name", "age"]
    assert g1.parse('{"name": "Ada", "age": 36}') == Person(name="Ada", age=36)
    assert Grammar.coerce(Person.model_json_schema()) == g1
    assert Grammar.coerce('root ::= "a"') != Grammar.coerce('root ::= "b"')
    assert Grammar.builtin("list").parse('["a", "b"]') == ["a", "b"]
    with pytest.raises(TypeError, match="grammar must be"):
        Grammar.coerce(42)
    with pytest.raises(ValueError, match="not valid JSON"):
        Grammar.from_json_schema("{nope")
    assert json.loads(g1.identity[len("schema:") :])["title"] == "Person"
