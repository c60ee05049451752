"""HuggingFacePipeline's own logic: options, decoding, grammar dialect, model sources."""

from __future__ import annotations

import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest

from langchain_localllms.core.detok import IncrementalDetokenizer
from langchain_localllms.engines.huggingface import options as hf_options
from langchain_localllms.grammars import Grammar
from langchain_localllms.llms import huggingface_pipeline as hp
from tests.unit_tests.matching import accepts, guide


# ------------------------------------------------------------------ options
def test_module_import_loads_no_runtime():
    code = (
        "import sys; import langchain_localllms.llms.huggingface_pipeline;"
        "heavy = [m for m in ('torch', 'transformers', 'llguidance') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


PIPELINE_DEFAULTS = {"max_new_tokens": 256, "do_sample": True, "temperature": 0.7}


def resolve(*options, model=None, defaults=PIPELINE_DEFAULTS):
    layers = [hf_options.parse_options(o, "pipeline_kwargs") for o in options]
    return hf_options.resolve(layers, model or {}, defaults)


def test_temperature_zero_is_greedy_whatever_the_defaults():
    gen = resolve({"temperature": 0}, model={"top_k": 64}).generate
    assert gen["do_sample"] is False
    assert gen["max_new_tokens"] == 256
    # Sampling parameters are unset, or generate() warns that they are ignored.
    assert gen["temperature"] is None
    assert gen["top_k"] is None


def test_a_positive_temperature_samples_unless_told_otherwise():
    assert resolve({"temperature": 0.3}, defaults={}).generate["do_sample"] is True
    gen = resolve({"temperature": 0.3, "do_sample": False}).generate
    assert gen["do_sample"] is False
    assert gen["temperature"] is None


def test_pipeline_defaults_fill_only_what_nobody_set():
    gen = resolve({"max_new_tokens": 10}).generate
    assert gen == {"max_new_tokens": 10, "do_sample": True, "temperature": 0.7}
    # The model's own generation config counts as set.
    assert "do_sample" not in resolve({}, model={"do_sample": False}).generate
    # max_length (which counts the prompt) keeps the default max_new_tokens out.
    assert "max_new_tokens" not in resolve({"max_length": 64}).generate
    assert "max_new_tokens" not in resolve({}, model={"max_length": 64}).generate


def test_later_layers_win():
    gen = resolve({"max_new_tokens": 10, "top_k": 5}, {"max_new_tokens": 3}).generate
    assert gen["max_new_tokens"] == 3
    assert gen["top_k"] == 5


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"max_new_token": 5}, "max_new_token.*spelling"),
        ({"stop_sequence": "."}, "stop="),
        ({"stop_strings": ["."]}, "stop="),
        ({"num_beams": 3}, "beam search"),
        ({"num_return_sequences": 2}, "one answer per prompt"),
        ({"return_tensors": True}, "returns text"),
        ({"clean_up_tokenization_spaces": True}, "decoded exactly"),
        ({"device": 0}, "from_model_id"),
    ],
)
def test_options_that_cannot_be_honoured_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        hf_options.parse_options(options, "pipeline_kwargs")


def test_pipeline_options_that_are_honoured():
    layer = hf_options.parse_options(
        {"num_beams": 1, "return_full_text": True, "prefix": "Q: ", "add_special_tokens": False},
        "pipeline_kwargs",
    )
    assert layer.echo is True
    assert layer.prefix == "Q: "
    assert layer.add_special_tokens is False
    assert layer.generate == {"num_beams": 1}


def test_a_generation_config_is_read_as_its_parameters():
    from transformers import GenerationConfig

    layer = hf_options.parse_options(
        {"generation_config": GenerationConfig(max_new_tokens=7, top_k=3)}, "pipeline_kwargs"
    )
    assert layer.generate == {"max_new_tokens": 7, "top_k": 3}


def test_what_a_ready_made_pipeline_was_built_with():
    full = SimpleNamespace(name="FULL_TEXT")
    pipe = SimpleNamespace(
        _generate_kwargs={"max_new_tokens": 10},
        _preprocess_params={"prefix": "X", "prefix_length": 1},
        _postprocess_params={"return_type": full},
    )
    layer = hf_options.pipeline_layer(pipe)
    assert layer.generate == {"max_new_tokens": 10}
    assert layer.echo is True
    assert layer.prefix == "X"
    v4 = SimpleNamespace(_forward_params={"max_new_tokens": 5, "prefix_length": 0})
    assert hf_options.pipeline_layer(v4).generate == {"max_new_tokens": 5}
    assert hf_options.pipeline_defaults(SimpleNamespace()) == {"max_new_tokens": 256}
    defaults = hf_options.pipeline_defaults(
        SimpleNamespace(_generation_defaults={"pad_token_id": 0})
    )
    assert "pad_token_id" not in defaults


# ----------------------------------------------------------------- decoding
def byte_decode(ids):
    """A byte-level tokenizer: each id is one byte (like byte-fallback tokens)."""
    return bytes(ids).decode("utf-8", errors="replace")


def test_multibyte_characters_are_never_split():
    text = "café 東京 😀!"
    ids = list(text.encode())
    decoder = IncrementalDetokenizer(byte_decode, [])
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert IncrementalDetokenizer(byte_decode, []).text(ids) == text


def test_an_incomplete_character_at_the_end_is_flushed():
    ids = [*b"ok", 0xE6]
    assert IncrementalDetokenizer(byte_decode, []).text(ids) == "ok\ufffd"


def test_context_keeps_the_first_space_that_a_stripping_decoder_drops():
    vocab = {1: "▁moon", 2: "▁was", 3: "▁a", 4: "▁man"}

    def strip_decode(ids):  # SentencePiece-style: the first space of a text goes
        return "".join(vocab[i] for i in ids).replace("▁", " ").removeprefix(" ")

    assert IncrementalDetokenizer(strip_decode, []).text([3, 4]) == "a man"
    assert IncrementalDetokenizer(strip_decode, [1, 2]).text([3, 4]) == " a man"
    decoder = IncrementalDetokenizer(strip_decode, [1, 2])
    assert [decoder.push(3), decoder.push(4), decoder.flush()] == [" a", " man", ""]


def test_text_that_decodes_differently_later_is_not_emitted_twice():
    # Invalid UTF-8: 0x1D is emitted, then 0x1D 0xBF decodes as two replacement chars.
    ids = [0x61, 0x1D, 0xBF, 0x62]
    decoder = IncrementalDetokenizer(byte_decode, [])
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == IncrementalDetokenizer(byte_decode, []).text(ids)
    assert "".join(pieces).startswith("a\x1d")


# ---------------------------------------------------------- grammar dialect
@pytest.mark.parametrize("name", ["json", "list"])
def test_builtin_grammars_read_in_llguidance(name):
    sample = {"json": '{"a": [1, "b"]}', "list": '["a", "b"]'}[name]
    assert accepts(guide(Grammar.builtin(name)), sample)


# ------------------------------------------------------------ model sources
def test_a_local_directory_loads_offline(tmp_path):
    assert hp.resolve_model_source(str(tmp_path)) == (str(tmp_path.resolve()), True)


def test_a_missing_or_file_path_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        hp.resolve_model_source(str(tmp_path / "nope"))
    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="a file"):
        hp.resolve_model_source(str(f))


def test_an_uncached_hub_id_fails_at_once_when_the_hub_is_unreachable(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(FileNotFoundError, match=r"not reachable.*hf download someone/some-model"):
        hp.resolve_model_source("someone/some-model", cache_dir=str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        hp.resolve_model_source("someone/some-model", cache_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="local_files_only"):
        hp.resolve_model_source(
            "someone/some-model", cache_dir=str(tmp_path), local_files_only=True
        )


def test_a_cached_hub_id_loads_offline(tmp_path):
    snapshot = tmp_path / "models--someone--some-model" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot / "model.safetensors").write_bytes(b"")
    refs = tmp_path / "models--someone--some-model" / "refs"
    refs.mkdir()
    (refs / "main").write_text("abc")
    # The snapshot directory loads (its commit in the path, so in the cache key).
    assert hp.resolve_model_source("someone/some-model", cache_dir=str(tmp_path)) == (
        str(snapshot),
        True,
    )


def test_integers_without_bounds_get_llama_cpps_16_digits():
    # Unbounded, a model can write digits until its token limit; the constraint
    # bounds them as llama.cpp's converter does, and keeps given bounds.
    from langchain_localllms.grammars.guidance import bounded_integers
    from langchain_localllms.grammars.schemas import rewritten

    schema = {
        "type": "object",
        "properties": {
            "days": {"type": "integer"},
            "age": {"type": ["integer", "null"], "minimum": 0},
            "kind": {"const": {"type": "integer"}},  # a value, not a schema
        },
    }
    bounded = rewritten(schema, bounded_integers)
    assert bounded["properties"]["days"]["maximum"] == 10**16 - 1
    assert "maximum" not in schema["properties"]["days"]  # the user's schema is untouched
    assert bounded["properties"]["age"]["minimum"] == 0
    assert bounded["properties"]["kind"] == {"const": {"type": "integer"}}
    days = guide(Grammar.from_json_schema({"type": "integer"}))
    assert accepts(days, "9" * 16)
    assert accepts(days, "-3")
    assert not accepts(days, "9" * 17)
