"""Runs a step plan on one rank: pack the chunks, run this rank's layers, sample on the last stage."""
from __future__ import annotations

from pathlib import Path

import torch

from mnemosyne_hpc.config import Config
from mnemosyne_hpc.distributed.mesh import ParallelContext
from mnemosyne_hpc.engine.kv_cache import KVCache
from mnemosyne_hpc.engine.plan import StepPlan
from mnemosyne_hpc.engine.sampler import Sampler
from mnemosyne_hpc.model.args import ModelArgs
from mnemosyne_hpc.model.layers import TensorParallel, rope_inv_freq
from mnemosyne_hpc.model.llama import BatchMetadata, SequenceSlice
from mnemosyne_hpc.model.loader import load_model


class ModelRunner:
    def __init__(self, cfg: Config, ctx: ParallelContext, model_dir: Path, args: ModelArgs):
        self.ctx, self.args = ctx, args
        self.dtype = getattr(torch, cfg.model.dtype)
        tp = TensorParallel(ctx.tp_group, ctx.tp_rank, ctx.tp_size)
        layer_ids = range(args.num_layers)
        self.model = load_model(model_dir, args, tp, layer_ids, first_stage=True, last_stage=True,
                                dtype=self.dtype, device=ctx.device)
        kv_heads = args.num_kv_heads // ctx.tp_size
        block_size = cfg.cache.block_size
        self.num_blocks = cfg.cache.num_blocks or int(
            cfg.cache.kv_memory_gib * 2**30
            // KVCache.bytes_per_block(len(layer_ids), kv_heads, args.head_dim, block_size, self.dtype))
        self.kv_cache = KVCache(len(layer_ids), kv_heads, args.head_dim, self.num_blocks, block_size,
                                self.dtype, ctx.device)
        self.inv_freq = rope_inv_freq(args.head_dim, args.rope_theta, args.rope_scaling).to(ctx.device)
        self.sampler = Sampler()

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> tuple[list[int], torch.Tensor]:
        """Run one step. Returns the sampled tokens and their logits [n, vocab] (rows of sampling chunks)."""
        self.sampler.release(plan.released)
        device = self.ctx.device
        token_ids = torch.tensor([t for c in plan.chunks for t in c.token_ids], device=device)
        positions = torch.cat([torch.arange(c.start_pos, c.start_pos + len(c.token_ids)) for c in plan.chunks])
        write_slots, sequences, start = [], [], 0
        for chunk in plan.chunks:
            end = start + len(chunk.token_ids)
            slots = self.kv_cache.slots(chunk.block_table, 0, chunk.start_pos + len(chunk.token_ids))
            write_slots.append(slots[chunk.start_pos:])
            prefix = slots[: chunk.start_pos].to(device) if chunk.start_pos else None
            sequences.append(SequenceSlice(start, end, prefix))
            start = end
        angles = positions.to(device)[:, None].float() * self.inv_freq[None]
        angles = torch.cat((angles, angles), dim=-1)
        meta = BatchMetadata(cos=angles.cos().to(self.dtype), sin=angles.sin().to(self.dtype),
                             write_slots=torch.cat(write_slots).to(device), sequences=sequences)
        hidden = self.model(token_ids, meta, self.kv_cache)
        sampled = [(s.end - 1, c) for s, c in zip(sequences, plan.chunks) if c.sampling is not None]
        if not sampled:
            return [], torch.empty(0)
        logits = self.model.logits(hidden[[row for row, _ in sampled]])
        tokens = self.sampler.sample(logits, [c.request_id for _, c in sampled], [c.sampling for _, c in sampled])
        return tokens, logits
