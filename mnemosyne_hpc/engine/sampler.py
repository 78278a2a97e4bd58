"""Next-token sampling: greedy, temperature, top-k, top-p.

Randomness is a pure function of the request's seed and the position being sampled, so any rank
can sample any request (a request changes KVP group as it grows) and a recomputed token is
sampled again exactly as before.
"""
from __future__ import annotations

import torch

from mnemosyne_hpc.engine.request import SamplingParams

_GOLDEN = 0x9E3779B97F4A7C15  # spreads consecutive positions over the seed space


def sample(logits: torch.Tensor, params: list[SamplingParams], positions: list[int]) -> list[int]:
    """logits [n, vocab] float32 → one token id per row; row i samples position `positions[i]`."""
    tokens = logits.argmax(dim=-1).tolist()  # the greedy rows' tokens: one op for all of them
    for i, (row, p, position) in enumerate(zip(logits, params, positions)):
        if not p.greedy:
            generator = torch.Generator().manual_seed((p.seed ^ (position * _GOLDEN)) % 2**64)
            probs = torch.softmax(_filter(row / p.temperature, p.top_k, p.top_p), dim=-1)
            tokens[i] = int(torch.multinomial(probs.cpu(), 1, generator=generator))
    return tokens


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits
