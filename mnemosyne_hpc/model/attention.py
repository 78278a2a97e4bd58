"""The attention math every backend shares: the float32 reference, the one exact merge of partial
attentions (also over KVP groups), and the decode batch's description of where its KV lives.
Which kernel computes an attention is the backend's choice (`backend.py`).

Shapes: queries `[Hq, Lq, D]`, keys and values `[Hkv, Lk, D]` with `Hq = g · Hkv` (GQA);
results `out [Hq, Lq, D]` and `lse [Hq, Lq]` (float32, natural log).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mnemosyne_hpc.kernels import triton_decode


@dataclass
class DecodeBatch:
    """Single-token queries over their cached KV on this rank (their own K/V, if they hold it, among
    it), each KV a list of runs of consecutive slots: one attention call serves them all, reading the
    cache in place. Built once a step, read by every layer. Tensors: int64 on the CPU."""

    rows: torch.Tensor  # [S]: their rows in the packed batch
    first_run: torch.Tensor  # [S + 1]: sequence i's runs are first_run[i] .. first_run[i + 1] − 1
    starts: torch.Tensor  # [runs]: first cache slot of each run
    lengths: torch.Tensor  # [runs]: slots of each run (at least one)
    total_keys: int  # Σ lengths
    device: torch.device  # the cache's

    @classmethod
    def of(cls, rows: list[int], runs: list[list[tuple[int, int]]], device: torch.device) -> DecodeBatch:
        """Row rows[i] attends to the runs runs[i], (first slot, length) each, in a cache on `device`."""
        flat = torch.tensor([run for seq in runs for run in seq], dtype=torch.long).reshape(-1, 2)
        first_run = torch.tensor([0, *itertools.accumulate(map(len, runs))], dtype=torch.long)
        return cls(
            torch.tensor(rows, dtype=torch.long),
            first_run,
            flat[:, 0].contiguous(),
            flat[:, 1].contiguous(),
            int(flat[:, 1].sum()),
            torch.device(device),
        )

    @functools.cached_property
    def splits(self) -> triton_decode.Splits:
        """The runs cut into the GPU kernel's splits, on the device (once a step, for every layer)."""
        return triton_decode.Splits.of(self.rows, self.first_run, self.starts, self.lengths, self.device)

    def runs_of(self, i: int) -> list[slice]:
        """Sequence i's runs as slices of the cache."""
        bounds = range(*self.first_run[i : i + 2].tolist())
        starts, lengths = self.starts[bounds].tolist(), self.lengths[bounds].tolist()
        return [slice(start, start + n) for start, n in zip(starts, lengths)]


def math_attention(q, k, v, causal):
    """Plain matmul attention in float32: the portable reference path."""
    g = q.shape[0] // k.shape[0]
    k = k.repeat_interleave(g, dim=0).float()
    v = v.repeat_interleave(g, dim=0).float()
    scores = (q.float() @ k.transpose(1, 2)) * q.shape[-1] ** -0.5
    if causal:
        scores.masked_fill_(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.exp(scores - lse[..., None]) @ v
    return out.to(q.dtype), lse


def merge_attention(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax over the union of key sets: lse = logsumexp_j lse_j, out = Σ_j exp(lse_j − lse)·out_j."""
    if len(outs) == 1:
        return outs[0], lses[0]
    lse_stack = torch.stack(lses)
    lse = torch.logsumexp(lse_stack, dim=0)
    weights = torch.exp(lse_stack - lse)[..., None]
    out = (weights * torch.stack(outs).float()).sum(dim=0)
    return out.to(outs[0].dtype), lse


def merge_over_group(out: torch.Tensor, lse: torch.Tensor, group) -> torch.Tensor:
    """Every rank of `group` holds a partial attention of the same queries over its own keys: gather
    them all (∝ queries × heads, not keys) and merge exactly, in group order on every rank."""
    packed = torch.cat([out.float(), lse[..., None]], dim=-1)
    gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, packed, group=group)
    merged, _ = merge_attention([g[..., :-1] for g in gathered], [g[..., -1] for g in gathered])
    return merged.to(out.dtype)
