"""Text decoded later (the engine decodes a step's text during the next step's forward pass) is
the same as text decoded at each step, whenever the flushes come, and sequences with stop strings
or that finish are decoded at once."""
import random

from transformers import AutoTokenizer

from vlmserve.engine.detokenizer import init_offsets
from vlmserve.engine.output_processor import OutputProcessor
from vlmserve.engine.sequence import Sequence
from vlmserve.sampling_params import SamplingParams
from vlmserve.worker.model_runner import SeqStepResult


def _run(tok, tokens, params, defer, flush_prob, seed):
    rng = random.Random(seed)
    proc = OutputProcessor(tok, {tok.eos_token_id} if tok.eos_token_id is not None else set(), 10_000)
    seq = Sequence(0, "r", 0, [5, 6, 7], params)
    init_offsets(seq)
    for t in tokens:
        if seq.finish_reason is not None:
            break
        if rng.random() < flush_prob:
            proc.flush_all_text()
        proc.process(SeqStepResult(seq, token_id=t), defer_text=defer)
    proc.flush_text(seq)
    return seq.output_text, seq.finish_reason, proc


def test_deferred_text_equals_stepwise(text_model_dir):
    tok = AutoTokenizer.from_pretrained(text_model_dir("llama"))
    vocab = len(tok)
    for trial in range(20):
        rng = random.Random(trial)
        tokens = [rng.randrange(3, vocab) for _ in range(40)]
        params = SamplingParams(max_tokens=rng.choice([10, 40, 100]), ignore_eos=True)
        ref = _run(tok, tokens, params, defer=False, flush_prob=0, seed=trial)[:2]
        for flush_prob in (0.0, 0.5, 1.0):
            got, reason, proc = _run(tok, tokens, params, defer=True, flush_prob=flush_prob, seed=trial)
            assert (got, reason) == ref
            assert not proc._pending_text


def test_finished_and_stop_string_sequences_are_not_deferred(text_model_dir):
    tok = AutoTokenizer.from_pretrained(text_model_dir("llama"))
    proc = OutputProcessor(tok, set(), 10_000)
    seq = Sequence(0, "r", 0, [5, 6, 7], SamplingParams(max_tokens=2, ignore_eos=True))
    init_offsets(seq)
    proc.process(SeqStepResult(seq, token_id=40), defer_text=True)
    assert seq.seq_id in proc._pending_text
    proc.process(SeqStepResult(seq, token_id=41), defer_text=True)  # the last token: finished, flushed
    assert seq.finish_reason == "length" and not proc._pending_text
    stop = Sequence(1, "s", 0, [5], SamplingParams(max_tokens=5, stop=["zzz"], ignore_eos=True))
    init_offsets(stop)
    proc.process(SeqStepResult(stop, token_id=40), defer_text=True)
    assert not proc._pending_text and stop.output_text


def test_backend_decode_equals_hf_decode(text_model_dir):
    """The detokenizer calls a fast tokenizer's Rust decode directly; it gives HF's decode, special
    tokens and multi-byte characters included, and with clean_up_tokenization_spaces HF's own decode
    is kept."""
    from vlmserve.engine.detokenizer import make_decode

    tok = AutoTokenizer.from_pretrained(text_model_dir("llama"))
    assert not tok.clean_up_tokenization_spaces
    decode = make_decode(tok)
    assert decode.__code__ is not make_decode(_WithCleanup(tok)).__code__  # the direct path was taken
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 12))]
        for skip in (False, True):
            assert decode(ids, skip) == tok.decode(ids, skip_special_tokens=skip)
    cleaned = make_decode(_WithCleanup(tok))
    ids = tok("Hello , world ! it 's").input_ids
    assert cleaned(ids, True) == _WithCleanup(tok).decode(ids, skip_special_tokens=True)


class _WithCleanup:
    """A tokenizer that cleans up spaces: make_decode must go through its decode."""

    clean_up_tokenization_spaces = True

    def __init__(self, tok):
        self._tokenizer = tok._tokenizer
        self.tok = tok

    def decode(self, ids, skip_special_tokens=False):
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens).replace(" ,", ",")
