"""The sampler does what its parameters say, with vLLM's / HF's definitions.

Unit level, on `Sampler`, `restrict_support` and `apply_penalties` with hand-made sequences and
logits: top-k / top-p / min-p supports against HF's logits warpers, sampled frequencies against the
renormalized distribution (chi-square), penalties against HF and the OpenAI definition, min_tokens,
per-request seeds, raw logprobs and ranks.

End to end through `vlmserve.LLM` on a tiny random-weight Llama: seeded runs repeat across calls and
batch changes, n > 1 with a seed, and stop / stop_token_ids / min_tokens / max_tokens / ignore_eos
finish as vLLM's do."""
from __future__ import annotations

import itertools
import re
from collections import Counter

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from vlmserve import LLM, SamplingParams
from vlmserve.engine.sequence import Sequence
from vlmserve.testing.checkpoints import make_text_checkpoint
from vlmserve.worker.sampler import Sampler, apply_penalties, restrict_support

CPU = torch.device("cpu")
_seq_ids = itertools.count()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Two shared cores: keep this module to one intra-op thread, and give the setting back."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def make_seq(prompt=(1, 2, 3), output=(), **params) -> Sequence:
    seq = Sequence(next(_seq_ids), "req", 0, list(prompt), SamplingParams(**params))
    seq.token_ids.extend(output)
    return seq


# ---- references ----------------------------------------------------------------------------------
def hf_warped(row: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """HF's warpers, in HF's order (temperature, top-k, top-p, min-p), on one row of logits."""
    ids = torch.zeros((1, 1), dtype=torch.long)
    s = row[None].float().clone()
    s = TemperatureLogitsWarper(temperature)(ids, s)
    if top_k > 0:
        s = TopKLogitsWarper(top_k)(ids, s)
    if top_p < 1:
        s = TopPLogitsWarper(top_p)(ids, s)
    if min_p > 0:
        s = MinPLogitsWarper(min_p)(ids, s)
    return s[0]


def hf_probs(row, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    return torch.softmax(hf_warped(row, temperature, top_k, top_p, min_p).double(), dim=-1)


def clear_cut(row: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float,
              eps: float = 1e-4) -> bool:
    """False when a token sits within `eps` of a top-p or min-p threshold (computed in float64):
    there float32 rounding, not the definition, decides, in HF as here (a cumsum of 300 float32
    terms is off by ~2e-5 at most). Random logits have no ties, so top-k is always clear."""
    p = torch.softmax(row.double() / temperature, dim=-1)
    sp = p.sort(descending=True).values
    if top_k > 0:
        sp[top_k:] = 0
    sp = sp / sp.sum()
    if top_p < 1:
        above = sp.cumsum(0) - sp
        live = sp > 0
        if ((above[live] - top_p).abs() < eps).any():
            return False
        sp = torch.where(above >= top_p, 0.0, sp)
        sp = sp / sp.sum()
    if min_p > 0:
        rest = sp[1:][sp[1:] > 0]  # sp[0] is the max: always kept
        if ((rest - min_p * sp[0]).abs() < eps * sp[0]).any():
            return False
    return True


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of observed counts against probabilities (over the support), bins with an
    expected count under 5 merged into one, as the chi-square approximation needs."""
    n = counts.sum().double()
    expected = probs.double() * n
    big = expected >= 5
    obs = [counts[big].double()]
    exp = [expected[big]]
    if (~big).any() and expected[~big].sum() > 0:
        obs.append(counts[~big].double().sum()[None])
        exp.append(expected[~big].sum()[None])
    obs, exp = torch.cat(obs), torch.cat(exp)
    stat = ((obs - exp) ** 2 / exp).sum()
    df = len(obs) - 1
    if df == 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


# ---- 1. support: restrict_support against HF's warpers -----------------------------------------------
@pytest.mark.parametrize("vocab", [5, 64, 300])
def test_restrict_support_matches_hf_warpers(vocab):
    """Many random rows with random per-row temperature / top-k / top-p / min-p, all in one batch
    (so each row must get its own parameters): the non-zero set of restrict_support equals the
    finite set of HF's warped logits, and the probabilities are HF's renormalized ones."""
    g = torch.Generator().manual_seed(vocab)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    def unif(lo, hi):
        return lo + (hi - lo) * float(torch.rand((), generator=g))

    rows, params, rejected = [], [], 0
    while len(rows) < 150:
        row = torch.randn(vocab, generator=g) * pick([0.3, 1.0, 2.5, 4.0])
        t = pick([0.25, 0.6, 1.0, 1.7])
        k = pick([0, 0, 1, 2, int(torch.randint(1, vocab + 1, (1,), generator=g)), vocab + 3])
        p = pick([1.0, 1.0, unif(0.05, 0.5), unif(0.5, 0.99)])
        m = pick([0.0, 0.0, unif(0.01, 0.2), unif(0.2, 0.9), 1.0])
        if not clear_cut(row, t, k, p, m):
            rejected += 1
            continue
        rows.append(row)
        params.append((t, k, p, m))
    assert rejected < 30, "too many near-threshold draws: the test would check too little"

    logits = torch.stack(rows)
    temp = torch.tensor([q[0] for q in params])
    probs = restrict_support(torch.softmax(logits / temp[:, None], dim=-1),
                             torch.tensor([q[1] for q in params]),
                             torch.tensor([q[2] for q in params]),
                             torch.tensor([q[3] for q in params]))
    sizes = set()
    for i, (t, k, p, m) in enumerate(params):
        ref = hf_warped(logits[i], t, k, p, m)
        ours = probs[i] > 0
        assert torch.equal(ours, torch.isfinite(ref)), (
            f"row {i} (T={t}, top_k={k}, top_p={p:.4f}, min_p={m:.4f}): support "
            f"{ours.nonzero().flatten().tolist()} != HF {torch.isfinite(ref).nonzero().flatten().tolist()}")
        torch.testing.assert_close(probs[i].double(), torch.softmax(ref.double(), -1), atol=1e-6, rtol=1e-4)
        sizes.add(int(ours.sum()))
    assert len(sizes) > min(vocab, 5) - 1, "the draws should give supports of many sizes"


def test_restrict_support_hand_examples():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]] * 6)
    top_k = torch.tensor([2, 0, 0, 2, 0, 3])
    top_p = torch.tensor([1.0, 0.65, 0.75, 0.5, 1.0, 0.95])
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.6, 0.3])
    out = restrict_support(probs, top_k, top_p, min_p)
    expected = torch.tensor([
        [4 / 7, 3 / 7, 0, 0],  # top-k 2
        [4 / 7, 3 / 7, 0, 0],  # top-p .65: 0.4 < .65 so the second stays, 0.7 >= .65 drops the third
        [4 / 9, 3 / 9, 2 / 9, 0],  # top-p .75
        [1, 0, 0, 0],  # top-k 2 then top-p .5 of the RENORMALIZED pair (4/7 >= .5): one token
        [4 / 7, 3 / 7, 0, 0],  # min-p .6: threshold .24
        [4 / 9, 3 / 9, 2 / 9, 0],  # top-k 3, top-p .95 keeps all three, min-p .3 of 4/9 keeps 2/9
    ])
    torch.testing.assert_close(out, expected)

    # exactly representable masses: top-p keeps the smallest prefix whose mass REACHES top_p
    exact = torch.tensor([[0.5, 0.25, 0.125, 0.125]] * 3)
    out = restrict_support(exact, torch.tensor([0, 0, 0]), torch.tensor([0.75, 0.5, 0.875]),
                           torch.tensor([0.0, 0.0, 0.0]))
    torch.testing.assert_close(out, torch.tensor([[2 / 3, 1 / 3, 0, 0], [1, 0, 0, 0], [4 / 7, 2 / 7, 1 / 7, 0]]))
    # min-p keeps a token exactly at the threshold (HF: removed only when p < min_p * p_max)
    out = restrict_support(exact[:1], torch.tensor([0]), torch.tensor([1.0]), torch.tensor([0.25]))
    torch.testing.assert_close(out, exact[:1])


# ---- 1. sampled frequencies ---------------------------------------------------------------------
N_SAMPLES = 20_000
STAT_CONFIGS = {
    "temperature=1": dict(temperature=1.0),
    "temperature=0.5": dict(temperature=0.5),
    "temperature=2": dict(temperature=2.0),
    "top_k=6": dict(top_k=6),
    "top_p=0.6": dict(top_p=0.6),
    "min_p=0.15": dict(min_p=0.15),
    "all": dict(temperature=0.8, top_k=12, top_p=0.85, min_p=0.05),
    "greedy": dict(temperature=0.0, top_k=3),
}


def test_sampled_frequencies_follow_the_restricted_distribution():
    """20k draws per configuration, all configurations interleaved row by row in one batch (each
    row its own parameters). No token outside the support ever appears; each configuration's counts
    pass a chi-square test against HF's renormalized probabilities at p > 1e-4 and every token's
    frequency is within 5 standard errors of its probability (sqrt(p(1-p)/N) <= 0.0036); a wrong
    temperature is rejected by the same test. The sampler's seed is fixed, so this is deterministic."""
    vocab = 24
    g = torch.Generator().manual_seed(7)
    names = list(STAT_CONFIGS)
    base = {name: torch.randn(vocab, generator=g) * 1.5 for name in names}
    seqs_of = {name: make_seq(**STAT_CONFIGS[name]) for name in names}
    order = names * N_SAMPLES
    logits = torch.stack([base[name] for name in order])
    seqs = [seqs_of[name] for name in order]
    tokens, lp = Sampler(CPU, seed=1234)(logits, seqs, [[] for _ in seqs])
    assert lp is None
    for j, name in enumerate(names):
        toks = tokens[j::len(names)]
        cfg = STAT_CONFIGS[name]
        counts = torch.bincount(toks, minlength=vocab)
        if cfg.get("temperature", 1.0) == 0:
            assert torch.all(toks == base[name].argmax()), name
            continue
        probs = hf_probs(base[name], cfg.get("temperature", 1.0), cfg.get("top_k", 0),
                         cfg.get("top_p", 1.0), cfg.get("min_p", 0.0))
        support = probs > 0
        assert counts[~support].sum() == 0, f"{name}: sampled outside the support: {counts[~support]}"
        if {"top_k", "top_p", "min_p"} & set(cfg):  # the configuration really cuts the support
            assert support.sum() < vocab, name
        pval = chi_square_pvalue(counts[support], probs[support])
        assert pval > 1e-4, f"{name}: chi-square p={pval:.2e}"
        freq = counts.double() / N_SAMPLES
        se = (probs * (1 - probs) / N_SAMPLES).sqrt()
        assert torch.all((freq - probs).abs() <= 5 * se + 1e-12), f"{name}: {freq} vs {probs}"
        if "temperature" in name and cfg["temperature"] != 1.0:  # the test has the power to see T
            wrong = torch.softmax(base[name].double(), -1)
            assert chi_square_pvalue(counts, wrong) < 1e-6, name


def test_seeded_draws_follow_the_distribution():
    """Seeded rows draw from their own generators: over 250 seeds x 16 steps each the tokens still
    follow softmax(logits / T) (a generator re-seeded each step, or shared, would repeat draws)."""
    vocab, steps = 16, 16
    row = torch.randn(vocab, generator=torch.Generator().manual_seed(8))
    seqs = [make_seq(seed=1000 + i, temperature=0.7) for i in range(250)]
    sampler = Sampler(CPU, seed=0)
    counts = torch.zeros(vocab, dtype=torch.long)
    for _ in range(steps):
        tokens, _ = sampler(row.repeat(len(seqs), 1), seqs, [[] for _ in seqs])
        counts += torch.bincount(tokens, minlength=vocab)
    probs = hf_probs(row, 0.7)
    assert chi_square_pvalue(counts, probs) > 1e-4
    se = (probs * (1 - probs) / counts.sum()).sqrt()
    assert torch.all((counts / counts.sum() - probs).abs() <= 5 * se)


# ---- 1. penalties ---------------------------------------------------------------------------------
def _random_history(g, vocab, n_prompt, n_out):
    # draw from a narrow range so that tokens repeat
    prompt = torch.randint(0, vocab // 2, (n_prompt,), generator=g).tolist()
    out = torch.randint(vocab // 4, vocab * 3 // 4, (n_out,), generator=g).tolist()
    return prompt, out


def test_repetition_penalty_matches_hf():
    vocab = 50
    g = torch.Generator().manual_seed(11)
    seqs = []
    for penalty in [0.5, 0.9, 1.0, 1.2, 2.0, 3.7]:
        for n_out in [0, 1, 6, 15]:
            prompt, out = _random_history(g, vocab, int(torch.randint(1, 20, (1,), generator=g)), n_out)
            seqs.append(make_seq(prompt, out, repetition_penalty=penalty))
    logits = torch.randn(len(seqs), vocab, generator=g) * 3
    logits[:, ::7] = 0.0  # exact zeros: neither multiplied nor divided into something else
    ours = logits.clone()
    apply_penalties(ours, seqs)
    for i, seq in enumerate(seqs):
        hf = RepetitionPenaltyLogitsProcessor(seq.params.repetition_penalty)(
            torch.tensor([seq.token_ids]), logits[i:i + 1].clone())[0]
        torch.testing.assert_close(ours[i], hf, rtol=1e-6, atol=1e-6)
        if seq.params.repetition_penalty != 1.0:
            changed = (ours[i] != logits[i]).nonzero().flatten().tolist()
            assert set(changed) <= set(seq.token_ids)  # prompt and output tokens, nothing else
            assert set(changed) >= {t for t in seq.token_ids if logits[i, t] != 0}


def _openai(row: torch.Tensor, output: list[int], presence: float, frequency: float) -> torch.Tensor:
    row = row.clone()
    for tok, count in Counter(output).items():
        row[tok] -= frequency * count + presence * (count > 0)
    return row


def test_presence_and_frequency_penalties_follow_openai():
    vocab = 40
    g = torch.Generator().manual_seed(12)
    cases = []
    for presence, frequency in [(0.5, 0.0), (0.0, 0.7), (0.25, 0.5), (-1.0, 0.3), (2.0, -2.0), (1.0, 1.0)]:
        for n_out in [0, 1, 4, 12]:
            prompt, out = _random_history(g, vocab, 10, n_out)
            cases.append((prompt, out, presence, frequency))
    seqs = [make_seq(p, o, presence_penalty=pr, frequency_penalty=fr) for p, o, pr, fr in cases]
    seqs.append(make_seq([1, 2], [3], temperature=0.7))  # no penalties: untouched
    logits = torch.randn(len(seqs), vocab, generator=g) * 2
    ours = logits.clone()
    apply_penalties(ours, seqs)
    for i, (prompt, out, pr, fr) in enumerate(cases):
        torch.testing.assert_close(ours[i], _openai(logits[i], out, pr, fr))
        prompt_only = set(prompt) - set(out)
        for t in prompt_only:  # prompt tokens do not count for presence / frequency
            assert ours[i, t] == logits[i, t]
    assert torch.equal(ours[-1], logits[-1])

    # a hand computation: prompt [1, 2, 3, 3], output [3, 5, 5, 5, 7]
    row = torch.zeros(1, 10)
    apply_penalties(row, [make_seq([1, 2, 3, 3], [3, 5, 5, 5, 7], presence_penalty=0.25, frequency_penalty=0.5)])
    expected = torch.zeros(10)
    expected[3] = -(0.5 * 1 + 0.25)
    expected[5] = -(0.5 * 3 + 0.25)
    expected[7] = -(0.5 * 1 + 0.25)
    torch.testing.assert_close(row[0], expected)


def test_all_penalties_together():
    """repetition penalty (HF, prompt + output) first, then presence / frequency (OpenAI, output)."""
    vocab = 30
    g = torch.Generator().manual_seed(13)
    prompt, out = _random_history(g, vocab, 12, 9)
    seq = make_seq(prompt, out, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.6)
    logits = torch.randn(1, vocab, generator=g) * 3
    ours = logits.clone()
    apply_penalties(ours, [seq])
    hf = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([seq.token_ids]), logits.clone())[0]
    torch.testing.assert_close(ours[0], _openai(hf, out, 0.4, 0.6))


def test_sampler_applies_penalties_before_choosing():
    """Greedy and sampled rows pick from the penalized logits; logprobs stay those of the raw ones."""
    row = torch.full((1, 8), -5.0)
    row[0, 4], row[0, 6] = 3.0, 2.5
    seqs = [make_seq([1], [4, 4], temperature=0.0, frequency_penalty=0.5, logprobs=2),  # 3 - 1 < 2.5
            make_seq([4], [], temperature=0.0, repetition_penalty=1.5, logprobs=2),  # 3 / 1.5 < 2.5
            make_seq([1], [4, 4], temperature=1.0, top_k=1, frequency_penalty=0.5, logprobs=2),
            make_seq([1], [4, 4], temperature=0.0, logprobs=2)]  # control: no penalty
    tokens, lp = Sampler(CPU)(row.repeat(len(seqs), 1), seqs, [[] for _ in seqs])
    assert tokens.tolist() == [6, 6, 6, 4]
    assert lp.token_ranks.tolist() == [2, 2, 2, 1]
    raw = torch.log_softmax(row[0], -1)
    torch.testing.assert_close(lp.token_logprobs, raw[tokens])


# ---- 1. min_tokens ----------------------------------------------------------------------------------
def test_min_tokens_bars_stop_tokens():
    """Stop tokens given much the highest logits are never sampled while num_output_tokens <
    min_tokens, by greedy, random and top-k rows alike, and are sampled again from then on; rows
    with no stop ids, or no min_tokens, are unaffected."""
    vocab, stop = 20, [3, 11]
    g = torch.Generator().manual_seed(21)
    base = torch.randn(vocab, generator=g)
    base[stop] = 15.0
    seqs, stop_ids = [], []
    for n_out in range(5):
        for kw in [dict(temperature=1.0), dict(temperature=0.0), dict(temperature=0.7, top_k=3)]:
            for _ in range(100):
                seqs.append(make_seq([1, 2], [0] * n_out, min_tokens=3, **kw))
                stop_ids.append(stop)
    seqs.append(make_seq([1, 2], [], min_tokens=3))  # no stop ids given: nothing barred
    stop_ids.append([])
    seqs.append(make_seq([1, 2], [], temperature=0.0))  # no min_tokens
    stop_ids.append(stop)
    logits = base.repeat(len(seqs), 1)
    for sampler_call in ["mixed", "greedy_only"]:
        if sampler_call == "mixed":
            tokens, _ = Sampler(CPU, seed=3)(logits, seqs, stop_ids)
            rows = range(len(seqs))
        else:  # the all-greedy path
            rows = [i for i, s in enumerate(seqs) if s.params.greedy]
            tokens_g, _ = Sampler(CPU)(logits[rows], [seqs[i] for i in rows], [stop_ids[i] for i in rows])
            tokens = torch.full((len(seqs),), -1)
            tokens[rows] = tokens_g
        for i in rows:
            seq, tok = seqs[i], int(tokens[i])
            if stop_ids[i] and seq.num_output_tokens < seq.params.min_tokens:
                assert tok not in stop, (i, seq.num_output_tokens, tok)
            else:  # exp(15) dominates: a stop token nearly surely (greedy: surely)
                assert tok in stop or not seq.params.greedy, (i, tok)
        late = [int(tokens[i]) in stop for i in rows if seqs[i].num_output_tokens >= 3]
        assert sum(late) >= 0.99 * len(late)
    assert torch.equal(logits, base.repeat(len(seqs), 1)), "the caller's logits must not change"


# ---- 1. seeds -------------------------------------------------------------------------------------
VOCAB_SEED = 64


def _step_logits(n_steps=12):
    g = torch.Generator().manual_seed(99)
    return [torch.randn(VOCAB_SEED, generator=g) for _ in range(n_steps)]


def _run_seeded(seed, batch_size=1, position=0, sampler_seed=0, others_seed=0, **extra):
    """Sample a seeded sequence for several steps in a batch of random neighbours; its tokens."""
    seq = make_seq([5, 6, 7], seed=seed, temperature=1.0, **extra)
    g = torch.Generator().manual_seed(others_seed)
    kinds = [dict(), dict(seed=77), dict(temperature=0.0), dict(top_k=5, temperature=0.6), dict(top_p=0.5),
             dict(seed=(seed or 0) + 1, min_p=0.1), dict(repetition_penalty=1.2, logprobs=3)]
    others = [make_seq([5, 6, 7], **kinds[i % len(kinds)]) for i in range(batch_size - 1)]
    sampler = Sampler(CPU, seed=sampler_seed)
    out = []
    for step in _step_logits():
        batch = torch.randn(batch_size, VOCAB_SEED, generator=g) * 2
        batch[position] = step
        seqs = others[:position] + [seq] + others[position:]
        tokens, _ = sampler(batch, seqs, [[] for _ in seqs])
        for s, t in zip(seqs, tokens.tolist()):
            s.token_ids.append(t)
        out.append(int(tokens[position]))
    return out


@pytest.mark.parametrize("extra", [dict(), dict(top_k=20, top_p=0.9)])
def test_seeded_sampling_is_independent_of_the_batch(extra):
    alone = _run_seeded(42, **extra)
    assert _run_seeded(42, **extra) == alone  # repeats exactly
    assert _run_seeded(42, batch_size=7, position=4, sampler_seed=5, others_seed=1, **extra) == alone
    assert _run_seeded(42, batch_size=3, position=0, sampler_seed=9, others_seed=2, **extra) == alone
    assert _run_seeded(42, batch_size=9, position=8, sampler_seed=0, others_seed=3, **extra) == alone
    assert _run_seeded(43, **extra) != alone
    assert _run_seeded(41, batch_size=4, position=2, **extra) != alone
    assert len(set(alone)) > 3  # a real random walk, not a constant


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_seeded_sampling_on_cuda():
    """Sequence makes CPU generators; rows on the GPU must still sample (and be batch-independent)."""
    dev = torch.device("cuda")
    steps = [s.to(dev) for s in _step_logits()]

    def run(batch_size, position):
        seq = make_seq([5, 6, 7], seed=42)
        others = [make_seq(seed=None if i % 2 else 7 + i) for i in range(batch_size - 1)]
        sampler, out = Sampler(dev, seed=batch_size), []
        for step in steps:
            batch = torch.randn(batch_size, VOCAB_SEED, device=dev)
            batch[position] = step
            seqs = others[:position] + [seq] + others[position:]
            out.append(int(sampler(batch, seqs, [[] for _ in seqs])[0][position]))
            seq.token_ids.append(out[-1])
        return out

    alone = run(1, 0)
    assert run(5, 3) == alone and run(2, 0) == alone and len(set(alone)) > 3


def test_unseeded_rows_follow_the_sampler_seed():
    a = _run_seeded(None, batch_size=2, position=1, sampler_seed=0)
    assert _run_seeded(None, batch_size=2, position=1, sampler_seed=0) == a
    assert _run_seeded(None, batch_size=2, position=1, sampler_seed=1) != a


# ---- 1. logprobs ----------------------------------------------------------------------------------
def test_logprobs_are_raw_with_ranks():
    vocab = 40
    g = torch.Generator().manual_seed(31)
    seqs = [make_seq([1, 2], [3, 3], logprobs=None, temperature=0.5),
            make_seq([1, 2], [3, 3], logprobs=0, temperature=1.5, repetition_penalty=2.0),
            make_seq([1, 2], [3, 3], logprobs=1, temperature=0.0, presence_penalty=1.5),
            make_seq([1, 2], [3, 3], logprobs=5, temperature=1.0, frequency_penalty=2.0, top_k=10),
            make_seq([1, 2], [], logprobs=3, temperature=0.8, min_tokens=2, top_p=0.7),
            make_seq([1, 2], [3, 3], logprobs=2, temperature=3.0, min_p=0.01)] * 30
    stop_ids = [[7, 8, 9] for _ in seqs]
    logits = torch.randn(len(seqs), vocab, generator=g) * 2
    logits[4::6, 7] = 20.0  # the min_tokens rows' best token is barred
    before = logits.clone()
    tokens, lp = Sampler(CPU, seed=4)(logits, seqs, stop_ids)
    assert torch.equal(logits, before)
    ref = torch.log_softmax(logits.double(), -1)
    assert lp.topk_ids.shape == (len(seqs), 5) and lp.topk_logprobs.shape == (len(seqs), 5)
    ranks_seen = set()
    for i, tok in enumerate(tokens.tolist()):
        order = ref[i].argsort(descending=True).tolist()
        assert abs(float(lp.token_logprobs[i]) - float(ref[i, tok])) < 1e-5
        assert int(lp.token_ranks[i]) == order.index(tok) + 1
        assert lp.topk_ids[i].tolist() == order[:5]
        torch.testing.assert_close(lp.topk_logprobs[i].double(), ref[i, order[:5]], atol=1e-5, rtol=0)
        ranks_seen.add(int(lp.token_ranks[i]))
        if i % 6 == 4:
            assert tok not in (7, 8, 9) and int(lp.token_ranks[i]) > 1
    assert len(ranks_seen) > 3


def test_no_logprobs_requested():
    seqs = [make_seq(temperature=0.0), make_seq()]
    tokens, lp = Sampler(CPU)(torch.randn(2, 10), seqs, [[], []])
    assert lp is None and tokens.shape == (2,) and tokens.dtype == torch.long


# ---- 2. end to end --------------------------------------------------------------------------------
PROMPT = ("The quick bird flies over a dark mountain road while one small boat swims in the bright "
          "river, and the cat finds seven stars over the city")
OTHERS = ["hello world", "one two three four five six seven eight nine ten the model engine", "a"]
MAX_FULL = 48


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    d = make_text_checkpoint(str(tmp_path_factory.mktemp("sampler_llama")), "llama")
    return LLM(d, dtype="float32", max_model_len=256)


def gen(llm, prompts, params):
    return llm.generate(prompts, params, use_tqdm=False)


def one(llm, params, prompt=PROMPT):
    return gen(llm, [prompt], params)[0].outputs[0]


@pytest.fixture(scope="module")
def full(llm):
    """The seed-123 sample of PROMPT, long and without EOS stops."""
    out = one(llm, SamplingParams(temperature=1.0, seed=123, max_tokens=MAX_FULL, ignore_eos=True))
    assert len(out.token_ids) == MAX_FULL and out.finish_reason == "length"
    return out


def test_e2e_seeded_runs_repeat(llm):
    sp = SamplingParams(temperature=1.0, seed=123, max_tokens=16)
    a = one(llm, sp)
    b = one(llm, sp)  # second time with the prompt's blocks in the prefix cache
    assert (b.token_ids, b.text) == (a.token_ids, a.text)
    assert len(a.token_ids) >= 4
    mixed = gen(llm, OTHERS[:2] + [PROMPT] + OTHERS[2:],
                [SamplingParams(temperature=1.0, max_tokens=20),
                 SamplingParams(temperature=0.7, seed=7, top_k=50, max_tokens=5), sp,
                 SamplingParams(temperature=0.0, max_tokens=30)])
    assert mixed[2].outputs[0].token_ids == a.token_ids and mixed[2].outputs[0].text == a.text
    first = gen(llm, [PROMPT, OTHERS[1]], [sp, SamplingParams(temperature=1.5, max_tokens=16)])
    assert first[0].outputs[0].token_ids == a.token_ids
    assert one(llm, sp.clone(seed=124)).token_ids != a.token_ids
    unseeded = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    assert one(llm, unseeded).token_ids != one(llm, unseeded).token_ids


def test_e2e_n_with_seed(llm):
    sp = SamplingParams(n=3, temperature=1.0, seed=123, max_tokens=16, ignore_eos=True)
    r = gen(llm, [PROMPT], sp)[0]
    assert [c.index for c in r.outputs] == [0, 1, 2]
    samples = [tuple(c.token_ids) for c in r.outputs]
    assert len(set(samples)) == 3 and all(len(s) == 16 for s in samples)
    again = gen(llm, [OTHERS[0], PROMPT], [SamplingParams(max_tokens=8), sp])[1]
    assert [tuple(c.token_ids) for c in again.outputs] == samples
    # as in vLLM, sample i of a seeded request is seeded with seed + i
    for i in range(3):
        single = one(llm, sp.clone(n=1, seed=123 + i))
        assert tuple(single.token_ids) == samples[i] and single.text == r.outputs[i].text


def test_e2e_max_tokens(llm, full):
    out = one(llm, SamplingParams(temperature=1.0, seed=123, max_tokens=7, ignore_eos=True))
    assert out.token_ids == full.token_ids[:7]
    assert out.finish_reason == "length" and out.stop_reason is None
    assert full.text.startswith(out.text)


def _pick_stop_string(text: str) -> tuple[str, int]:
    m = re.compile(r"[a-z]{3}").search(text, 4)
    assert m, f"no stop string candidate in {text!r}"
    return m.group(), text.find(m.group())


def test_e2e_stop_strings(llm, full):
    stop, idx = _pick_stop_string(full.text)
    base = dict(temperature=1.0, seed=123, max_tokens=MAX_FULL, ignore_eos=True)
    out = one(llm, SamplingParams(stop=["\x00never", stop], **base))
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full.text[:idx] and stop not in out.text
    n = len(out.token_ids)
    assert n < MAX_FULL and out.token_ids == full.token_ids[:n]
    # it stopped at the first token whose text completes the stop string, not later
    assert stop in one(llm, SamplingParams(**{**base, "max_tokens": n})).text
    if n > 1:
        assert stop not in one(llm, SamplingParams(**{**base, "max_tokens": n - 1})).text
    kept = one(llm, SamplingParams(stop=stop, include_stop_str_in_output=True, **base))
    assert kept.text == full.text[:idx + len(stop)] and kept.token_ids == out.token_ids
    assert kept.finish_reason == "stop" and kept.stop_reason == stop


def test_e2e_stop_token_ids(llm, full):
    toks = full.token_ids
    eos = llm.get_tokenizer().eos_token_id
    j = next(i for i in range(3, len(toks)) if toks[i] not in toks[:i] and toks[i] != eos)
    unused = next(t for t in range(10, 500) if t not in toks)
    base = dict(temperature=1.0, seed=123, max_tokens=MAX_FULL, ignore_eos=True)
    out = one(llm, SamplingParams(stop_token_ids=[unused, toks[j]], **base))
    assert out.token_ids == toks[:j + 1]  # the stop token is in token_ids ...
    assert out.finish_reason == "stop" and out.stop_reason == toks[j]
    assert out.text == one(llm, SamplingParams(**{**base, "max_tokens": j})).text  # ... not in the text


@pytest.fixture(scope="module")
def eos_sample(llm):
    """A seed whose ignore_eos sample of PROMPT has an EOS early on: (seed, index of it, the sample)."""
    eos = llm.get_tokenizer().eos_token_id
    seeds = list(range(1000, 1160))
    outs = gen(llm, [PROMPT] * len(seeds),
               [SamplingParams(temperature=1.0, seed=s, max_tokens=40, ignore_eos=True) for s in seeds])
    for s, o in zip(seeds, outs):
        toks = o.outputs[0].token_ids
        if eos in toks and 2 <= toks.index(eos) <= 30:
            return s, toks.index(eos), o.outputs[0]
    pytest.fail("no seed in 1000..1159 samples EOS at positions 2..30")


def test_e2e_eos_and_ignore_eos(llm, eos_sample):
    seed, j, ignored = eos_sample
    eos = llm.get_tokenizer().eos_token_id
    assert len(ignored.token_ids) == 40 and ignored.finish_reason == "length"  # went on past EOS
    assert ignored.stop_reason is None
    out = one(llm, SamplingParams(temperature=1.0, seed=seed, max_tokens=40))
    assert out.token_ids == ignored.token_ids[:j + 1] and out.token_ids[-1] == eos
    assert out.finish_reason == "stop" and out.stop_reason is None
    assert out.text == one(llm, SamplingParams(temperature=1.0, seed=seed, max_tokens=j, ignore_eos=True)).text
    # min_tokens bars EOS until then: same draws, so the same tokens up to where EOS was
    m = j + 3
    barred = one(llm, SamplingParams(temperature=1.0, seed=seed, max_tokens=40, min_tokens=m))
    assert len(barred.token_ids) >= m and eos not in barred.token_ids[:m]
    assert barred.token_ids[:j] == ignored.token_ids[:j]


def test_e2e_min_tokens(llm):
    """Half the vocabulary (EOS among it) as stop tokens: without min_tokens nearly every sample
    stops within 5 tokens; with min_tokens=5 none has a stop token among its first 5, and each
    stops at its first stop token after that."""
    vocab = len(llm.get_tokenizer())
    stop = list(range(0, vocab, 2))
    assert llm.get_tokenizer().eos_token_id in stop
    stop_set = set(stop)
    seeds = range(500, 512)

    def params(min_tokens):
        return [SamplingParams(temperature=1.0, seed=s, max_tokens=30, min_tokens=min_tokens,
                               stop_token_ids=stop) for s in seeds]

    control = [o.outputs[0] for o in gen(llm, [PROMPT] * len(seeds), params(0))]
    assert sum(len(c.token_ids) < 5 for c in control) >= len(seeds) // 2
    outs = [o.outputs[0] for o in gen(llm, [PROMPT] * len(seeds), params(5))]
    for o in outs:
        toks = o.token_ids
        assert len(toks) >= 5 and not stop_set & set(toks[:5]), toks
        if o.finish_reason == "stop":
            assert toks[-1] in stop_set and o.stop_reason == toks[-1]
            assert not stop_set & set(toks[5:-1])
        else:
            assert o.finish_reason == "length" and len(toks) == 30 and not stop_set & set(toks)
    assert sum(o.finish_reason == "stop" for o in outs) >= len(seeds) // 2
