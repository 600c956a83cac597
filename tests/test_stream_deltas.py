"""StreamDeltas: what a stream sends of a growing completion, with stop-string hold-back."""
from vlmserve.entrypoints.openai.stream_deltas import StreamDeltas
from vlmserve.outputs import CompletionOutput


def out(text, ids, finish=None):
    return CompletionOutput(0, text, ids, None, None, finish)


def test_the_possible_start_of_a_stop_string_waits_for_the_next_output():
    d = StreamDeltas(["STOP", "x"])  # longest stop string 4: hold 3 characters
    first = d.next(0, out("hello wo", [1, 2]), tokens_matter=False)
    assert (first.text, first.token_ids, first.first_token, first.finished) == ("hello", [1, 2], 0, False)
    assert d.next(0, out("hello wor", [1, 2, 3]), tokens_matter=False).text == " "
    assert d.next(0, out("hello wor", [1, 2, 3]), tokens_matter=False) is None  # nothing new
    last = d.next(0, out("hello world", [1, 2, 3, 4], "stop"), tokens_matter=False)
    assert (last.text, last.token_ids, last.first_token, last.finished) == ("world", [4], 3, True)
    assert d.next(0, out("hello world", [1, 2, 3, 4], "stop"), tokens_matter=False) is None  # finished


def test_new_tokens_alone_count_when_logprobs_are_wanted():
    d = StreamDeltas([])
    assert d.next("a", out("", [7]), tokens_matter=False) is None
    got = d.next("b", out("", [7]), tokens_matter=True)
    assert got.text == "" and got.token_ids == [7]
    assert d.next("b", out("hi", [7, 8]), tokens_matter=True).token_ids == [8]  # keys are separate choices
