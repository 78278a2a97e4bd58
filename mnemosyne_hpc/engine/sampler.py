"""Next-token sampling: greedy, temperature, top-k, top-p, with a seeded generator per request."""
from __future__ import annotations

import torch

from mnemosyne_hpc.engine.request import SamplingParams


class Sampler:
    def __init__(self):
        self._generators: dict[int, torch.Generator] = {}

    def sample(self, logits: torch.Tensor, request_ids: list[int], params: list[SamplingParams]) -> list[int]:
        """logits [n, vocab] float32 → one token id per row."""
        tokens = []
        for row, request_id, p in zip(logits, request_ids, params):
            if p.greedy:
                tokens.append(int(row.argmax()))
                continue
            generator = self._generators.get(request_id)
            if generator is None:
                generator = self._generators[request_id] = torch.Generator().manual_seed(p.seed)
            probs = torch.softmax(_filter(row / p.temperature, p.top_k, p.top_p), dim=-1)
            tokens.append(int(torch.multinomial(probs.cpu(), 1, generator=generator)))
        return tokens

    def release(self, request_ids: list[int]) -> None:
        for request_id in request_ids:
            self._generators.pop(request_id, None)


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
