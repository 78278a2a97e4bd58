"""Small pieces on their own: rank discovery, the LSE merge, sampling filters, the block pool."""
from __future__ import annotations

import pytest
import torch

from mnemosyne_hpc.distributed.launch import discover_rank
from mnemosyne_hpc.engine.kv_cache import BlockAllocator, KVCache
from mnemosyne_hpc.engine.request import SamplingParams
from mnemosyne_hpc.engine.sampler import _filter, sample
from mnemosyne_hpc.cpu_allocator import retain_freed_memory
from mnemosyne_hpc.kernels import decode, pointwise, prefill
from mnemosyne_hpc.kernels import gemv as gemv_kernel
from mnemosyne_hpc.kernels import skinny
from mnemosyne_hpc.kernels.build import load
from mnemosyne_hpc.kernels.decode import MAX_ROWS, decode_attention
from mnemosyne_hpc.kernels.prefill import prefill_attention
from mnemosyne_hpc.model.attention import (KEYS_PER_CALL, DecodeBatch, attention, chunk_attention,
                                           decode_batch_attention, math_attention, merge_attention)
from mnemosyne_hpc.kernels.pointwise import rms_norm, silu_mul
from mnemosyne_hpc.model.layers import FEW_ROWS, RMSNorm, apply_rope_, linear, rope_tables


@pytest.mark.parametrize("env, expected", [
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
      "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"}, ("openmpi", 3, 4, 1)),
    ({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "SLURM_PROCID": "0",
      "SLURM_STEP_NUM_TASKS": "1"}, ("mpich", 1, 2, 1)),
    ({"SLURM_PROCID": "2", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "0", "RANK": "9", "WORLD_SIZE": "10"},
     ("slurm", 2, 4, 0)),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}, ("single", 0, 1, 0)),  # sbatch script outside a step
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, ("torchrun", 1, 2, 1)),
    ({}, ("single", 0, 1, 0)),
])
def test_rank_discovery_precedence(env, expected):
    info = discover_rank(env)
    assert (info.launcher, info.rank, info.world_size, info.local_rank) == expected


def test_merge_of_key_splits_equals_attention_over_all_keys():
    torch.manual_seed(0)
    q, k, v = torch.randn(6, 5, 16), torch.randn(2, 40, 16), torch.randn(2, 40, 16)
    full, full_lse = attention(q, k, v, causal=False)
    parts = [attention(q, k[:, a:b], v[:, a:b], causal=False) for a, b in [(0, 7), (7, 30), (30, 40)]]
    out, lse = merge_attention([p[0] for p in parts], [p[1] for p in parts])
    torch.testing.assert_close(out, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse, full_lse, atol=1e-5, rtol=0)


def test_cpu_kernel_matches_math_path_and_chunk_is_bottom_right_causal():
    torch.manual_seed(1)
    q, k, v = torch.randn(4, 9, 8), torch.randn(2, 9, 8), torch.randn(2, 9, 8)
    for causal in (False, True):
        torch.testing.assert_close(attention(q, k, v, causal), math_attention(q, k, v, causal), atol=1e-5, rtol=0)
    # the last 3 queries of a 9-token causal attention == a 3-token chunk over a 6-token prefix
    full, _ = math_attention(q, k, v, causal=True)
    chunk, _ = chunk_attention(q[:, 6:], k[:, 6:], v[:, 6:], k[:, :6], v[:, :6])
    torch.testing.assert_close(chunk, full[:, 6:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keys_beyond_one_call_are_attended_in_pieces_merged_exactly(dtype):
    torch.manual_seed(3)
    lk = KEYS_PER_CALL + 1000  # two pieces
    q, k, v = torch.randn(4, 20, 64), torch.randn(2, lk, 64), torch.randn(2, lk, 64)
    out, lse = attention(q.to(dtype), k.to(dtype), v.to(dtype), causal=False)
    expected_out, expected_lse = math_attention(q.to(dtype).float(), k.to(dtype).float(), v.to(dtype).float(), False)
    torch.testing.assert_close(lse, expected_lse, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.float(), expected_out, atol=4e-3 if dtype == torch.bfloat16 else 1e-5, rtol=0)


@pytest.mark.parametrize("rows", [1, 5, FEW_ROWS - 1, FEW_ROWS])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_is_x_times_w_transposed_for_any_row_count(rows, with_bias):
    torch.manual_seed(rows)
    x, weight, bias = torch.randn(rows, 64), torch.randn(96, 64), torch.randn(96) if with_bias else None
    y = linear(x, weight, bias)
    assert y.shape == (rows, 96) and y.is_contiguous()
    torch.testing.assert_close(y, torch.nn.functional.linear(x, weight, bias), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("rows, out_features, in_features", [(1, 96, 64), (1, 37, 70), (1, 5, 7), (1, 1100, 2816),
                                                           (2, 96, 64), (17, 37, 96), (64, 1100, 2816)])
def test_few_row_linear_kernels_round_the_fp32_sum_once(rows, out_features, in_features):
    kernel = gemv_kernel.gemv if rows == 1 else skinny.skinny_linear
    if (gemv_kernel if rows == 1 else skinny)._library() is None:
        pytest.skip("no C compiler, AVX512-BF16 or AMX here: torch's matrix products serve decode steps")
    torch.manual_seed(rows * out_features)
    x = torch.randn(rows, in_features + 32).bfloat16()[:, :in_features]  # rows apart by more than their length
    weight = torch.randn(out_features, in_features).bfloat16()
    y, exact = kernel(x, weight), x.double() @ weight.double().T
    torch.testing.assert_close(y.double(), exact, atol=1e-4, rtol=2**-8)  # within half a bf16 step
    assert (y == exact.bfloat16()).float().mean() > 0.99  # the exact sum, rounded, but where fp32 sums tip a tie
    torch.testing.assert_close(linear(x, weight), y, atol=0, rtol=0)  # a decode step's linear uses it


def test_skinny_kernel_leaves_many_rows_and_odd_widths_to_torch():
    weight = torch.randn(16, 64).bfloat16()
    assert skinny.skinny_linear(torch.randn(skinny.MAX_ROWS + 1, 64).bfloat16(), weight) is None
    assert skinny.skinny_linear(torch.randn(4, 48).bfloat16(), torch.randn(16, 48).bfloat16()) is None


def test_rope_is_hugging_face_rotate_half():
    torch.manual_seed(2)
    x, angles = torch.randn(7, 3, 16), torch.randn(7, 8)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    rotate_half = torch.cat((-x[..., 8:], x[..., :8]), dim=-1)
    torch.testing.assert_close(apply_rope_(x.clone(), *rope_tables(angles, torch.float32)),
                               x * cos[:, None] + rotate_half * sin[:, None],
                               atol=1e-6, rtol=0)


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
    heads = qkv[:, :5 * 64].view(37, 5, 64)
    expected = torch.addcmul(heads * cos[:, None], heads.roll(32, dims=-1), sin[:, None])
    values = qkv[:, 5 * 64:].clone()
    apply_rope_(heads, cos, sin)
    assert torch.equal(heads, expected) and torch.equal(qkv[:, 5 * 64:], values)

    x, residual = torch.randn(37, 512, dtype=torch.bfloat16) * 3, torch.randn(37, 512, dtype=torch.bfloat16)
    weight = (torch.randn(512) * 0.1 + 1).bfloat16()
    total = x + residual
    normed = rms_norm(x, weight, 1e-5, residual)
    assert torch.equal(x, total)  # the residual was added in place, rounded as torch's add
    expected = torch_rms_norm(total, weight, 1e-5)
    torch.testing.assert_close(normed, expected, atol=0, rtol=2 ** -7)
    assert (normed != expected).float().mean() < 1e-3

    gate_up = torch.randn(37, 2 * 700, dtype=torch.bfloat16) * 4
    gate, up = gate_up.split(700, dim=-1)
    product, expected = silu_mul(gate_up), torch.nn.functional.silu(gate) * up
    torch.testing.assert_close(product, expected, atol=0, rtol=2 ** -6)
    assert (product != expected).float().mean() < 5e-3


def test_rms_norm_module_falls_back_to_torch_ops_outside_bf16():
    norm = RMSNorm(64, 1e-6)
    norm.weight.data = torch.randn(64)
    x, residual = torch.randn(5, 64), torch.randn(5, 64)
    assert rms_norm(x, norm.weight, 1e-6) is None and silu_mul(torch.randn(5, 128)) is None
    total = x + residual
    torch.testing.assert_close(norm(x, residual), torch_rms_norm(total, norm.weight, 1e-6))
    assert torch.equal(x, total)


def test_freed_cpu_memory_is_kept_by_glibc():
    assert retain_freed_memory()  # this machine's C library is glibc: the thresholds were raised


@pytest.mark.parametrize("amx", [True, False], ids=["amx", "avx512"])
@pytest.mark.parametrize("hkv, group, lq, d, n", [(2, 4, 1, 64, 1000), (1, 1, 1, 128, 37), (4, 2, 8, 64, 40_001),
                                                 (2, 1, 16, 128, 300), (3, 5, 1, 64, 16), (2, 3, 1, 64, 45)])
def test_decode_kernel_matches_fp32_attention_over_cache_views(hkv, group, lq, d, n, amx, monkeypatch):
    if (library := load(decode.SOURCE, decode.FUNCTIONS, amx=amx)) is None:
        pytest.skip(f"no C compiler or no {'AMX' if amx else 'AVX512-BF16'} here: the decode kernel does without")
    monkeypatch.setattr(decode, "_library", lambda: library)
    torch.manual_seed(n)
    k_cache, v_cache = torch.randn(2, hkv, n + 48, d).bfloat16()
    k, v = k_cache[:, 16:16 + n], v_cache[:, 16:16 + n]  # views into a larger pool, as the model passes them
    q = torch.randn(hkv * group, lq, d).bfloat16()
    out, lse = decode_attention(q, k, v)
    reference, reference_lse = math_attention(q.float(), k.float(), v.float(), causal=False)
    torch.testing.assert_close(lse, reference_lse, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.float(), reference, atol=4e-3, rtol=8e-3)  # out is rounded to bf16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_batch_of_decode_tokens_attends_each_to_its_own_runs_of_slots(dtype):
    torch.manual_seed(3)
    k_cache, v_cache = torch.randn(2, 2, 9000, 64).to(dtype)
    q = torch.randn(6, 8, 64).to(dtype)  # 6 tokens of 8 query heads over 2 KV heads; 4 of them decode
    rows = [5, 0, 3, 2]
    runs = [[(0, 4000)], [(5000, 2999), (100, 1000), (8990, 9)], [(300, 17)], [(8999, 1), (7, 1)]]
    out, lse = torch.full_like(q, 7.0), torch.full(q.shape[:2], 7.0)
    decode_batch_attention(q, k_cache, v_cache, DecodeBatch.of(rows, runs, "cpu"), out, lse)
    assert_each_row_attended_to_its_runs(q, k_cache, v_cache, rows, runs, out, lse, atol=4e-3, rtol=8e-3)
    assert (out[[1, 4]] == 7).all() and (lse[[1, 4]] == 7).all()  # rows of other sequences untouched


def assert_each_row_attended_to_its_runs(q, k_cache, v_cache, rows, runs, out, lse, atol, rtol):
    """out[row], lse[row] against fp32 math attention of q[row] over the gathered slots of its runs."""
    for row, seq_runs in zip(rows, runs):
        slots = torch.cat([torch.arange(start, start + n) for start, n in seq_runs])
        reference, reference_lse = math_attention(q[row][:, None].float(), k_cache[:, slots].float(),
                                                  v_cache[:, slots].float(), causal=False)
        torch.testing.assert_close(lse[row], reference_lse[:, 0], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(out[row].float(), reference[:, 0], atol=atol, rtol=rtol)


def test_decode_kernel_leaves_long_queries_and_fp32_to_the_flash_kernel():
    q, kv = torch.randn(2, MAX_ROWS // 2 + 1, 64).bfloat16(), torch.randn(1, 100, 64).bfloat16()
    assert decode_attention(q, kv, kv) is None
    assert decode_attention(q[:, :1].float(), kv.float(), kv.float()) is None


@pytest.mark.parametrize("hkv, group, lq, lk, d, causal", [(2, 4, 40, 40, 64, True), (1, 3, 37, 1000, 64, True),
                                                         (2, 2, 300, 300, 128, True), (4, 1, 33, 70, 64, False),
                                                         (1, 2, 17, 1, 64, False), (2, 1, 64, 129, 128, False)])
def test_prefill_kernel_matches_fp32_attention_over_strided_views(hkv, group, lq, lk, d, causal):
    if prefill._library() is None:
        pytest.skip("no C compiler or no AMX here: the flash kernel serves prefill")
    torch.manual_seed(lq + lk)
    hq = hkv * group
    # laid out as the model's projections and KV pool lay them out: [tokens, heads, D] seen as [heads, tokens, D]
    q_full = torch.randn(lk, hq + 1, d).bfloat16().transpose(0, 1)[:hq]
    k, v = (torch.randn(lk + 50, hkv, d).bfloat16().transpose(0, 1)[:, 25:25 + lk] for _ in range(2))
    out, lse = prefill_attention(q_full[:, lk - lq:], k, v, causal)
    # causal: query i is the token at position lk − lq + i of a length-lk sequence
    reference, reference_lse = math_attention(q_full.float(), k.float(), v.float(), causal)
    torch.testing.assert_close(lse, reference_lse[:, lk - lq:], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.float(), reference[:, lk - lq:], atol=4e-3, rtol=8e-3)  # bf16 weights and out


def test_prefill_kernel_leaves_fp32_and_other_head_sizes_to_the_flash_kernel():
    q, kv = torch.randn(2, 40, 64), torch.randn(1, 40, 64)
    assert prefill_attention(q, kv, kv, causal=True) is None
    q, kv = torch.randn(2, 40, 80).bfloat16(), torch.randn(1, 40, 80).bfloat16()
    assert prefill_attention(q, kv, kv, causal=True) is None


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.isfinite(_filter(logits, top_k=2, top_p=1.0)).tolist() == [True, True, False, False]
    assert torch.isfinite(_filter(logits, top_k=0, top_p=0.7)).tolist() == [True, True, False, False]
    assert torch.isfinite(_filter(logits, top_k=0, top_p=0.5)).tolist() == [True, False, False, False]


def test_seeded_sampling_depends_only_on_seed_and_position_and_greedy_is_argmax():
    logits = torch.randn(1, 1000)

    def draw(seed):
        return [sample(logits, [SamplingParams(temperature=1.0, seed=seed)], [position])[0] for position in range(10)]

    first = draw(5)
    assert first == draw(5) and len(set(first)) > 1  # same seed, same stream; the stream does vary
    assert draw(6) != first
    assert sample(logits, [SamplingParams()], [3]) == [int(logits.argmax())]


def test_block_pool_reserves_and_frees():
    pool = BlockAllocator(num_blocks=4, block_size=16)
    a = pool.reserve(33)  # 3 blocks
    assert len(a) == 3 and pool.num_free == 1 and not pool.can_reserve(17)
    with pytest.raises(MemoryError):
        pool.reserve(40)
    pool.free(a)
    assert pool.num_free == 4 and pool.can_reserve(64)


def test_block_pool_hands_out_consecutive_blocks_where_it_can():
    pool = BlockAllocator(num_blocks=12, block_size=16)
    a, b, c = pool.reserve(32), pool.reserve(16), pool.reserve(48)  # [0, 1], [2], [3, 4, 5]
    pool.free(a)
    pool.free(c)  # free: 0, 1, 3, 4, 5, 6 … 11
    assert pool.reserve(64) == [3, 4, 5, 6]  # the first run long enough, not the lowest blocks
    assert pool.reserve(16, after=6) == [7]  # growth continues right after the sequence's last block
    assert pool.reserve(16, after=2) == [0]  # block 3 is taken: the first free one
    assert pool.reserve(80) == [1, 8, 9, 10, 11]  # no run of 5 is left: the lowest free blocks
    assert pool.num_free == 0 and b == [2]


def test_slots_follow_the_block_table():
    cache = KVCache(1, 1, 4, num_blocks=8, block_size=4, dtype=torch.float32, device=torch.device("cpu"))
    assert cache.slots([5, 2], 2, 7).tolist() == [22, 23, 8, 9, 10]
    assert cache.slots([5, 2, 7], 6, 10).tolist() == [10, 11, 28, 29]  # starting in a later block


def test_consecutive_blocks_give_a_slice():
    cache = KVCache(1, 1, 4, num_blocks=8, block_size=4, dtype=torch.float32, device=torch.device("cpu"))
    assert cache.index([2, 3, 4], 1, 10) == slice(9, 18)
    assert cache.index([7, 2, 3, 4], 5, 10) == slice(9, 14)
    assert cache.index([5, 2], 2, 7).tolist() == [22, 23, 8, 9, 10]
    for table, start, end in [([2, 3, 4], 1, 10), ([7, 2, 3, 4], 5, 10), ([6, 7], 0, 8)]:
        assert list(range(8 * 4))[cache.index(table, start, end)] == cache.slots(table, start, end).tolist()


def test_runs_of_consecutive_blocks_cover_the_slots_in_order():
    cache = KVCache(1, 1, 4, num_blocks=8, block_size=4, dtype=torch.float32, device=torch.device("cpu"))
    assert cache.runs([2, 3, 4], 1, 10) == [(9, 9)]
    assert cache.runs([1, 2, 6, 0, 1], 3, 18) == [(7, 5), (24, 4), (0, 6)]
    for table, start, end in [([5, 2], 2, 7), ([1, 2, 6, 0, 1], 3, 18), ([7, 2, 3, 4], 5, 10), ([3, 1], 4, 5)]:
        slots = [slot for first, n in cache.runs(table, start, end) for slot in range(first, first + n)]
        assert slots == cache.slots(table, start, end).tolist()

