"""The CPU kernels (kernels/): few-row GEMMs, element-wise steps, decode and prefill attention
against fp32 references, and what each leaves to torch or the flash kernel."""

from __future__ import annotations

import pytest
import torch

from mnemosyne_hpc.kernels import decode, pointwise, prefill, skinny
from mnemosyne_hpc.kernels import gemv as gemv_kernel
from mnemosyne_hpc.kernels.build import load
from mnemosyne_hpc.kernels.decode import MAX_ROWS, decode_attention
from mnemosyne_hpc.kernels.pointwise import rms_norm, silu_mul
from mnemosyne_hpc.kernels.prefill import prefill_attention
from mnemosyne_hpc.model.attention import math_attention
from mnemosyne_hpc.model.backend import select_backend
from mnemosyne_hpc.model.layers import RMSNorm, rope_tables

BF16 = select_backend(torch.bfloat16, "cpu")  # what a bf16 model on this CPU computes with


GEMV_SHAPES = [(1, 96, 64), (1, 37, 70), (1, 5, 7), (1, 1100, 2816), (3, 37, 70), (8, 1100, 576)]
SKINNY_SHAPES = [(2, 96, 64), (17, 37, 96), (64, 1100, 2816)]  # rows, out_features, in_features


@pytest.mark.parametrize(
    "kernel_name, rows, out_features, in_features",
    [("gemv", *shape) for shape in GEMV_SHAPES] + [("skinny", *shape) for shape in SKINNY_SHAPES],
)
def test_few_row_linear_kernels_round_the_fp32_sum_once(kernel_name, rows, out_features, in_features):
    module = {"gemv": gemv_kernel, "skinny": skinny}[kernel_name]
    kernel = gemv_kernel.gemv if module is gemv_kernel else skinny.skinny_linear
    if module._library() is None:
        pytest.skip(
            f"no C compiler, AVX512-BF16 or AMX here for {kernel_name}: torch's matrix products serve decode steps"
        )
    torch.manual_seed(rows * out_features)
    x = torch.randn(rows, in_features + 32).bfloat16()[:, :in_features]  # rows apart by more than their length
    weight = torch.randn(out_features, in_features).bfloat16()
    y, exact = kernel(x, weight), x.double() @ weight.double().T
    torch.testing.assert_close(y.double(), exact, atol=1e-4, rtol=2**-8)  # within half a bf16 step
    assert (y == exact.bfloat16()).float().mean() > 0.99  # the exact sum, rounded, but where fp32 sums tip a tie
    if kernel_name == "skinny" or rows == 1 or skinny._library() is None:
        torch.testing.assert_close(BF16.linear(x, weight), y, atol=0, rtol=0)  # a decode step's linear uses it


def test_gemv_leaves_many_rows_to_others():
    weight = torch.randn(16, 64).bfloat16()
    assert gemv_kernel.gemv(torch.randn(gemv_kernel.MAX_ROWS + 1, 64).bfloat16(), weight) is None


def test_skinny_kernel_leaves_many_rows_and_odd_widths_to_torch():
    weight = torch.randn(16, 64).bfloat16()
    assert skinny.skinny_linear(torch.randn(skinny.MAX_ROWS + 1, 64).bfloat16(), weight) is None
    assert skinny.skinny_linear(torch.randn(4, 48).bfloat16(), torch.randn(16, 48).bfloat16()) is None


def torch_rms_norm(x, weight, eps):
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def test_pointwise_kernels_round_where_the_torch_ops_do():
    """bf16 on CPU: the rotary embedding is bit for bit the torch ops'. RMSNorm may differ in the
    order of its fp32 sum of squares, so by a rounding step, rarely; SiLU in its exp, so its bf16
    value may round a step the other way, which the product with `up` carries (rtol 2⁻⁶)."""
    if pointwise._library() is None:
        pytest.skip("no C compiler here: torch ops compute the element-wise steps")
    torch.manual_seed(5)
    qkv = torch.randn(37, 7 * 64, dtype=torch.bfloat16) * 3  # 5 rotated heads of 64, then 2 of values
    cos, sin = rope_tables(torch.randn(37, 32) * 100, torch.bfloat16)
    heads = qkv[:, : 5 * 64].view(37, 5, 64)
    expected = torch.addcmul(heads * cos[:, None], heads.roll(32, dims=-1), sin[:, None])
    values = qkv[:, 5 * 64 :].clone()
    BF16.rope_(heads, cos, sin)
    assert torch.equal(heads, expected) and torch.equal(qkv[:, 5 * 64 :], values)

    x, residual = torch.randn(37, 512, dtype=torch.bfloat16) * 3, torch.randn(37, 512, dtype=torch.bfloat16)
    weight = (torch.randn(512) * 0.1 + 1).bfloat16()
    total = x + residual
    normed = rms_norm(x, weight, 1e-5, residual)
    assert torch.equal(x, total)  # the residual was added in place, rounded as torch's add
    expected = torch_rms_norm(total, weight, 1e-5)
    torch.testing.assert_close(normed, expected, atol=0, rtol=2**-7)
    assert (normed != expected).float().mean() < 1e-3

    gate_up = torch.randn(37, 2 * 700, dtype=torch.bfloat16) * 4
    gate, up = gate_up.split(700, dim=-1)
    product, expected = silu_mul(gate_up), torch.nn.functional.silu(gate) * up
    torch.testing.assert_close(product, expected, atol=0, rtol=2**-6)
    assert (product != expected).float().mean() < 5e-3


def test_rms_norm_module_falls_back_to_torch_ops_outside_bf16():
    norm = RMSNorm(64, 1e-6, select_backend(torch.float32, "cpu"))
    norm.weight.data = torch.randn(64)
    x, residual = torch.randn(5, 64), torch.randn(5, 64)
    assert rms_norm(x, norm.weight, 1e-6) is None and silu_mul(torch.randn(5, 128)) is None
    total = x + residual
    torch.testing.assert_close(norm(x, residual), torch_rms_norm(total, norm.weight, 1e-6))
    assert torch.equal(x, total)


@pytest.mark.parametrize("amx", [True, False], ids=["amx", "avx512"])
@pytest.mark.parametrize(
    "hkv, group, lq, d, n",
    [
        (2, 4, 1, 64, 1000),
        (1, 1, 1, 128, 37),
        (4, 2, 8, 64, 40_001),
        (2, 1, 16, 128, 300),
        (3, 5, 1, 64, 16),
        (2, 3, 1, 64, 45),
    ],
)
def test_decode_kernel_matches_fp32_attention_over_cache_views(hkv, group, lq, d, n, amx, monkeypatch):
    if (library := load(decode.SOURCE, decode.FUNCTIONS, amx=amx)) is None:
        pytest.skip(f"no C compiler or no {'AMX' if amx else 'AVX512-BF16'} here: the decode kernel does without")
    monkeypatch.setattr(decode, "_library", lambda: library)
    torch.manual_seed(n)
    k_cache, v_cache = torch.randn(2, hkv, n + 48, d).bfloat16()
    k, v = k_cache[:, 16 : 16 + n], v_cache[:, 16 : 16 + n]  # views into a larger pool, as the model passes them
    q = torch.randn(hkv * group, lq, d).bfloat16()
    out, lse = decode_attention(q, k, v)
    reference, reference_lse = math_attention(q.float(), k.float(), v.float(), causal=False)
    torch.testing.assert_close(lse, reference_lse, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.float(), reference, atol=4e-3, rtol=8e-3)  # out is rounded to bf16


def test_decode_kernel_leaves_long_queries_and_fp32_to_the_flash_kernel():
    q, kv = torch.randn(2, MAX_ROWS // 2 + 1, 64).bfloat16(), torch.randn(1, 100, 64).bfloat16()
    assert decode_attention(q, kv, kv) is None
    assert decode_attention(q[:, :1].float(), kv.float(), kv.float()) is None


@pytest.mark.parametrize(
    "hkv, group, lq, lk, d, causal",
    [
        (2, 4, 40, 40, 64, True),
        (1, 3, 37, 1000, 64, True),
        (2, 2, 300, 300, 128, True),
        (4, 1, 33, 70, 64, False),
        (1, 2, 17, 1, 64, False),
        (2, 1, 64, 129, 128, False),
    ],
)
def test_prefill_kernel_matches_fp32_attention_over_strided_views(hkv, group, lq, lk, d, causal):
    if prefill._library() is None:
        pytest.skip("no C compiler or no AMX here: the flash kernel serves prefill")
    torch.manual_seed(lq + lk)
    hq = hkv * group
    # laid out as the model's projections and KV pool lay them out: [tokens, heads, D] seen as [heads, tokens, D]
    q_full = torch.randn(lk, hq + 1, d).bfloat16().transpose(0, 1)[:hq]
    k, v = (torch.randn(lk + 50, hkv, d).bfloat16().transpose(0, 1)[:, 25 : 25 + lk] for _ in range(2))
    out, lse = prefill_attention(q_full[:, lk - lq :], k, v, causal)
    # causal: query i is the token at position lk − lq + i of a length-lk sequence
    reference, reference_lse = math_attention(q_full.float(), k.float(), v.float(), causal)
    torch.testing.assert_close(lse, reference_lse[:, lk - lq :], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.float(), reference[:, lk - lq :], atol=4e-3, rtol=8e-3)  # bf16 weights and out


def test_prefill_kernel_leaves_fp32_and_other_head_sizes_to_the_flash_kernel():
    q, kv = torch.randn(2, 40, 64), torch.randn(1, 40, 64)
    assert prefill_attention(q, kv, kv, causal=True) is None
    q, kv = torch.randn(2, 40, 80).bfloat16(), torch.randn(1, 40, 80).bfloat16()
    assert prefill_attention(q, kv, kv, causal=True) is None
