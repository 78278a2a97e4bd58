"""Attention that returns the log-sum-exp, and the one exact merge of partial attentions.

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
from mnemosyne_hpc.kernels.decode import decode_attention, decode_attention_into
from mnemosyne_hpc.kernels.prefill import prefill_attention

try:  # GPU kernel; the math path below serves devices without it
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q over k, v; `causal` aligns query i with key i (requires Lq == Lk)."""
    if q.device.type == "cpu":
        return _cpu_attention(q, k, v, causal)
    if flash_attn_func is not None and q.dtype in (torch.float16, torch.bfloat16):
        out, lse, _ = flash_attn_func(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                      causal=causal, return_attn_probs=True)
        return out[0].transpose(0, 1), lse[0]
    if q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256:
        # torch's CUDA flash kernel (FlashAttention-2). A causal call is a chunk over its own K/V, the
        # only K/V it repeats; the cached prefix is unmasked and folded.
        return _torch_flash(torch.ops.aten._scaled_dot_product_flash_attention, q, k, v, causal, maps_heads=False)
    return math_attention(q, k, v, causal)


# Longer unmasked key ranges go to the prefill kernels in pieces merged by LSE: a piece's keys and
# values stay in cache while every query block reads them (a 1M-token prefix in one call ran at 60%).
KEYS_PER_CALL = 1 << 16


def _cpu_attention(q, k, v, causal):
    """In bf16, our kernels: a few query rows per KV head with no mask (decode steps) go to the decode
    kernel, longer queries to the AMX prefill kernel. Otherwise torch's CPU flash kernel. It maps
    query head h to KV head h // g itself, so causal GQA needs no K/V copies; without a mask, the g
    query heads of a KV head are folded into one longer query, which it runs faster."""
    hq, lq, d = q.shape
    hkv, lk = k.shape[:2]
    if not causal and (result := decode_attention(q, k, v)) is not None:
        return result
    if not causal and lk > KEYS_PER_CALL:
        pieces = [_cpu_attention(q, k[:, i:i + KEYS_PER_CALL], v[:, i:i + KEYS_PER_CALL], False)
                  for i in range(0, lk, KEYS_PER_CALL)]
        return merge_attention([out for out, _ in pieces], [lse for _, lse in pieces])
    if (result := prefill_attention(q, k, v, causal)) is not None:
        return result
    return _torch_flash(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu, q, k, v, causal, maps_heads=True)


def _torch_flash(kernel, q, k, v, causal, maps_heads: bool):
    """One of torch's flash kernels, which return the LSE. Without a mask, the g query heads of a KV
    head fold into one longer query: no K/V copies, and it runs faster. With one, the kernel maps
    query head h to KV head h // g itself if `maps_heads`; otherwise K/V are repeated."""
    hq, lq, d = q.shape
    hkv = k.shape[0]
    if not causal:
        q = q.reshape(hkv, (hq // hkv) * lq, d)
    elif not maps_heads and hq != hkv:
        k, v = k.repeat_interleave(hq // hkv, dim=0), v.repeat_interleave(hq // hkv, dim=0)
    out, lse = kernel(q[None], k[None], v[None], 0.0, causal)[:2]
    return out[0].reshape(hq, lq, d), lse[0].reshape(hq, lq)


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
        return cls(torch.tensor(rows, dtype=torch.long), first_run, flat[:, 0].contiguous(), flat[:, 1].contiguous(),
                   int(flat[:, 1].sum()), torch.device(device))

    @functools.cached_property
    def splits(self) -> triton_decode.Splits:
        """The runs cut into the GPU kernel's splits, on the device (once a step, for every layer)."""
        return triton_decode.Splits.of(self.rows, self.first_run, self.starts, self.lengths, self.device)

    def runs_of(self, i: int) -> list[slice]:
        """Sequence i's runs as slices of the cache."""
        bounds = range(*self.first_run[i: i + 2].tolist())
        starts, lengths = self.starts[bounds].tolist(), self.lengths[bounds].tolist()
        return [slice(start, start + n) for start, n in zip(starts, lengths)]


def decode_batch_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, decodes: DecodeBatch,
                           out: torch.Tensor, lse: torch.Tensor) -> None:
    """Token-major q [T, Hq, D]: each row of `decodes` attends, unmasked, to its runs of cached keys and
    values in k_cache, v_cache [Hkv, slots, D]; written to out [T, Hq, D] and lse [T, Hq] at those
    rows. In bf16 one kernel call serves them all (decode.c on CPU, Triton on GPU); else each run of
    each token is one call, read in place, and a token's runs are merged by LSE."""
    tokens, hq, d = q.shape
    hkv = k_cache.shape[0]
    grouped = q.view(tokens, hkv, hq // hkv, d)
    grouped_out, grouped_lse = out.view(grouped.shape), lse.view(grouped.shape[:3])
    if q.is_cpu:
        if decode_attention_into(grouped, k_cache, v_cache, decodes.rows, decodes.first_run, decodes.starts,
                                 decodes.lengths, decodes.total_keys, grouped_out, grouped_lse):
            return
    elif triton_decode.decode_attention_into(grouped, k_cache, v_cache, decodes.splits, grouped_out, grouped_lse):
        return
    for i, row in enumerate(decodes.rows.tolist()):
        pieces = [attention(q[row][:, None], k_cache[:, run], v_cache[:, run], causal=False)
                  for run in decodes.runs_of(i)]
        row_out, row_lse = merge_attention([piece[0] for piece in pieces], [piece[1] for piece in pieces])
        out[row], lse[row] = row_out[:, 0], row_lse[:, 0]


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


def chunk_attention(q, k_chunk, v_chunk, k_prefix, v_prefix):
    """A prefill chunk (or decode token): attention to the cached prefix merged with causal self-attention."""
    self_out, self_lse = attention(q, k_chunk, v_chunk, causal=True)
    if k_prefix is None or k_prefix.shape[1] == 0:
        return self_out, self_lse
    prefix_out, prefix_lse = attention(q, k_prefix, v_prefix, causal=False)
    return merge_attention([prefix_out, self_out], [prefix_lse, self_lse])


def merge_over_group(out: torch.Tensor, lse: torch.Tensor, group) -> torch.Tensor:
    """Every rank of `group` holds a partial attention of the same queries over its own keys: gather
    them all (∝ queries × heads, not keys) and merge exactly, in group order on every rank."""
    packed = torch.cat([out.float(), lse[..., None]], dim=-1)
    gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, packed, group=group)
    merged, _ = merge_attention([g[..., :-1] for g in gathered], [g[..., -1] for g in gathered])
    return merged.to(out.dtype)
