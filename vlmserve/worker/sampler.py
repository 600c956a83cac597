"""Turns the logits of the sequences that sample in a step into tokens, per-request parameters.

Order, as HF's logits processors: penalties and min_tokens on the raw logits; then greedy rows take
the argmax, the others divide by temperature and keep top-k, then top-p, then min-p of the
renormalized distribution, and sample by an exponential race (argmax p/E, E ~ Exp(1)), drawing E from
the request's own generator when it has a seed. Logprobs are those of the raw model distribution."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmserve.device_utils import to_device
from vlmserve.engine.sequence import Sequence


@dataclass
class SampledLogprobs:
    token_logprobs: torch.Tensor  # [N] logprob of each chosen token
    token_ranks: torch.Tensor  # [N] 1-based rank of it
    topk_ids: torch.Tensor  # [N, K]
    topk_logprobs: torch.Tensor  # [N, K]

    def to_host(self) -> SampledLogprobs:
        """Start the copies to the host (pinned memory, from CUDA); read them once the step is done."""
        return SampledLogprobs(*(t.to("cpu", non_blocking=True) for t in (
            self.token_logprobs, self.token_ranks, self.topk_ids, self.topk_logprobs)))


def gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, k: int) -> SampledLogprobs:
    tok_lp = logprobs.gather(1, token_ids[:, None]).squeeze(1)
    ranks = (logprobs > tok_lp[:, None]).sum(1) + 1
    if k > 0:
        top_lp, top_ids = logprobs.topk(k, dim=1)
    else:
        top_lp = logprobs.new_empty((logprobs.shape[0], 0))
        top_ids = token_ids.new_empty((logprobs.shape[0], 0))
    return SampledLogprobs(tok_lp, ranks, top_ids, top_lp)


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """In place. repetition_penalty over prompt and output tokens (HF / CTRL definition);
    presence and frequency penalties over output tokens (OpenAI definition)."""
    for row, seq in enumerate(seqs):
        p = seq.params
        if not p.needs_penalties:
            continue
        if seq.num_pending_tokens:  # the engine processes a step's results before penalizing with them
            raise RuntimeError("penalties need every earlier token of the sequence on the host")
        row_logits = logits[row]
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(seq.token_ids, device=logits.device).unique()
            vals = row_logits[seen]
            row_logits[seen] = torch.where(vals < 0, vals * p.repetition_penalty, vals / p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:
            out = torch.tensor(seq.output_token_ids, device=logits.device)
            counts = torch.zeros_like(row_logits).scatter_add_(0, out, torch.ones_like(out, dtype=logits.dtype))
            row_logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


def restrict_support(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                     min_p: torch.Tensor, use_top_k_p: bool | None = None,
                     use_min_p: bool | None = None) -> torch.Tensor:
    """Zero out what top-k (0: off), then top-p, then min-p exclude, renormalizing in between.
    use_top_k_p / use_min_p: whether any row has them on; the sampler knows it on the host, so
    that nothing is read back from the device (None: look at the tensors)."""
    vocab = probs.shape[1]
    if use_top_k_p is None:
        use_top_k_p = bool((top_k > 0).any()) or bool((top_p < 1).any())
    if use_min_p is None:
        use_min_p = bool((min_p > 0).any())
    if use_top_k_p:
        sorted_p, order = probs.sort(dim=1, descending=True)
        ranks = torch.arange(vocab, device=probs.device)[None, :]
        k = torch.where(top_k > 0, top_k, vocab)[:, None]
        sorted_p = sorted_p.masked_fill(ranks >= k, 0.0)
        sorted_p = sorted_p / sorted_p.sum(1, keepdim=True)
        # keep the smallest prefix whose mass reaches top_p: drop a token once the mass above it does
        # (rows with top_p == 1 skip this: there a rounded cumsum can reach 1 and cut the tail)
        mass_above = sorted_p.cumsum(1) - sorted_p
        sorted_p = sorted_p.masked_fill((mass_above >= top_p[:, None]) & (top_p[:, None] < 1), 0.0)
        probs = torch.zeros_like(probs).scatter_(1, order, sorted_p)
        probs = probs / probs.sum(1, keepdim=True)
    if use_min_p:
        thresh = probs.max(1, keepdim=True).values * min_p[:, None]
        probs = probs.masked_fill(probs < thresh, 0.0)
        probs = probs / probs.sum(1, keepdim=True)
    return probs


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def _seq_generator(self, seq: Sequence) -> torch.Generator | None:
        if seq.params.seed is None:
            return None
        if seq.generator is None or seq.generator.device.type != self.device.type:
            # Sequence makes a CPU generator; rows on another device need one there, seeded alike
            seq.generator = torch.Generator(device=self.device).manual_seed(seq.params.seed)
        return seq.generator

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence], stop_ids: list[list[int]]):
        """logits: [N, V] for the N sampling sequences; stop_ids[i]: tokens barred until
        min_tokens. Returns (token ids [N], SampledLogprobs or None), on the device: nothing here
        waits for the device."""
        logits = logits.float()
        raw_logprobs = None
        max_k = max((s.params.logprobs or 0) for s in seqs if s.params.logprobs is not None) \
            if any(s.params.logprobs is not None for s in seqs) else None
        if max_k is not None:
            raw_logprobs = torch.log_softmax(logits, dim=-1)

        if any(s.params.needs_penalties or s.num_output_tokens < s.params.min_tokens for s in seqs):
            logits = logits.clone()
            apply_penalties(logits, seqs)
            for row, seq in enumerate(seqs):
                if seq.num_output_tokens < seq.params.min_tokens and stop_ids[row]:
                    logits[row].index_fill_(0, to_device(stop_ids[row], logits.device, torch.long), float("-inf"))

        greedy = [s.params.greedy for s in seqs]
        tokens = torch.empty(len(seqs), dtype=torch.long, device=logits.device)
        if all(greedy):
            tokens = logits.argmax(dim=-1)
        else:
            dev = logits.device
            temp = to_device([1.0 if g else s.params.temperature for s, g in zip(seqs, greedy)], dev, torch.float32)
            probs = torch.softmax(logits / temp[:, None], dim=-1)
            top_k = [s.params.top_k for s in seqs]
            top_p = [s.params.top_p for s in seqs]
            min_p = [s.params.min_p for s in seqs]
            probs = restrict_support(
                probs, to_device(top_k, dev, torch.long), to_device(top_p, dev, torch.float32),
                to_device(min_p, dev, torch.float32),
                use_top_k_p=any(k > 0 for k in top_k) or any(p < 1 for p in top_p),
                use_min_p=any(p > 0 for p in min_p))
            race = torch.empty_like(probs).exponential_(generator=self.generator)
            for row, seq in enumerate(seqs):
                g = self._seq_generator(seq)
                if g is not None:
                    race[row].exponential_(generator=g)
            tokens = (probs / race).argmax(dim=-1)
            if any(greedy):
                mask = to_device(greedy, dev, torch.bool)
                tokens = torch.where(mask, logits.argmax(dim=-1), tokens)

        lp = gather_logprobs(raw_logprobs, tokens, max_k) if raw_logprobs is not None else None
        return tokens, lp
