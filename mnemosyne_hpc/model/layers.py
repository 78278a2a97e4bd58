"""Tensor-parallel building blocks: each rank holds a shard; all-reduce/all-gather on the TP group."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mnemosyne_hpc.model.backend import TorchBackend


class TensorParallel:
    """The TP group a layer shards over (size 1: a plain single-rank layer)."""

    def __init__(self, group: dist.ProcessGroup | None, rank: int = 0, size: int = 1):
        self.group, self.rank, self.size = group, rank, size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


def split_evenly(total: int, tp: TensorParallel, what: str) -> int:
    if total % tp.size:
        raise ValueError(f"{what} = {total} is not divisible by parallel.tp = {tp.size}")
    return total // tp.size


class ColumnParallelLinear(nn.Module):
    """y = x Wᵀ with W's output rows split over TP ranks; the output stays sharded."""

    def __init__(self, in_features: int, local_out_features: int, bias: bool, backend: TorchBackend):
        super().__init__()
        self.backend = backend
        self.weight = nn.Parameter(torch.empty(local_out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(local_out_features), requires_grad=False) if bias else None

    def forward(self, x):
        return self.backend.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = Σ_ranks x_shard W_shardᵀ: the input is sharded, the output all-reduced."""

    def __init__(self, local_in_features: int, out_features: int, tp: TensorParallel, backend: TorchBackend):
        super().__init__()
        self.tp, self.backend = tp, backend
        self.weight = nn.Parameter(torch.empty(out_features, local_in_features), requires_grad=False)

    def forward(self, x):
        return self.tp.all_reduce(self.backend.linear(x, self.weight))


class VocabParallelEmbedding(nn.Module):
    """Each rank holds `ceil(V / tp)` rows of the table (zero-padded); lookups are all-reduced."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.rows_per_rank = math.ceil(vocab_size / tp.size)
        self.vocab_start = tp.rank * self.rows_per_rank
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, hidden_size), requires_grad=False)

    def forward(self, token_ids):
        local = token_ids - self.vocab_start
        outside = (local < 0) | (local >= self.rows_per_rank)
        hidden = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(hidden.masked_fill(outside[:, None], 0))


class ParallelLMHead(nn.Module):
    """Logits for a vocab shard per rank, gathered to the full vocabulary on every TP rank."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel, backend: TorchBackend):
        super().__init__()
        self.tp, self.vocab_size, self.backend = tp, vocab_size, backend
        self.weight = nn.Parameter(torch.empty(math.ceil(vocab_size / tp.size), hidden_size), requires_grad=False)

    def forward(self, hidden):
        return self.tp.all_gather_last_dim(self.backend.linear(hidden, self.weight))[..., : self.vocab_size]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, backend: TorchBackend):
        super().__init__()
        self.eps, self.backend = eps, backend
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x normalised; with `residual`, x += residual first, in place (the layer's running sum)."""
        return self.backend.rms_norm(x, self.weight, self.eps, residual)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling is None:
        return inv_freq.float()
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return (inv_freq / factor).float()
    # Llama 3: scale long wavelengths by `factor`, keep short ones, interpolate between.
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    medium = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(medium, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled).float()


def rope_tables(angles: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin [T, D] of the angles [T, D/2], as the backends' `rope_` takes them: computed once a
    step, used by every layer."""
    angles = torch.cat((angles, angles), dim=-1)
    half = angles.shape[-1] // 2
    sin = angles.sin()
    sin[:, :half].neg_()
    return angles.cos().to(dtype), sin.to(dtype)
