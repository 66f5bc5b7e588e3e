"""Streaming text: never half a character, and stop strings never leak."""

from __future__ import annotations

from pathlib import Path

from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent.engine.model_folder import ModelFolder
from agent.engine.text_stream import IncrementalDecoder, StopFilter
from agent.engine.tokenizer import Tokenizer
from tests.support.models import fixture_path

_TOKENIZER = Tokenizer(ModelFolder(fixture_path("phi3-int4")))
_VOCAB = _TOKENIZER.vocab_size


def _stream(ids: list[int]) -> list[str]:
    decoder = IncrementalDecoder(_TOKENIZER.decode)
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    return [p for p in pieces if p]


@settings(max_examples=400, deadline=None)
@given(st.text(min_size=1, max_size=60))
def test_streamed_text_of_real_text_equals_whole_decode(text: str) -> None:
    ids = _TOKENIZER.encode(text, add_special_tokens=False)
    pieces = _stream(ids)
    assert "".join(pieces) == _TOKENIZER.decode(ids)
    # Valid text in, so no piece may carry a replacement char from a split character.
    if "\ufffd" not in text:
        assert not any("\ufffd" in p for p in pieces)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=_VOCAB - 1), min_size=1, max_size=40))
def test_random_ids_stream_to_the_whole_decode(ids: list[int]) -> None:
    # Random models emit arbitrary byte sequences: the stream must still add up.
    assert "".join(_stream(ids)) == _TOKENIZER.decode(ids)


def test_multibyte_character_split_across_tokens_is_held_back() -> None:
    ids = _TOKENIZER.encode("🎉", add_special_tokens=False)
    # The emoji is 4 bytes; the byte-level tokenizer must split it for this test to mean anything.
    assert len(ids) > 1, "fixture tokenizer should split the emoji into several tokens"
    decoder = IncrementalDecoder(_TOKENIZER.decode)
    pieces = [decoder.push(i) for i in ids]
    assert pieces[:-1] == [""] * (len(ids) - 1)
    assert pieces[-1] == "🎉"


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.text(alphabet="abc xy", min_size=0, max_size=4), min_size=1, max_size=12),
    st.lists(st.text(alphabet="abcxy", min_size=1, max_size=3), min_size=1, max_size=3),
)
# A short stop inside a longer one that began earlier: "by" must wait for the next character.
@example(deltas=["b", "y", "a"], stops=["y", "bya"])
@example(deltas=["b", "y", "x"], stops=["y", "bya"])
@example(deltas=["b", "y"], stops=["y", "bya"])
def test_stop_filter_cuts_at_first_stop_and_never_releases_it(deltas: list[str], stops: list[str]) -> None:
    whole = "".join(deltas)
    firsts = [i for i in (whole.find(s) for s in stops) if i >= 0]
    expected = whole[: min(firsts)] if firsts else whole
    f = StopFilter(stops)
    released = ""
    for d in deltas:
        released += f.push(d)
        # Whatever has been released is final: a prefix of the expected text.
        assert expected.startswith(released)
    released += f.flush()
    assert released == expected
    assert f.stopped == bool(firsts)
    assert f.released_text == expected


def test_stop_filter_holds_back_a_possible_stop_prefix() -> None:
    f = StopFilter(["</end>"])
    assert f.push("hello </e") == "hello "
    assert f.push("nough") == "</enough"
    assert f.push(" x</end> tail") == " x"
    assert f.stopped


def test_fixture_tokenizer_is_real(tmp_path: Path) -> None:
    # Guards the tests above: they are only meaningful with a byte-level tokenizer.
    assert _TOKENIZER.decode(_TOKENIZER.encode("Grüße", add_special_tokens=False)) == "Grüße"
