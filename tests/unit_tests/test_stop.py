import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from langchain_localllms.core.stops import StopStream, check_stops, truncate


def run(pieces, stops):
    s = StopStream(stops)
    out = [s.push(p) for p in pieces]
    if not s.stopped:
        out.append(s.flush())
    return "".join(out), s.matched, out


def test_stop_split_across_pieces_is_found_and_not_emitted():
    text, matched, _ = run(["Hello Wo", "rld. Next", " line"], ["World."])
    assert text == "Hello "
    assert matched == "World."


def test_multi_token_stop_held_back_only_while_it_could_match():
    _, _, out = run(["a", "b", "X", "Y", "c"], ["XYZ"])
    # "X" and "XY" may still become "XYZ": held; "c" decides it is not
    assert out == ["a", "b", "", "", "XYc", ""]


def test_regex_metacharacters_are_plain_text():
    assert truncate("What? Yes. [INST] no", ["[INST]"]) == ("What? Yes. ", "[INST]")
    assert truncate("a.b.c", [".*"]) == ("a.b.c", None)
    assert run(["1+1", "=2?"], ["?"])[0] == "1+1=2"


def test_earliest_of_several_stops_wins():
    assert truncate("one two three", ["three", "two"]) == ("one ", "two")


def test_no_stops_releases_everything_at_once():
    _, _, out = run(["ab", "cd"], [])
    assert out == ["ab", "cd", ""]


def test_bad_stops_are_refused():
    with pytest.raises(TypeError, match="list of strings"):
        check_stops("\n")
    with pytest.raises(ValueError, match="empty stop"):
        check_stops([""])
    with pytest.raises(TypeError):
        check_stops([3])


@given(
    text=st.text(alphabet="abXY. ", max_size=40),
    stops=st.lists(st.text(alphabet="abXY. ", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 40), max_size=8),
)
def test_streaming_equals_whole_text_truncation(text, stops, cuts):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    streamed, matched, _ = run(pieces, stops)
    whole, whole_matched = truncate(text, stops)
    assert streamed == whole
    assert (matched is None) == (whole_matched is None)
