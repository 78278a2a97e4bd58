"""This rank's engine step taken apart, for timing its parts one by one (the performance model's
calibration). Each method returns a callable that runs one part the way a step runs it, with this
rank's shard shapes, on random inputs of the given size.
"""

from __future__ import annotations

import itertools
from typing import Callable

import torch
import torch.distributed as dist

from mnemosyne_hpc.engine.request import SamplingParams
from mnemosyne_hpc.engine.runner import ModelRunner
from mnemosyne_hpc.engine.sampler import sample
from mnemosyne_hpc.model.attention import DecodeBatch, merge_over_group

GREEDY = SamplingParams(seed=0)
# More than the last-level cache of the CPUs and GPUs the engine runs on (32-96 MiB an AMD EPYC's L3 slice,
# 50 MiB an H100's L2): what `StepProbes.evict_caches` reads at most.
EVICT_BYTES = 256 << 20


class StepProbes:
    def __init__(self, runner: ModelRunner):
        self.ctx, self.dtype, self.device = runner.ctx, runner.dtype, runner.ctx.device
        self.head_dim, self.hidden_size = runner.args.head_dim, runner.args.hidden_size
        self._model, self._kv_cache, self._backend = runner.model, runner.kv_cache, runner.backend
        self._layer = next(iter(runner.model.layers.values()))
        self.num_heads = self._layer.self_attn.num_heads  # query heads on this rank
        self._chunks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # attention's queries and keys
        read = [*runner.model.layers.values()] + ([runner.model.lm_head] if runner.model.lm_head is not None else [])
        step_bytes = sum(p.numel() * p.element_size() for module in read for p in module.parameters())
        self._evictor = torch.zeros(min(step_bytes, EVICT_BYTES) // 4, dtype=torch.float32, device=self.device)

    def evict_caches(self) -> None:
        """Read as many bytes as a step reads between two reads of the same weight (every weight of this
        stage but the embedding, which a step reads by rows; at most `EVICT_BYTES`), so that a kernel timed
        next finds in the caches what it would in a step. Kernels timed one after another on the same
        layer find its weights cached, which a step does only where its stage fits in the caches: on a CPU
        in float32, a 2-layer model's linear part at 2-64 rows ran 1.15-1.6× as long after this as
        without it, and from 200 rows on within 7%."""
        self._evictor.sum()

    def fill_cache(self, slots: int) -> None:
        """Random values in the first `slots` KV slots of every layer: timing must not meet NaN paths."""
        self._kv_cache.k[:, :, :slots].normal_()
        self._kv_cache.v[:, :, :slots].normal_()

    def linear(self, tokens: int) -> Callable:
        """One layer without its attention kernel: norm, QKV projection and RoPE, output projection, MLP
        (with their TP all-reduces). Each call runs the next of this stage's layers, as a step does:
        one layer again and again would find its weights in the CPU's (or GPU's) caches."""
        layers = itertools.cycle(self._model.layers.values())
        x = self._hidden(tokens)
        angles = self._random(tokens, self.head_dim)
        attended = self._random(tokens, self.num_heads * self.head_dim)

        def fn():
            layer = next(layers)
            layer.self_attn.project(layer.input_layernorm(x), angles, angles)
            return layer.feed_forward(layer.self_attn.o_proj(attended), x)

        return fn

    def attention(self, queries: int, context: int, pool: int) -> Callable:
        """One layer's attention of `queries` tokens over `context` cached ones. Each call reads its
        context from another layer and another part of the first `pool` slots, as a step reads KV that
        no cache holds: timing one prefix again and again would find it in the CPU's caches."""
        attn, d, kv, backend = self._layer.self_attn, self.head_dim, self._kv_cache, self._backend
        span = context + (queries == 1)
        first_slots = range(0, pool - span + 1, max(span, pool // 64)) if span else [0]
        layers = itertools.cycle(range(kv.k.shape[0]))
        if queries == 1:  # through the decode path, with its results written in place, as a step runs it
            rows = self._random(1, attn.num_heads, d)
            out, lse = torch.empty_like(rows), torch.empty(1, attn.num_heads, dtype=torch.float32, device=self.device)
            batches = itertools.cycle([DecodeBatch.of([0], [[(start, span)]], self.device) for start in first_slots])

            def decode():
                layer = next(layers)
                backend.decode_attention(rows, kv.k[layer], kv.v[layer], next(batches), out, lse)

            return decode

        if queries not in self._chunks:  # one chunk per query count: the profiler holds every probe at once
            self._chunks[queries] = (
                self._random(attn.num_heads, queries, d),
                self._random(attn.num_kv_heads, queries, d),
            )
        query, key = self._chunks[queries]
        starts = itertools.cycle(first_slots)

        def chunk():
            layer, start = next(layers), next(starts)
            cached = slice(start, start + span)
            return backend.chunk_attention(
                query, key, key, *((kv.k[layer][:, cached], kv.v[layer][:, cached]) if context else (None, None))
            )

        return chunk

    def lm_head(self, rows: int) -> Callable:
        """Final norm, LM head and greedy sampling of `rows` rows (on the last stage)."""
        hidden, positions = self._hidden(rows), list(range(rows))
        return lambda: sample(self._model.logits(hidden), [GREEDY] * rows, positions)

    def merge(self, rows: int) -> Callable:
        """One layer's merge of `rows` rows' partial attentions over every KVP group."""
        out = self._random(self.num_heads, rows, self.head_dim)
        lse = torch.randn(self.num_heads, rows, dtype=torch.float32, device=self.device)
        group = self.ctx.kvp_groups[0, self.ctx.kvp_size - 1]
        return lambda: merge_over_group(out, lse, group)

    def hand_over(self, tokens: int) -> Callable:
        """The SPP hand-over of `tokens` hidden states: sent to the next stage, received from the previous."""
        x, received = self._hidden(tokens), self._hidden(tokens)

        def fn():
            send = dist.isend(x, dst=self.ctx.next_rank) if self.ctx.next_rank is not None else None
            if self.ctx.prev_rank is not None:
                dist.recv(received, src=self.ctx.prev_rank)
            if send is not None:
                send.wait()

        return fn

    def _hidden(self, tokens: int) -> torch.Tensor:
        return self._random(tokens, self.hidden_size)

    def _random(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=self.dtype, device=self.device)
