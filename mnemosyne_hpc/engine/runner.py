"""Runs this rank's part of a step plan: its stage's micro-batch through its layers.

Pipeline stages pass hidden states point to point. Each tick, a stage first sends on what it
computed last tick (the next stage runs that micro-batch now), then receives its own input from
the previous stage, computes, and keeps the output for the next tick. The last stage samples and
sends the tokens to rank 0.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from mnemosyne_hpc.config import Config
from mnemosyne_hpc.distributed.mesh import ParallelContext, stage_layers
from mnemosyne_hpc.engine.kv_cache import KVCache
from mnemosyne_hpc.engine.plan import MicroBatch, StepPlan
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
        layer_ids = stage_layers(args.num_layers, ctx.num_stages, ctx.stage)
        self.model = load_model(model_dir, args, tp, layer_ids, first_stage=ctx.first_stage,
                                last_stage=ctx.last_stage, dtype=self.dtype, device=ctx.device)
        kv_heads = args.num_kv_heads // ctx.tp_size
        block_size = cfg.cache.block_size
        # Every stage gets the same block count (sized for stage 0, the largest), so one block table
        # serves all of them.
        largest_stage = len(stage_layers(args.num_layers, ctx.num_stages, 0))
        self.num_blocks = cfg.cache.num_blocks or int(
            cfg.cache.kv_memory_gib * 2**30
            // KVCache.bytes_per_block(largest_stage, kv_heads, args.head_dim, block_size, self.dtype))
        self.kv_cache = KVCache(len(layer_ids), kv_heads, args.head_dim, self.num_blocks, block_size,
                                self.dtype, ctx.device)
        self.inv_freq = rope_inv_freq(args.head_dim, args.rope_theta, args.rope_scaling).to(ctx.device)
        self.sampler = Sampler()
        self._output: torch.Tensor | None = None  # hidden states computed last tick, for the next stage

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> tuple[list[int], torch.Tensor]:
        """Run this rank's stage of one tick. On rank 0: the tokens sampled for `plan.leaving`
        (one per chunk with sampling set) and, if `plan.return_logits`, their logits."""
        ctx = self.ctx
        self.sampler.release(plan.released)
        send = None
        if self._output is not None:
            send = dist.isend(self._output, dst=ctx.next_rank)
            self._output = None
        batch = plan.stages[ctx.stage]
        tokens, logits = [], torch.empty(0)
        if batch:
            if ctx.first_stage:
                x = torch.tensor([t for c in batch for t in c.token_ids], device=ctx.device)
            else:
                x = torch.empty(sum(len(c.token_ids) for c in batch), self.args.hidden_size, dtype=self.dtype,
                                device=ctx.device)
                dist.recv(x, src=ctx.prev_rank)
            meta = self._metadata(batch)
            hidden = self.model(x, meta, self.kv_cache)
            if ctx.last_stage:
                tokens, logits = self._sample(batch, meta, hidden)
            else:
                self._output = hidden
        if send is not None:
            send.wait()
        return self._tokens_to_rank0(plan, tokens, logits)

    def _metadata(self, batch: MicroBatch) -> BatchMetadata:
        device = self.ctx.device
        positions = torch.cat([torch.arange(c.start_pos, c.start_pos + len(c.token_ids)) for c in batch])
        write_slots, sequences, start = [], [], 0
        for chunk in batch:
            end = start + len(chunk.token_ids)
            slots = self.kv_cache.slots(chunk.block_table, 0, chunk.start_pos + len(chunk.token_ids))
            write_slots.append(slots[chunk.start_pos:])
            prefix = slots[: chunk.start_pos].to(device) if chunk.start_pos else None
            sequences.append(SequenceSlice(start, end, prefix))
            start = end
        angles = positions.to(device)[:, None].float() * self.inv_freq[None]
        angles = torch.cat((angles, angles), dim=-1)
        return BatchMetadata(cos=angles.cos().to(self.dtype), sin=angles.sin().to(self.dtype),
                             write_slots=torch.cat(write_slots).to(device), sequences=sequences)

    def _sample(self, batch: MicroBatch, meta: BatchMetadata, hidden: torch.Tensor):
        rows = [(s.end - 1, c) for s, c in zip(meta.sequences, batch) if c.sampling is not None]
        if not rows:
            return [], torch.empty(0)
        logits = self.model.logits(hidden[[row for row, _ in rows]])
        tokens = self.sampler.sample(logits, [c.request_id for _, c in rows], [c.sampling for _, c in rows])
        return tokens, logits

    def _tokens_to_rank0(self, plan: StepPlan, tokens: list[int], logits: torch.Tensor):
        ctx = self.ctx
        n = sum(c.sampling is not None for c in plan.leaving)
        if ctx.sampler_rank == 0 or n == 0 or ctx.rank not in (0, ctx.sampler_rank):
            return tokens, logits
        if ctx.rank == ctx.sampler_rank:
            dist.send(torch.tensor(tokens), dst=0, group=ctx.cpu_group)
            if plan.return_logits:
                dist.send(logits.cpu(), dst=0, group=ctx.cpu_group)
            return [], torch.empty(0)
        received = torch.empty(n, dtype=torch.long)
        dist.recv(received, src=ctx.sampler_rank, group=ctx.cpu_group)
        if plan.return_logits:
            logits = torch.empty(n, self.args.vocab_size)
            dist.recv(logits, src=ctx.sampler_rank, group=ctx.cpu_group)
        return received.tolist(), logits
