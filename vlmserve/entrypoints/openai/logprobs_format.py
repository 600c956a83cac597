"""vlmserve logprobs -> the shapes of OpenAI's chat and completions APIs."""
from __future__ import annotations


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprobs(tokenizer, token_ids: list[int], positions: list[dict], top_n: int, text_of) -> dict:
    content = []
    for tok, pos in zip(token_ids, positions):
        lp = pos[tok]
        tops = sorted(pos.items(), key=lambda kv: kv[1].rank or 10**9)[:top_n]
        content.append({
            "token": text_of(tok), "logprob": max(lp.logprob, -9999.0), "bytes": _bytes(text_of(tok)),
            "top_logprobs": [{"token": text_of(t), "logprob": max(v.logprob, -9999.0), "bytes": _bytes(text_of(t))}
                             for t, v in tops],
        })
    return {"content": content}


def completion_logprobs(token_ids: list[int], positions: list[dict], top_n: int, text_of,
                        start_offset: int = 0) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = start_offset
    for tok, pos in zip(token_ids, positions):
        text = text_of(tok)
        tokens.append(text)
        token_lps.append(pos[tok].logprob if pos is not None else None)
        if pos is None:
            tops.append(None)
        else:
            best = sorted(pos.items(), key=lambda kv: kv[1].rank or 10**9)[:top_n]
            tops.append({text_of(t): v.logprob for t, v in best})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}
