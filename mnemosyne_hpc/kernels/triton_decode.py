"""Decode attention on GPU: a Triton kernel that reads the paged KV cache in place.

A sequence's KV is a list of runs of consecutive cache slots (`DecodeBatch`). Each run is cut into
splits of at most SPLIT_KEYS keys. One program per (split, KV head) computes the split's attention
for the query heads of that KV head (an online softmax over blocks of keys); one program per
(sequence, KV head) then merges its splits by log-sum-exp, the exact softmax over all its keys.
Without a GPU, Triton's interpreter (TRITON_INTERPRET=1) runs the same kernels on CPU tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:  # ships with torch's CUDA builds; the CPU build serves decodes with decode.c
    import triton
    import triton.language as tl
except ImportError:
    triton = None

SPLIT_KEYS = 512  # a 32k-token sequence is 64 splits per KV head: enough programs to fill a GPU
BLOCK_KEYS = 64


@dataclass
class Splits:
    """Where each split reads (int32 tensors on the cache's device), built once a decode step."""

    row: torch.Tensor  # [splits]: its sequence's row in the packed batch
    start: torch.Tensor  # [splits]: first cache slot
    length: torch.Tensor  # [splits]: 1 .. SPLIT_KEYS slots
    first: torch.Tensor  # [S + 1]: sequence i's splits are first[i] .. first[i + 1] − 1
    seq_row: torch.Tensor  # [S]: sequence i's row
    most: int  # the most splits of any sequence

    @classmethod
    def of(
        cls,
        rows: torch.Tensor,
        first_run: torch.Tensor,
        starts: torch.Tensor,
        lengths: torch.Tensor,
        device: torch.device,
    ) -> Splits:
        """Cut every run (rows, first_run, starts, lengths as in `DecodeBatch`) into splits."""
        pieces = (lengths + SPLIT_KEYS - 1) // SPLIT_KEYS
        run = torch.repeat_interleave(pieces)
        first_piece = torch.cumsum(pieces, 0) - pieces
        offset = (torch.arange(len(run)) - first_piece[run]) * SPLIT_KEYS
        seq = torch.repeat_interleave(torch.diff(first_run))
        first = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(pieces, 0)])[first_run]
        parts = (rows[seq[run]], starts[run] + offset, torch.clamp(lengths[run] - offset, max=SPLIT_KEYS), first, rows)
        on_device = torch.cat(parts).to(device=device, dtype=torch.int32)  # one copy to the device
        return cls(*on_device.split([len(part) for part in parts]), most=int(torch.diff(first).max()))


def decode_attention_into(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, splits: Splits, out: torch.Tensor, lse: torch.Tensor
) -> bool:
    """Each sequence's queries q[seq_row[i]] ([Hkv, G, D]; q is [T, Hkv, G, D]) attend, unmasked, to its
    splits of k, v ([Hkv, slots, D]); into out (contiguous, q's shape and dtype) and lse (contiguous
    [T, Hkv, G], float32) at those rows. False, with nothing written, where the kernel does not apply."""
    _, hkv, group, d = q.shape
    if not (
        triton is not None
        and q.dtype in (torch.bfloat16, torch.float16)
        and k.dtype == v.dtype == q.dtype
        and d in (64, 128, 256)
        and q.stride()[1:] == (group * d, d, 1)
        and k.stride() == v.stride()
        and k.stride(-1) == 1
        and out.is_contiguous()
        and lse.is_contiguous()
    ):
        return False
    group_pad = max(16, triton.next_power_of_2(group))  # tl.dot takes blocks of at least 16 rows
    num_splits = len(splits.row)
    partial_out = torch.empty(num_splits, hkv, group, d, dtype=torch.float32, device=q.device)
    partial_lse = torch.empty(num_splits, hkv, group, dtype=torch.float32, device=q.device)
    _attend_splits[(num_splits, hkv)](
        q,
        k,
        v,
        splits.row,
        splits.start,
        splits.length,
        partial_out,
        partial_lse,
        d**-0.5,
        q.stride(0),
        k.stride(0),
        k.stride(1),
        GROUP=group,
        GROUP_PAD=group_pad,
        D=d,
        BLOCK=BLOCK_KEYS,
        SPLIT=SPLIT_KEYS,
    )
    _merge_splits[(len(splits.seq_row), hkv)](
        partial_out,
        partial_lse,
        splits.first,
        splits.seq_row,
        out,
        lse,
        GROUP=group,
        GROUP_PAD=group_pad,
        D=d,
        MAX_SPLITS=triton.next_power_of_2(splits.most),
    )
    return True


if triton is not None:

    @triton.jit
    def _attend_splits(
        q,
        k,
        v,
        split_row,
        split_start,
        split_length,
        partial_out,
        partial_lse,
        scale,
        q_token_stride,
        kv_head_stride,
        kv_slot_stride,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        D: tl.constexpr,
        BLOCK: tl.constexpr,
        SPLIT: tl.constexpr,
    ):
        split, head, heads = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
        row = tl.load(split_row + split).to(tl.int64)
        start = tl.load(split_start + split).to(tl.int64)
        length = tl.load(split_length + split)
        g, d, n = tl.arange(0, GROUP_PAD), tl.arange(0, D), tl.arange(0, BLOCK)
        query = tl.load(
            q + row * q_token_stride + (head * GROUP + g[:, None]) * D + d[None, :], mask=g[:, None] < GROUP, other=0.0
        )
        kv = k.dtype.element_ty
        best = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        total = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, D], tl.float32)
        for first in range(0, SPLIT, BLOCK):  # blocks past `length` are masked out
            valid = first + n < length
            at = head * kv_head_stride + (start + first + n)[:, None] * kv_slot_stride + d[None, :]
            keys = tl.load(k + at, mask=valid[:, None], other=0.0)
            scores = tl.where(valid[None, :], tl.dot(query, tl.trans(keys)) * scale, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, 1))
            weights = tl.exp(scores - new_best[:, None])
            rescale = tl.exp(best - new_best)
            values = tl.load(v + at, mask=valid[:, None], other=0.0)
            acc = acc * rescale[:, None] + tl.dot(weights.to(kv), values)
            total = total * rescale + tl.sum(weights, 1)
            best = new_best
        at = (split * heads + head) * GROUP + g  # the padding rows are not stored
        tl.store(partial_out + at[:, None] * D + d[None, :], acc / total[:, None], mask=g[:, None] < GROUP)
        tl.store(partial_lse + at, best + tl.log(total), mask=g < GROUP)

    @triton.jit
    def _merge_splits(
        partial_out,
        partial_lse,
        seq_first,
        seq_row,
        out,
        lse,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        D: tl.constexpr,
        MAX_SPLITS: tl.constexpr,
    ):
        seq, head, heads = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
        first, last = tl.load(seq_first + seq), tl.load(seq_first + seq + 1)
        g, d = tl.arange(0, GROUP_PAD), tl.arange(0, D)
        best = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        total = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, D], tl.float32)
        for i in range(0, MAX_SPLITS):  # splits past `last` are masked out; a sequence has at least one
            valid = first + i < last
            at = ((first + i) * heads + head) * GROUP + g
            rows = valid & (g < GROUP)  # padding rows read 0, computed and never stored
            split_lse = tl.load(partial_lse + at, mask=rows, other=0.0)
            new_best = tl.where(valid, tl.maximum(best, split_lse), best)
            rescale = tl.exp(best - new_best)
            weight = tl.where(valid, tl.exp(split_lse - new_best), 0.0)
            split_out = tl.load(partial_out + at[:, None] * D + d[None, :], mask=rows[:, None], other=0.0)
            acc = acc * rescale[:, None] + weight[:, None] * split_out
            total = total * rescale + weight
            best = new_best
        at = (tl.load(seq_row + seq).to(tl.int64) * heads + head) * GROUP + g
        tl.store(
            out + at[:, None] * D + d[None, :], (acc / total[:, None]).to(out.dtype.element_ty), mask=g[:, None] < GROUP
        )
        tl.store(lse + at, best + tl.log(total), mask=g < GROUP)
