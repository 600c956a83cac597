"""Checks vlmserve's outputs against HF transformers run on the same weights.

HF is run teacher-forced on the sequence vlmserve produced (one forward over prompt + output), so
each of vlmserve's greedy tokens is checked against HF's distribution given the same prefix."""
from __future__ import annotations

import torch

LOGPROB_TOL = 1e-3
TOPK = 5


def hf_logprobs(hf_model, token_ids: list[int], **forward_kwargs) -> torch.Tensor:
    with torch.no_grad():
        logits = hf_model(input_ids=torch.tensor([token_ids]), **forward_kwargs).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def check_greedy_against_hf(hf_lp: torch.Tensor, prompt_len: int, completion, tol: float = LOGPROB_TOL):
    """hf_lp: HF logprobs over prompt + completion tokens (row i predicts token i + 1).

    Where HF's top token is ours: every one of our top-k logprobs within `tol` of HF's. At a
    near-tie (random weights), HF's top token must be in our top 5 and ours in HF's top 5, and the
    comparison ends there (the paths part)."""
    ours = completion.token_ids
    assert completion.logprobs is not None and len(completion.logprobs) == len(ours)
    for i, tok in enumerate(ours):
        row = hf_lp[prompt_len - 1 + i]
        hf_top = row.topk(TOPK).indices.tolist()
        our_pos = completion.logprobs[i]
        our_top = sorted(our_pos, key=lambda t: our_pos[t].rank or 10**9)[:TOPK]
        if hf_top[0] != tok:
            assert tok in hf_top and hf_top[0] in our_top, (
                f"step {i}: vlmserve chose {tok}, HF {hf_top[0]}; HF top5 {hf_top}, ours {our_top}")
            gap = abs(row[tok].item() - row[hf_top[0]].item())
            assert gap < 1e-2, f"step {i}: paths part without a near-tie (gap {gap})"
            return
        for t, lp in our_pos.items():
            assert abs(lp.logprob - row[t].item()) <= tol, (
                f"step {i} token {t}: vlmserve {lp.logprob}, HF {row[t].item()}")
        assert our_pos[tok].rank == 1
