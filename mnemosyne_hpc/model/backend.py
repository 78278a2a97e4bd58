"""The compute backend: the one object that decides how this rank computes linear layers, the
element-wise steps and attention, chosen once when the runner starts (`select_backend`).

Every backend computes the same sums and rounds where torch's ops do; they differ only in the kernel
that runs them. `TorchBackend` is the portable reference; the others replace what their device does
better, and fall back to it only for shapes their kernels do not take (a head size, a row count).
The model's modules take a backend when they are built and never look at the device themselves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mnemosyne_hpc.kernels import decode, gemv, pointwise, prefill, skinny, triton_decode
from mnemosyne_hpc.model.attention import DecodeBatch, math_attention, merge_attention

try:  # GPU kernel; torch's own flash kernel serves GPUs without it
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None

# Below this many rows (decode steps), CPU GEMM kernels stream the weight at close to memory
# bandwidth as W·xᵀ, but not as x·Wᵀ (measured: 27 against 21 GB/s at 16 rows; even at 256 rows).
FEW_ROWS = 256
# Longer unmasked key ranges go to the CPU's attention kernels in pieces merged by LSE: a piece's keys
# and values stay in cache while every query block reads them (a 1M-token prefix in one call ran at 60%).
KEYS_PER_CALL = 1 << 16
# A decode token whose cached K/V lie in several runs (its blocks are not all consecutive) is one attention
# call over a copy of its runs while the copy is this small: another call and a merge per run cost more
# (float32, 4 query heads over one KV head of 64, 1,000 keys in two runs: +92 µs a token a layer with a call
# per run, +29 µs copied into one).
GATHER_BYTES = 1 << 20

Attended = tuple[torch.Tensor, torch.Tensor]  # out [Hq, Lq, D], lse [Hq, Lq] (float32)


class TorchBackend:
    """Plain torch ops and float32 matmul attention: any device, any dtype."""

    name = "torch"

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x·Wᵀ + b."""
        return F.linear(x, weight, bias)

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """weight · (x / rms(x)) rounded to x's dtype before the product; with `residual`, first
        x += residual in place (the layer's running sum)."""
        if residual is not None:
            x.add_(residual)
        xf = x.float()
        return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) · up for rows gate_up [T, 2I] = [gate | up]."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)

    def rope_(self, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """x [T, H, D] rotated in place as Hugging Face Llama does (half split): x·cos + rotate_half(x)·sin,
        where rotate_half(x) = (−x₂, x₁) = roll(x, D/2)·(−1, +1); `signed_sin` carries that sign
        (`layers.rope_tables`)."""
        return x.copy_(torch.addcmul(x * cos[:, None], x.roll(x.shape[-1] // 2, dims=-1), signed_sin[:, None]))

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> Attended:
        """Softmax attention of q [Hq, Lq, D] over k, v [Hkv, Lk, D] (GQA: Hq = g·Hkv); `causal` lets
        query i see keys up to i + Lk − Lq."""
        return math_attention(q, k, v, causal)

    def chunk_attention(self, q, k_chunk, v_chunk, k_prefix, v_prefix) -> Attended:
        """A prefill chunk: causal attention within it, merged with unmasked attention to its cached prefix."""
        self_out, self_lse = self.attention(q, k_chunk, v_chunk, causal=True)
        if k_prefix is None or k_prefix.shape[1] == 0:
            return self_out, self_lse
        prefix_out, prefix_lse = self.attention(q, k_prefix, v_prefix, causal=False)
        return merge_attention([prefix_out, self_out], [prefix_lse, self_lse])

    def decode_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        decodes: DecodeBatch,
        out: torch.Tensor,
        lse: torch.Tensor,
    ) -> None:
        """Token-major q [T, Hq, D]: each row of `decodes` attends, unmasked, to its runs of cached keys and
        values in k_cache, v_cache [Hkv, slots, D]; written to out [T, Hq, D] and lse [T, Hq] at those
        rows. Here each token is one call: over a copy of its runs where that copy is at most `GATHER_BYTES`,
        else over each run in place, the calls merged."""
        bytes_per_key = 2 * k_cache.shape[0] * k_cache.shape[2] * k_cache.element_size()
        for i, row in enumerate(decodes.rows.tolist()):
            runs = decodes.runs_of(i)
            if len(runs) > 1 and sum(r.stop - r.start for r in runs) * bytes_per_key <= GATHER_BYTES:
                kv = [(torch.cat([k_cache[:, r] for r in runs], 1), torch.cat([v_cache[:, r] for r in runs], 1))]
            else:
                kv = [(k_cache[:, r], v_cache[:, r]) for r in runs]
            pieces = [self.attention(q[row][:, None], k, v, causal=False) for k, v in kv]
            row_out, row_lse = merge_attention([piece[0] for piece in pieces], [piece[1] for piece in pieces])
            out[row], lse[row] = row_out[:, 0], row_lse[:, 0]


def torch_flash(kernel, q, k, v, causal: bool, maps_heads: bool) -> Attended:
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


def by_kv_head(q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, kv_heads: int):
    """q, out [T, Hq, D] and lse [T, Hq] viewed as [T, Hkv, g, D] and [T, Hkv, g]: the decode kernels'
    layout, a KV head's g query heads side by side."""
    tokens, hq, d = q.shape
    shape = (tokens, kv_heads, hq // kv_heads, d)
    return q.view(shape), out.view(shape), lse.view(shape[:3])


class CPUBackend(TorchBackend):
    """torch on CPU: few-row linears as W·xᵀ, torch's CPU flash kernel for attention."""

    name = "cpu"

    def linear(self, x, weight, bias=None):
        if x.dim() != 2 or x.shape[0] >= FEW_ROWS:
            return F.linear(x, weight, bias)
        y = self._few_rows_linear(x, weight)
        return y if bias is None else y.add_(bias)

    def _few_rows_linear(self, x, weight):
        return torch.mm(weight, x.T).T.contiguous()

    def attention(self, q, k, v, causal):
        if not causal and k.shape[1] > KEYS_PER_CALL:
            pieces = [
                self.attention(q, k[:, i : i + KEYS_PER_CALL], v[:, i : i + KEYS_PER_CALL], False)
                for i in range(0, k.shape[1], KEYS_PER_CALL)
            ]
            return merge_attention([out for out, _ in pieces], [lse for _, lse in pieces])
        return self._attention_piece(q, k, v, causal)

    def _attention_piece(self, q, k, v, causal):
        return torch_flash(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu, q, k, v, causal, maps_heads=True)


class CPUKernelBackend(CPUBackend):
    """bf16 on CPU with this project's C kernels (`kernels/`, built for this CPU): few-row products
    (gemv; AMX GEMMs where there are tiles), one-pass element-wise steps, decode attention over the
    paged cache in one call, and AMX prefill attention. Which of them this CPU has is settled here, once."""

    name = "cpu-kernels"

    def __init__(self):
        self.has_gemv = gemv._library() is not None
        self.has_skinny = skinny._library() is not None  # AMX
        self.has_prefill = prefill._library() is not None  # AMX
        self.has_decode = decode._library() is not None  # AMX or AVX512-BF16

    @classmethod
    def available(cls) -> bool:
        return pointwise._library() is not None

    def _few_rows_linear(self, x, weight):
        y = None
        if self.has_skinny and x.shape[0] > 1:
            y = skinny.skinny_linear(x, weight)
        elif self.has_gemv:
            y = gemv.gemv(x, weight)  # one row, or a few where there is no AMX
        return super()._few_rows_linear(x, weight) if y is None else y

    def rms_norm(self, x, weight, eps, residual=None):
        out = pointwise.rms_norm(x, weight, eps, residual)
        return super().rms_norm(x, weight, eps, residual) if out is None else out

    def silu_mul(self, gate_up):
        out = pointwise.silu_mul(gate_up)
        return super().silu_mul(gate_up) if out is None else out

    def rope_(self, x, cos, signed_sin):
        return x if pointwise.rope_(x, cos, signed_sin) else super().rope_(x, cos, signed_sin)

    def attention(self, q, k, v, causal):
        if not causal and self.has_decode and (result := decode.decode_attention(q, k, v)) is not None:
            return result  # a few query rows per KV head: a decode step's
        return super().attention(q, k, v, causal)

    def _attention_piece(self, q, k, v, causal):
        if self.has_prefill and (result := prefill.prefill_attention(q, k, v, causal)) is not None:
            return result
        return super()._attention_piece(q, k, v, causal)

    def decode_attention(self, q, k_cache, v_cache, decodes, out, lse):
        grouped_q, grouped_out, grouped_lse = by_kv_head(q, out, lse, k_cache.shape[0])
        if not (
            self.has_decode
            and decode.decode_attention_into(
                grouped_q,
                k_cache,
                v_cache,
                decodes.rows,
                decodes.first_run,
                decodes.starts,
                decodes.lengths,
                decodes.total_keys,
                grouped_out,
                grouped_lse,
            )
        ):
            super().decode_attention(q, k_cache, v_cache, decodes, out, lse)


class CUDABackend(TorchBackend):
    """NVIDIA GPUs: flash-attn where installed, else torch's CUDA flash kernel (FlashAttention-2);
    decode steps in the Triton kernel that reads the paged cache in place."""

    name = "cuda"

    def attention(self, q, k, v, causal):
        half = q.dtype in (torch.float16, torch.bfloat16)
        if flash_attn_func is not None and half:
            out, lse, _ = flash_attn_func(
                q.transpose(0, 1)[None],
                k.transpose(0, 1)[None],
                v.transpose(0, 1)[None],
                causal=causal,
                return_attn_probs=True,
            )
            return out[0].transpose(0, 1), lse[0]
        if half and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256:
            # A causal call is a chunk over its own K/V, the only K/V it repeats; the cached prefix is
            # unmasked and folded.
            return torch_flash(torch.ops.aten._scaled_dot_product_flash_attention, q, k, v, causal, maps_heads=False)
        return super().attention(q, k, v, causal)

    def decode_attention(self, q, k_cache, v_cache, decodes, out, lse):
        grouped_q, grouped_out, grouped_lse = by_kv_head(q, out, lse, k_cache.shape[0])
        if not triton_decode.decode_attention_into(
            grouped_q, k_cache, v_cache, decodes.splits, grouped_out, grouped_lse
        ):
            super().decode_attention(q, k_cache, v_cache, decodes, out, lse)


def select_backend(dtype: torch.dtype, device: torch.device | str) -> TorchBackend:
    """The backend for a model in `dtype` on `device`."""
    device_type = torch.device(device).type
    if device_type == "cuda":
        return CUDABackend()
    if device_type == "cpu":
        return CPUKernelBackend() if dtype == torch.bfloat16 and CPUKernelBackend.available() else CPUBackend()
    return TorchBackend()
