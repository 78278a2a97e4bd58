"""The attention math of model/attention.py on CPU: splits of the keys merged by LSE, the chunk's
bottom-right causal mask, keys beyond one call in pieces, a batch of decodes over runs of slots."""

from __future__ import annotations

import pytest
import torch

from attention_reference import assert_each_row_attended_to_its_runs
from mnemosyne_hpc.model.attention import DecodeBatch, math_attention, merge_attention
from mnemosyne_hpc.model.backend import KEYS_PER_CALL, select_backend


def attention(q, k, v, causal):
    """What a model in q's dtype on the CPU computes."""
    return select_backend(q.dtype, q.device).attention(q, k, v, causal)


def chunk_attention(q, *kv):
    return select_backend(q.dtype, q.device).chunk_attention(q, *kv)


def decode_batch_attention(q, *args):
    select_backend(q.dtype, q.device).decode_attention(q, *args)


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
