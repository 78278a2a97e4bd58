"""fp32 math attention as the reference that the attention paths are held to."""

from __future__ import annotations

import torch

from mnemosyne_hpc.model.attention import math_attention


def assert_each_row_attended_to_its_runs(q, k_cache, v_cache, rows, runs, out, lse, atol, rtol):
    """out[row], lse[row] against fp32 math attention of q[row] over the gathered slots of its runs."""
    for row, seq_runs in zip(rows, runs):
        slots = torch.cat([torch.arange(start, start + n) for start, n in seq_runs])
        reference, reference_lse = math_attention(
            q[row][:, None].float(), k_cache[:, slots].float(), v_cache[:, slots].float(), causal=False
        )
        torch.testing.assert_close(lse[row], reference_lse[:, 0], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(out[row].float(), reference[:, 0], atol=atol, rtol=rtol)
