"""After each step: append sampled tokens, their logprobs and text; decide which sequences stop.

The text of a sequence without stop strings that goes on may be decoded later (`defer_text`): the
engine decodes it during the next step's forward pass (`flush_all_text`), off the critical path,
and before any output of the sequence is made (`flush_text`); the text is the same."""
from __future__ import annotations

from vlmserve.engine.detokenizer import decode_new_text, make_decode
from vlmserve.engine.sequence import Sequence
from vlmserve.outputs import Logprob, PositionLogprobs
from vlmserve.worker.model_runner import SeqStepResult


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: set[int], max_model_len: int):
        self.tokenizer = tokenizer
        self._decode = make_decode(tokenizer)
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self._token_text: dict[int, str] = {}
        self._pending_text: dict[int, tuple[Sequence, list[int]]] = {}  # seq id -> (seq, step ends)

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            self._token_text[token_id] = text
        return text

    def position_logprobs(self, token_id: int, row: tuple) -> PositionLogprobs:
        tok_lp, rank, ids, vals = row
        out = {i: Logprob(v, r + 1, self.token_text(i)) for r, (i, v) in enumerate(zip(ids, vals))}
        if token_id not in out:
            out[token_id] = Logprob(tok_lp, rank, self.token_text(token_id))
        return out

    def stop_ids_for(self, seq: Sequence) -> list[int]:
        """Tokens that would end `seq`; barred by the sampler until min_tokens are out."""
        ids = list(seq.params.stop_token_ids)
        if not seq.params.ignore_eos:
            ids.extend(self.eos_token_ids)
        return ids

    def flush_text(self, seq: Sequence) -> None:
        """Decode the text of the sequence's steps whose text was deferred, step by step."""
        pending = self._pending_text.pop(seq.seq_id, None)
        if pending is not None:
            for end in pending[1]:
                seq.output_text += decode_new_text(self._decode, seq, seq.params.skip_special_tokens, end)

    def flush_all_text(self) -> None:
        for seq, _ in list(self._pending_text.values()):
            self.flush_text(seq)

    def process(self, res: SeqStepResult, defer_text: bool = False) -> None:
        seq = res.seq
        if res.prompt_logprobs:
            for row in res.prompt_logprobs:
                target = seq.token_ids[len(seq.prompt_logprobs)]
                seq.prompt_logprobs.append(self.position_logprobs(target, row))
        if res.token_id is None:
            return
        tok = res.token_id
        seq.token_ids.append(tok)
        if res.logprobs is not None:
            seq.cumulative_logprob += res.logprobs[0]
            seq.logprobs.append(self.position_logprobs(tok, res.logprobs))
        self._check_stop(seq, tok, defer_text)

    def _check_stop(self, seq: Sequence, tok: int, defer_text: bool = False) -> None:
        p = seq.params
        # known tokens: under async scheduling the next step may already be sampling another one
        n_known = len(seq.token_ids)
        n_out = n_known - seq.num_prompt_tokens
        min_ok = n_out >= p.min_tokens
        # A stop token ends the sequence and, as in vLLM, adds no text.
        if min_ok and not p.ignore_eos and tok in self.eos_token_ids:
            seq.finish_reason = "stop"
            return
        if min_ok and tok in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", tok
            return
        if defer_text and not p.stop_strings:  # decoded later, token by token, as here
            self._pending_text.setdefault(seq.seq_id, (seq, []))[1].append(n_known)
        else:
            self.flush_text(seq)
            prev_len = len(seq.output_text)
            seq.output_text += decode_new_text(self._decode, seq, p.skip_special_tokens)
        if p.stop_strings and min_ok:
            for stop in p.stop_strings:
                idx = seq.output_text.find(stop, max(0, prev_len - len(stop) + 1))
                if idx != -1:
                    end = idx + len(stop) if p.include_stop_str_in_output else idx
                    seq.output_text = seq.output_text[:end]
                    seq.finish_reason, seq.stop_reason = "stop", stop
                    return
        max_tokens = p.max_tokens if p.max_tokens is not None else self.max_model_len
        if n_out >= max_tokens or n_known >= self.max_model_len:
            seq.finish_reason = "length"
            self.flush_text(seq)
