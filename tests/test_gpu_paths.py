"""The GPU attention paths. On a GPU, they run there in bf16. Without one, the Triton decode kernel
runs in Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py), and torch's CUDA flash kernel
is replaced by a stand-in that runs torch's CPU flash kernel and insists on what the CUDA one needs.
`CUDABackend.attention` calls `torch_flash` with that kernel on a GPU."""

from __future__ import annotations

import pytest
import torch

from attention_reference import assert_each_row_attended_to_its_runs
from mnemosyne_hpc.kernels import triton_decode
from mnemosyne_hpc.model.attention import DecodeBatch, math_attention
from mnemosyne_hpc.model.backend import torch_flash

pytest.importorskip("triton", reason="Triton comes with the test extras (and with torch's CUDA builds)")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter computes fp16 dot products but not bf16 ones (it keeps bf16 as raw 16-bit integers
# and multiplies those): the kernels are the same for both, so fp16 stands in for bf16 there.
HALF = torch.bfloat16 if DEVICE == "cuda" else torch.float16


@pytest.mark.parametrize("group, d", [(4, 64), (3, 128), (1, 64)])
def test_triton_decode_kernel_matches_fp32_attention_over_runs_of_slots(group, d):
    torch.manual_seed(group)
    hkv, tokens = 2, 6
    k_cache, v_cache = torch.randn(2, hkv, 3000, d).to(DEVICE, HALF)
    q = torch.randn(tokens, hkv * group, d).to(DEVICE, HALF)
    rows = [4, 0, 5, 2]
    # runs longer than a split and cut into several, runs of one slot, runs out of order in the cache
    runs = [
        [(10, 2 * triton_decode.SPLIT_KEYS + 37), (2990, 1)],
        [(1200, 37)],
        [(1300, 300), (0, 5), (2400, 590)],
        [(2999, 1)],
    ]
    decodes = DecodeBatch.of(rows, runs, DEVICE)
    assert decodes.splits.most == 4 and len(decodes.splits.row) == 10
    out, lse = torch.full_like(q, 7.0), torch.full(q.shape[:2], 7.0)
    grouped = q.view(tokens, hkv, group, d)
    assert triton_decode.decode_attention_into(
        grouped, k_cache, v_cache, decodes.splits, out.view(grouped.shape), lse.view(grouped.shape[:3])
    )
    # weights are rounded to half precision before the value product, as in flash attention
    assert_each_row_attended_to_its_runs(
        *(t.cpu() for t in (q, k_cache, v_cache)), rows, runs, out.cpu(), lse.cpu(), atol=4e-3, rtol=8e-3
    )
    assert (out[[1, 3]] == 7).all() and (lse[[1, 3]] == 7).all()  # rows of other sequences untouched


def test_triton_decode_kernel_leaves_fp32_and_odd_head_sizes_to_the_fallback():
    decodes = DecodeBatch.of([0], [[(0, 10)]], DEVICE)
    for dtype, d in (torch.float32, 64), (HALF, 80):
        kv = torch.randn(1, 10, d).to(DEVICE, dtype)
        q, out = torch.randn(1, 1, 4, d).to(DEVICE, dtype), torch.empty(1, 1, 4, d).to(DEVICE, dtype)
        assert not triton_decode.decode_attention_into(q, kv, kv, decodes.splits, out, torch.empty(1, 1, 4))


def cuda_flash_stand_in(q, k, v, dropout_p, is_causal):
    """What torch's CUDA flash kernel takes: [B, H, L, D] in half precision, as many KV heads as
    query heads."""
    assert q.dim() == 4 and q.shape[1] == k.shape[1] == v.shape[1] and dropout_p == 0.0
    assert q.dtype in (torch.float16, torch.bfloat16)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.float(), k.float(), v.float(), 0.0, is_causal
    )[:2]
    return out.to(q.dtype), lse


CUDA_FLASH = torch.ops.aten._scaled_dot_product_flash_attention if DEVICE == "cuda" else cuda_flash_stand_in


@pytest.mark.parametrize("causal, lq, lk", [(True, 40, 40), (False, 3, 500), (False, 1, 70)])
def test_gpu_attention_folds_or_repeats_heads_for_torchs_cuda_flash_kernel(causal, lq, lk):
    torch.manual_seed(lk)
    q = torch.randn(8, lq, 64).bfloat16()
    k, v = torch.randn(2, 2, lk, 64).bfloat16()
    out, lse = (
        t.cpu() for t in torch_flash(CUDA_FLASH, q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), causal, maps_heads=False)
    )
    reference, reference_lse = math_attention(q.float(), k.float(), v.float(), causal)
    torch.testing.assert_close(lse, reference_lse, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.float(), reference, atol=4e-3, rtol=8e-3)
