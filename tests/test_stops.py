"""Stop strings over streamed pieces: the emitted text equals a search over the whole text, however it is split."""

from hypothesis import given, strategies as st

from flexio.stops import StopBuffer


def run(pieces, stops) -> tuple[list[str], bool]:
    buf = StopBuffer(stops)
    out = [buf.push(p) for p in pieces]
    if not buf.stopped:
        out.append(buf.flush())
    return out, buf.stopped


def reference(text: str, stops) -> tuple[str, bool]:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


def test_a_stop_string_split_over_two_pieces_is_not_emitted():
    out, stopped = run([" Paris", ".", "\n", "\n", "The"], ["\n\n"])
    assert stopped and "".join(out) == " Paris."
    assert out[2] == ""  # the first "\n" is held back until the next piece shows it starts the stop string


def test_a_partial_match_that_is_not_a_stop_is_emitted_late_but_whole():
    out, stopped = run(["a EN", "X", " here"], ["END"])
    assert not stopped and out == ["a ", "ENX", " here", ""]
    out, stopped = run(["a EN"], ["END"])  # the text ends inside a possible stop string: it was text
    assert not stopped and out == ["a ", "EN"]


def test_the_earliest_of_several_stops_wins_and_nothing_follows():
    buf = StopBuffer(["world", "lo w"])
    assert buf.push("hello world") == "hel"
    assert buf.stopped and buf.push("more") == "" and buf.flush() == ""


def test_a_longer_stop_that_starts_earlier_is_waited_for():
    """Stops "b" and "aba": after "ab" the stop "b" is whole, but "aba" may still start at 0."""
    assert run(["ab", "a"], ["b", "aba"]) == (["", ""], True)  # it did: nothing before it
    assert run(["ab", "c"], ["b", "aba"]) == (["", "a"], True)  # it did not: "b" at 1 stands
    assert run(["ab"], ["b", "aba"]) == (["", "a"], True)  # the text ended there: "b" stands, flush says so


def test_no_stops_and_empty_stops_pass_text_through():
    assert run(["a", "b"], [])[0] == ["a", "b", ""]
    assert run(["a", "b"], [""])[0] == ["a", "b", ""]


@given(text=st.text(alphabet="ab\nc", max_size=40), cuts=st.lists(st.integers(0, 40), max_size=8),
       stops=st.lists(st.text(alphabet="ab\nc", min_size=1, max_size=4), max_size=4))
def test_any_split_gives_the_text_before_the_earliest_stop(text, cuts, stops):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    out, stopped = run(pieces, stops)
    assert ("".join(out), stopped) == reference(text, stops)
