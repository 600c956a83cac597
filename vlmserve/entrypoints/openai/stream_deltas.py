"""What part of a streamed completion a client has not been sent yet. The chat and the completions
streams both send, per choice, the text and tokens that are new since the last chunk, holding back
the tail that could still turn out to be the start of a stop string (stop strings are cut from the
text, so that tail must not reach the client before the engine decides)."""
from __future__ import annotations

from dataclasses import dataclass

from vlmserve.outputs import CompletionOutput


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    first_token: int  # index in the choice's token_ids of token_ids[0] (to slice its logprobs)
    finished: bool


class StreamDeltas:
    def __init__(self, stop_strings: list[str]):
        self.hold = max((len(s) for s in stop_strings), default=1) - 1
        self._sent: dict = {}  # choice key -> (text chars sent, tokens sent, finished)

    def next(self, key, c: CompletionOutput, tokens_matter: bool) -> Delta | None:
        """The unsent part of choice `key` as of output `c`, or None when there is nothing to send
        (new tokens alone count only when `tokens_matter`, i.e. the client asked for logprobs)."""
        text_sent, tokens_sent, finished_before = self._sent.get(key, (0, 0, False))
        if finished_before:
            return None
        finished = c.finish_reason is not None
        end = len(c.text) if finished else max(text_sent, len(c.text) - self.hold)
        delta = Delta(c.text[text_sent:end], c.token_ids[tokens_sent:], tokens_sent, finished)
        if not delta.text and not finished and not (tokens_matter and delta.token_ids):
            return None
        self._sent[key] = (end, len(c.token_ids), finished)
        return delta
