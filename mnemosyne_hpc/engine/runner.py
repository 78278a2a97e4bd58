"""Runs this rank's part of a step plan: its stage's micro-batch through its layers.

Pipeline stages pass hidden states point to point. Each tick, a stage first sends on what it
computed last tick (the next stage runs that micro-batch now), then receives its own input from
the previous stage, computes, and keeps the output for the next tick. The last stage samples and
sends the tokens to rank 0.

Each KVP group runs the chunks of the plan that read its KV. A chunk of a request spanning several
groups runs on all of them; they merge their attention per layer, so all of them compute the same
hidden states. The chunk's owner (the group holding its positions) stores its K/V; the request's
first group, which runs every chunk of it, samples.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import torch
import torch.distributed as dist

from mnemosyne_hpc.config import Config, kvp_group_tokens
from mnemosyne_hpc.distributed.mesh import ParallelContext, stage_layers
from mnemosyne_hpc.engine.kv_cache import KVCache
from mnemosyne_hpc.engine.plan import MicroBatch, StepPlan
from mnemosyne_hpc.engine.sampler import sample
from mnemosyne_hpc.model.args import ModelArgs
from mnemosyne_hpc.model.layers import TensorParallel, rope_inv_freq, rope_tables
from mnemosyne_hpc.model.attention import DecodeBatch
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
        self.group_tokens = kvp_group_tokens(cfg)
        self.block_tables: dict[int, list[int]] = {}  # request id → its blocks in this rank's KVP group
        self._output: torch.Tensor | None = None  # hidden states computed last tick, for the next stage

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> tuple[list[int], torch.Tensor]:
        """Run this rank's stage of one tick. On rank 0: the tokens sampled for `plan.leaving`
        (one per chunk with sampling set) and, if `plan.return_logits`, their logits."""
        ctx = self.ctx
        for request_id in plan.released:
            self.block_tables.pop(request_id, None)
        for request_id, (first_group, tables) in plan.block_tables.items():
            if first_group <= ctx.kvp_rank < first_group + len(tables):
                self.block_tables[request_id] = tables[ctx.kvp_rank - first_group]
        send = None
        if self._output is not None:
            send = dist.isend(self._output, dst=ctx.next_rank)
            self._output = None
        batch = [c for c in plan.stages[ctx.stage] if ctx.kvp_rank in c.groups]
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
                tokens, logits = self._sample(batch, hidden)
            else:
                self._output = hidden
        if send is not None:
            send.wait()
        return self._tokens_to_rank0(plan, tokens, logits)

    def _metadata(self, batch: MicroBatch) -> BatchMetadata:
        device, group = self.ctx.device, self.ctx.kvp_rank
        positions = torch.cat([torch.arange(c.start_pos, c.start_pos + len(c.token_ids)) for c in batch])
        write_slots, write_rows, sequences, decodes, merges, start = [], [], [], [], {}, 0
        for chunk in batch:
            end = start + len(chunk.token_ids)
            shard = group - chunk.first_group  # positions [shard·L, (shard+1)·L) live here
            table = self.block_tables[chunk.request_id]
            holds_chunk = group == chunk.owner
            # this group's KV of the request before the chunk: its whole shard, unless it holds the chunk
            cached = chunk.start_pos - shard * self.group_tokens if holds_chunk else self.group_tokens
            # A single token attends to its own K/V in the cache with the rest, in one unmasked call.
            within_chunk = holds_chunk and len(chunk.token_ids) > 1
            attended = cached + (holds_chunk and not within_chunk)
            runs = None
            if attended and len(chunk.token_ids) == 1 and not within_chunk:
                decodes.append((start, runs := self.kv_cache.runs(table, 0, attended)))
            else:
                slots = self.kv_cache.index(table, 0, attended) if attended else None
                sequences.append(SequenceSlice(start, end, slots.to(device) if torch.is_tensor(slots) else slots,
                                               within_chunk))
            if holds_chunk:  # a decode's own slot is the last one it attends to
                write_slots.append(torch.tensor([runs[-1][0] + runs[-1][1] - 1]) if runs else
                                   self.kv_cache.slots(table, cached, cached + len(chunk.token_ids)))
                write_rows.append(torch.arange(start, end))
            if len(chunk.groups) > 1:
                merges.setdefault((chunk.groups[0], chunk.groups[-1]), []).append(torch.arange(start, end))
            start = end
        decode_batch = DecodeBatch.of(*zip(*decodes), device) if decodes else None
        cos, signed_sin = rope_tables(positions.to(device)[:, None].float() * self.inv_freq[None], self.dtype)
        write_rows = torch.cat(write_rows) if write_rows else torch.empty(0, dtype=torch.long)
        return BatchMetadata(
            cos=cos, signed_sin=signed_sin,
            write_slots=torch.cat(write_slots).to(device) if write_slots else torch.empty(0, dtype=torch.long),
            write_rows=None if len(write_rows) == start else write_rows.to(device), sequences=sequences,
            decodes=decode_batch,
            merges=[(self.ctx.kvp_groups[key], torch.cat(rows).to(device)) for key, rows in sorted(merges.items())])

    def _sample(self, batch: MicroBatch, hidden: torch.Tensor):
        ends = itertools.accumulate(len(c.token_ids) for c in batch)
        rows = [(end - 1, c) for end, c in zip(ends, batch) if c.first_group == self.ctx.kvp_rank and c.sampling is not None]
        if not rows:
            return [], torch.empty(0)
        logits = self.model.logits(hidden[[row for row, _ in rows]])
        tokens = sample(logits, [c.sampling for _, c in rows], [c.sample_position for _, c in rows])
        return tokens, logits

    def _tokens_to_rank0(self, plan: StepPlan, tokens: list[int], logits: torch.Tensor):
        """Each KVP group's sampler sends rank 0 the tokens of the requests that start in that group;
        rank 0 returns all of them in the order of `plan.leaving`."""
        ctx = self.ctx
        sampled = [c for c in plan.leaving if c.sampling is not None]
        if ctx.rank != 0:
            if ctx.is_sampler and tokens:
                dist.send(torch.tensor(tokens), dst=0, group=ctx.cpu_group)
                if plan.return_logits:
                    dist.send(logits.cpu(), dst=0, group=ctx.cpu_group)
            return [], torch.empty(0)
        token_rows, logit_rows = {}, {}  # KVP group → iterators over its rows, in plan order
        for group, sampler in enumerate(ctx.sampler_ranks):
            n = sum(c.first_group == group for c in sampled)
            if n == 0:
                continue
            rows = tokens, logits
            if sampler != 0:
                received, received_logits = torch.empty(n, dtype=torch.long), torch.empty(0)
                dist.recv(received, src=sampler, group=ctx.cpu_group)
                if plan.return_logits:
                    received_logits = torch.empty(n, self.args.vocab_size)
                    dist.recv(received_logits, src=sampler, group=ctx.cpu_group)
                rows = received.tolist(), received_logits
            token_rows[group], logit_rows[group] = iter(rows[0]), iter(rows[1])
        tokens = [next(token_rows[c.first_group]) for c in sampled]
        if not (plan.return_logits and sampled):
            return tokens, torch.empty(0)
        return tokens, torch.stack([next(logit_rows[c.first_group]) for c in sampled])
