"""LocalAgreement-2 on hypotheses of a growing turn."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from serve_app.core.stabilizer import Stabilizer


def test_a_word_is_sent_once_two_hypotheses_agree_on_it() -> None:
    s = Stabilizer()
    assert s.update("The whether") == ""  # nothing to agree with yet
    assert s.update("The weather to") == "The"  # "whether" was rewritten: only "The" is stable
    assert s.update("The weather today is") == " weather"  # "to" -> "today": not stable yet
    assert s.update("The weather today is sunny") == " today is"
    assert s.pending() == "sunny"
    assert s.finish("The weather today is sunny.") == " sunny."
    assert s.text == "The weather today is sunny."


def test_case_and_punctuation_do_not_break_agreement() -> None:
    s = Stabilizer()
    s.update("hello, world")
    assert s.update("Hello world and") == "Hello world"


def test_committed_words_are_never_taken_back() -> None:
    s = Stabilizer()
    s.update("please send the")
    assert s.update("please send the report") == "please send the"
    assert s.update("lease sent a report") == ""  # disagrees inside the committed prefix
    assert s.update("please send the report now") == ""  # agrees with the previous only up to nothing new
    assert s.update("please send the report now") == " report now"
    assert s.text == "please send the report now"


def test_finish_appends_only_past_the_committed_words() -> None:
    s = Stabilizer()
    s.update("to the finance")
    s.update("to the finance team")
    assert s.text == "to the finance"
    # The final hypothesis rewrites a committed word: nothing committed is repeated.
    assert s.finish("to a finance team by Friday.") == " team by Friday."
    assert s.text == "to the finance team by Friday."


def test_a_turn_with_no_partials_sends_everything_at_finish() -> None:
    s = Stabilizer()
    assert s.finish("Please send it.") == "Please send it."
    assert s.finish("") == ""


@given(st.lists(st.lists(st.sampled_from(["a", "b", "c", "d."]), max_size=8), max_size=6),
       st.lists(st.sampled_from(["a", "b", "c"]), max_size=8))
def test_deltas_concatenated_equal_the_transcript(hypotheses: list[list[str]], final: list[str]) -> None:
    s = Stabilizer()
    sent = "".join(s.update(" ".join(h)) for h in hypotheses) + s.finish(" ".join(final))
    assert sent == s.text


def test_a_final_that_rewrites_a_wrong_committed_word_keeps_what_follows() -> None:
    # Seen under CI load: two partials agreed on "Please end the", the final heard the rest.
    s = Stabilizer()
    s.update("Please end the")
    s.update("Please end the")
    assert s.text == "Please end the"
    s.finish("Please send the quarterly report to the finance team by Friday.")
    assert s.text == "Please end the quarterly report to the finance team by Friday."


def test_a_final_is_not_repeated_after_a_committed_common_word() -> None:
    # Seen under CI load: the committed words ended in "the", which the final starts with.
    s = Stabilizer()
    s.update("The weather today is sunny with light breeze from the")
    s.update("The weather today is sunny with light breeze from the")
    s.finish("The weather today is sunny with a light breeze from the west.")
    assert s.text == "The weather today is sunny with light breeze from the west."
