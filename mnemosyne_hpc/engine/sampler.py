"""Next-token sampling (greedy, temperature, top-k, top-p), and log-probabilities of tokens.

Randomness is a pure function of the request's seed and the position being sampled, so any rank
can sample any request (a request changes KVP group as it grows) and a recomputed token is
sampled again exactly as before.
"""

from __future__ import annotations

import sys

import torch

from mnemosyne_hpc.engine.request import SamplingParams, TokenLogprob

_GOLDEN = 0x9E3779B97F4A7C15  # spreads consecutive positions over the seed space
FAILED = -1  # the token of a row whose sampling raised: its request ends with finish_reason "error"


def sample(logits: torch.Tensor, params: list[SamplingParams], positions: list[int]) -> list[int]:
    """logits [n, vocab] float32 → one token id per row; row i samples position `positions[i]`.
    A row whose sampling fails gets FAILED; the other rows are unaffected."""
    tokens = logits.argmax(dim=-1).tolist()  # the greedy rows' tokens: one op for all of them
    for i, (row, p, position) in enumerate(zip(logits, params, positions)):
        if not p.greedy:
            try:
                tokens[i] = _sample_row(row, p, position)
            except (RuntimeError, ValueError) as e:
                print(
                    f"warning: sampling failed ({type(e).__name__}: {e}); the request ends with an error",
                    file=sys.stderr,
                    flush=True,
                )
                tokens[i] = FAILED
    return tokens


def _sample_row(row: torch.Tensor, p: SamplingParams, position: int) -> int:
    # Float64, shifted by the row's maximum: any temperature > 0 gives finite probabilities (1e-300 is
    # the greedy limit, ties shared), which a float32 division would turn into 0/0.
    scaled = (row.double() - row.max()) / p.temperature
    probs = torch.softmax(_filter(scaled, p.top_k, p.top_p), dim=-1)
    generator = torch.Generator().manual_seed((p.seed ^ (position * _GOLDEN)) % 2**64)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs >= top_p  # keep the smallest set reaching top_p
        drop[0] = False  # and always the most likely token
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def logprob_rows(logits: torch.Tensor, targets: torch.Tensor, top: int) -> torch.Tensor:
    """logits [n, vocab], targets [n] → [n, 2 + 2·top] float64 rows: the target's id and log-probability,
    then the ids of the `top` most likely tokens and theirs (float64 holds any token id exactly)."""
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    best = logprobs.topk(top, dim=-1)
    chosen = logprobs.gather(1, targets[:, None])
    return torch.cat([targets[:, None].double(), chosen, best.indices.double(), best.values], dim=1)


def token_logprob(row: torch.Tensor, top: int) -> TokenLogprob:
    """A row of `logprob_rows` as a TokenLogprob with the `top` first of its alternatives."""
    width = (len(row) - 2) // 2
    ids, values = row[2 : 2 + top].long().tolist(), row[2 + width : 2 + width + top].tolist()
    return TokenLogprob(int(row[0]), float(row[1]), tuple(zip(ids, values)))
