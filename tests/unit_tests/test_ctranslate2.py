"""CTranslate2's own logic that needs no model: detokenizing and the conversion cache key."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from langchain_localllms.conversion import conversion_key
from langchain_localllms.conversion import convert_to_ctranslate2 as convert
from langchain_localllms.core.detok import IncrementalDetokenizer
from langchain_localllms.core.events import Row, Tally
from langchain_localllms.llms._assemble import finish_row

# A SentencePiece-like vocabulary: "▁" pieces, UTF-8 byte-fallback tokens, merged
# pieces and special tokens (skipped when decoding).
SPECIAL = {0: "<s>", 1: "</s>"}
PIECES = {2: "▁Hello", 3: "▁world", 4: "!", 5: "é", 6: "▁東京", 7: "lo", 8: "▁"}
BYTES = {10 + i: bytes([b]) for i, b in enumerate("𓀀é€".encode())}  # 4 + 2 + 3 bytes


def decode(ids: list[int], strip_first_space: bool = True) -> str:
    """Like a Llama tokenizer's decode: bytes fused, specials skipped, lead space stripped."""
    out = b""
    for i in ids:
        if i in SPECIAL:
            continue
        if i in BYTES:
            out += BYTES[i]
        else:
            out += PIECES[i].replace("▁", " ").encode()
    text = out.decode("utf-8", errors="replace")
    return text[1:] if strip_first_space and text.startswith(" ") else text


def stream(ids: list[int], context: list[int] = ()) -> list[str]:
    d = IncrementalDetokenizer(decode, context)
    return [d.push(i) for i in ids] + [d.flush()]


def continuation(context: list[int], ids: list[int]) -> str:
    """The text ``ids`` add after ``context``, from one decode of everything."""
    whole, before = decode([*context, *ids]), decode(context)
    assert whole.startswith(before)
    return whole[len(before) :]


def test_bytes_of_one_character_come_out_together():
    hieroglyph = [10, 11, 12, 13]  # the four bytes of "𓀀"
    pieces = stream([2, *hieroglyph, 3])
    assert pieces == ["Hello", "", "", "", "𓀀", " world", ""]


def test_first_piece_keeps_its_leading_space_after_a_prompt():
    # A decode of the answer alone would lose the space before "world".
    assert "".join(stream([3, 4], context=[0, 2])) == " world!"
    assert decode([3, 4]) == "world!"


def test_special_tokens_are_skipped():
    assert "".join(stream([2, 1, 3, 0])) == "Hello world"


def test_incomplete_bytes_at_the_end_are_flushed_like_a_decode():
    pieces = stream([2, 10, 11])  # the answer ends halfway through "𓀀"
    assert pieces[:-1] == ["Hello", "", ""]
    assert "\ufffd" in pieces[-1]
    assert "".join(pieces) == decode([2, 10, 11])


ALL_IDS = sorted([*SPECIAL, *PIECES, *BYTES])
#: Whole characters: pieces, or the byte tokens of one character in order.
CHARACTERS = [[i] for i in PIECES] + [[10, 11, 12, 13], [14, 15], [16, 17, 18]]


@settings(max_examples=300, deadline=None)
@given(
    prompt=st.lists(st.sampled_from([*CHARACTERS, *([i] for i in SPECIAL)]), max_size=6),
    ids=st.lists(st.sampled_from(ALL_IDS), max_size=30),
)
def test_pieces_always_join_to_one_decode(prompt, ids):
    # The prompt is text (whole characters); the answer may be any ids, even bytes
    # that are not valid UTF-8.
    context = [i for c in prompt for i in c]
    pieces = stream(ids, context)
    expected = continuation(context[-5:], ids) if context else decode(ids)
    assert "".join(pieces) == expected
    assert IncrementalDetokenizer(decode, context).text(ids) == expected


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(CHARACTERS), max_size=15))
def test_no_piece_ends_inside_a_character(characters):
    ids = [i for c in characters for i in c]
    pieces = stream(ids)
    assert "".join(pieces) == decode(ids)
    assert not any("\ufffd" in piece for piece in pieces)


def test_batch_rows_stop_and_count_like_streaming():
    ids = [2, 3, 4, 2, 3]  # "Hello world! Hello world"

    def finish(stops):
        pieces = IncrementalDetokenizer(decode).pieces(ids)
        return finish_row(Row(pieces, Tally(prompt_tokens=1, completion_tokens=len(ids))), stops)[0]

    for stops, text, tokens in (
        ([" world"], "Hello", 2),
        (["!"], "Hello world", 3),
        (["nowhere"], "Hello world! Hello world", 5),
    ):
        gen = finish(stops)
        assert gen.text == text
        assert gen.generation_info["completion_tokens"] == tokens
        assert gen.generation_info["stop_sequence"] == (None if stops == ["nowhere"] else stops[0])


# ---------------------------------------------------------------- cache key
@pytest.fixture
def hf_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "model.safetensors").write_bytes(b"weights")
    return d


def test_conversion_key_is_stable_and_follows_what_matters(hf_dir, tmp_path):
    key = conversion_key(hf_dir, "int8", "4.8.5")
    assert key == conversion_key(hf_dir, "int8", "4.8.5")
    assert key != conversion_key(hf_dir, None, "4.8.5")
    assert key != conversion_key(hf_dir, "int8", "4.9.0")
    weights = hf_dir / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert key != conversion_key(hf_dir, "int8", "4.8.5"), "new weights, same key"
    moved = tmp_path / "elsewhere"
    hf_dir.rename(moved)
    assert conversion_key(moved, "int8", "4.8.5") != conversion_key(hf_dir.parent, "int8", "4.8.5")


def test_convert_refuses_bad_inputs_before_loading_anything(hf_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        convert(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="quantization 'int4' is not one of"):
        convert(hf_dir, "int4")
    with pytest.raises(ValueError, match=r"no config\.json"):
        convert(tmp_path)
    ct2 = tmp_path / "ct2"
    ct2.mkdir()
    (ct2 / "model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="already a CTranslate2 model"):
        convert(ct2)
