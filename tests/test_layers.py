"""The model's layers on the CPU backend (model/layers.py, model/backend.py): linear for any row count,
rotary embedding as Hugging Face's."""

from __future__ import annotations

import pytest
import torch

from mnemosyne_hpc.model.backend import FEW_ROWS, select_backend
from mnemosyne_hpc.model.layers import rope_tables

CPU = select_backend(torch.float32, "cpu")


@pytest.mark.parametrize("rows", [1, 5, FEW_ROWS - 1, FEW_ROWS])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_is_x_times_w_transposed_for_any_row_count(rows, with_bias):
    torch.manual_seed(rows)
    x, weight, bias = torch.randn(rows, 64), torch.randn(96, 64), torch.randn(96) if with_bias else None
    y = CPU.linear(x, weight, bias)
    assert y.shape == (rows, 96) and y.is_contiguous()
    torch.testing.assert_close(y, torch.nn.functional.linear(x, weight, bias), atol=1e-4, rtol=1e-5)


def test_rope_is_hugging_face_rotate_half():
    torch.manual_seed(2)
    x, angles = torch.randn(7, 3, 16), torch.randn(7, 8)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    rotate_half = torch.cat((-x[..., 8:], x[..., :8]), dim=-1)
    torch.testing.assert_close(
        CPU.rope_(x.clone(), *rope_tables(angles, torch.float32)),
        x * cos[:, None] + rotate_half * sin[:, None],
        atol=1e-6,
        rtol=0,
    )
