"""Llama-family decoder (Llama 2/3, Mistral, Qwen2) over a packed batch of variable-length chunks.

A rank builds only its pipeline stage: the layers `layer_ids`, the embedding on the first
stage, the final norm and LM head on the last. Every linear is sharded over the TP group.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from mnemosyne_hpc.model.args import ModelArgs
from mnemosyne_hpc.model.attention import DecodeBatch, merge_over_group
from mnemosyne_hpc.model.backend import TorchBackend
from mnemosyne_hpc.model.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    RMSNorm,
    RowParallelLinear,
    TensorParallel,
    VocabParallelEmbedding,
    split_evenly,
)


@dataclass
class SequenceSlice:
    """One sequence's query tokens in the packed batch, and where its cached prefix lives."""

    start: int  # first row in the packed batch
    end: int
    cached_slots: torch.Tensor | slice | None  # KV-cache slots this rank's queries attend to with no mask
    # True: the queries also attend causally within the chunk, and the cached slots are its prefix.
    # False for a single token, whose own K/V is already stored (it is among the cached slots), and on a
    # KVP group that holds only earlier KV of the request (its shard is the cached slots).
    within_chunk: bool = True


@dataclass
class BatchMetadata:
    cos: torch.Tensor  # [T, head_dim] rotary tables at each token's position (see rope_tables)
    signed_sin: torch.Tensor
    write_slots: torch.Tensor  # KV-cache slot of each row in write_rows
    sequences: list[SequenceSlice]  # every query row not in `decodes`
    decodes: DecodeBatch | None = None
    write_rows: torch.Tensor | None = None  # rows whose K/V this rank stores; None: all of them
    # (KVP group range, rows): partial attentions of these rows merged over the groups of that range
    merges: list[tuple[object, torch.Tensor]] = field(default_factory=list)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, tp: TensorParallel, backend: TorchBackend):
        super().__init__()
        self.backend = backend
        self.num_heads = split_evenly(args.num_heads, tp, "num_attention_heads")
        self.num_kv_heads = split_evenly(args.num_kv_heads, tp, "num_key_value_heads")
        self.head_dim = args.head_dim
        local_qkv = (self.num_heads + 2 * self.num_kv_heads) * args.head_dim
        self.qkv_proj = ColumnParallelLinear(args.hidden_size, local_qkv, args.qkv_bias, backend)
        self.o_proj = RowParallelLinear(self.num_heads * args.head_dim, args.hidden_size, tp, backend)

    def project(self, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor):
        """Queries [T, Hq, D], keys and values [T, Hkv, D] (views of one projection), RoPE applied to
        queries and keys."""
        tokens, d = x.shape[0], self.head_dim
        qkv = self.qkv_proj(x)
        rotated = self.num_heads + self.num_kv_heads
        qk = self.backend.rope_(qkv[:, : rotated * d].view(tokens, rotated, d), cos, signed_sin)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        return q, k, qkv[:, rotated * d :].view(tokens, self.num_kv_heads, d)

    def forward(self, x, meta: BatchMetadata, k_cache: torch.Tensor, v_cache: torch.Tensor):
        q, k, v = self.project(x, meta.cos, meta.signed_sin)
        for cache, new in (k_cache, k), (v_cache, v):
            written = new if meta.write_rows is None else new[meta.write_rows]
            cache.index_copy_(1, meta.write_slots, written.transpose(0, 1))
        # Token-major results: the decode kernel writes its rows in place, and out is o_proj's input.
        out = q.new_empty(q.shape)  # dense, unlike q (a view of the projection)
        lse = q.new_empty(q.shape[:2], dtype=torch.float32)
        if meta.decodes is not None:
            self.backend.decode_attention(q, k_cache, v_cache, meta.decodes, out, lse)
        for seq in meta.sequences:
            rows, slots = slice(seq.start, seq.end), seq.cached_slots
            q_seq, k_seq, v_seq = (t[rows].transpose(0, 1) for t in (q, k, v))  # [H, L, D]
            k_cached, v_cached = (None, None) if slots is None else (k_cache[:, slots], v_cache[:, slots])
            if seq.within_chunk:
                seq_out, seq_lse = self.backend.chunk_attention(q_seq, k_seq, v_seq, k_cached, v_cached)
            else:
                seq_out, seq_lse = self.backend.attention(q_seq, k_cached, v_cached, causal=False)
            out[rows], lse[rows] = seq_out.transpose(0, 1), seq_lse.T
        for group, rows in meta.merges:
            out[rows] = merge_over_group(out[rows], lse[rows], group)
        return self.o_proj(out.view(x.shape[0], self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs, tp: TensorParallel, backend: TorchBackend):
        super().__init__()
        self.backend = backend
        local_intermediate = split_evenly(args.intermediate_size, tp, "intermediate_size")
        self.gate_up_proj = ColumnParallelLinear(args.hidden_size, 2 * local_intermediate, False, backend)
        self.down_proj = RowParallelLinear(local_intermediate, args.hidden_size, tp, backend)

    def forward(self, x):
        return self.down_proj(self.backend.silu_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, tp: TensorParallel, backend: TorchBackend):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, backend)
        self.self_attn = Attention(args, tp, backend)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, backend)
        self.mlp = MLP(args, tp, backend)

    def forward(self, x, meta, k_cache, v_cache):
        return self.feed_forward(self.self_attn(self.input_layernorm(x), meta, k_cache, v_cache), x)

    def feed_forward(self, attended: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The layer's second half: s = attended + x (formed in attended's buffer), then s + mlp(norm(s))."""
        return self.mlp(self.post_attention_layernorm(attended, residual=x)).add_(attended)


class Transformer(nn.Module):
    def __init__(
        self,
        args: ModelArgs,
        tp: TensorParallel,
        backend: TorchBackend,
        layer_ids: range,
        first_stage: bool,
        last_stage: bool,
    ):
        super().__init__()
        self.args, self.layer_ids = args, layer_ids
        self.embed_tokens = VocabParallelEmbedding(args.vocab_size, args.hidden_size, tp) if first_stage else None
        self.layers = nn.ModuleDict({str(i): DecoderLayer(args, tp, backend) for i in layer_ids})
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, backend) if last_stage else None
        self.lm_head = None
        if last_stage:
            self.lm_head = ParallelLMHead(args.vocab_size, args.hidden_size, tp, backend)
            if args.tie_word_embeddings and first_stage:
                self.lm_head.weight = self.embed_tokens.weight

    def forward(self, x: torch.Tensor, meta: BatchMetadata, kv_cache) -> torch.Tensor:
        """Token ids [T] on the first stage, hidden states [T, hidden] elsewhere → hidden states."""
        if self.embed_tokens is not None:
            x = self.embed_tokens(x)
        for local_index, layer in enumerate(self.layers.values()):
            x = layer(x, meta, kv_cache.k[local_index], kv_cache.v[local_index])
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden)).float()
