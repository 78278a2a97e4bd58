"""This rank's model and KV cache: runs its pipeline stage's layers over a micro-batch, and samples.

Each KVP group runs the chunks of the plan that read its KV. A chunk of a request spanning several
groups runs on all of them; they merge their attention per layer, so all of them compute the same
hidden states. The chunk's owner (the group holding its positions) stores its K/V; the request's
first group, which runs every chunk of it, samples. How plans arrive and results leave: `executor.py`.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from mnemosyne_hpc.config import CacheConfig, Config
from mnemosyne_hpc.distributed.kvp_layout import KVPLayout
from mnemosyne_hpc.distributed.mesh import ParallelContext, stage_layers
from mnemosyne_hpc.engine.kv_cache import KVCache
from mnemosyne_hpc.engine.plan import MicroBatch
from mnemosyne_hpc.engine.sampler import logprob_rows, sample
from mnemosyne_hpc.model.args import ModelArgs
from mnemosyne_hpc.model.attention import DecodeBatch
from mnemosyne_hpc.model.backend import select_backend
from mnemosyne_hpc.model.layers import TensorParallel, rope_inv_freq, rope_tables
from mnemosyne_hpc.model.llama import BatchMetadata, SequenceSlice, Transformer
from mnemosyne_hpc.model.loader import load_model

LOGITS_ROWS = 256  # rows of logits computed at once for prompt log-probabilities: bounds their memory


def _first_rows(batch: MicroBatch) -> dict[int, int]:
    """Each chunk's first row in the micro-batch's hidden states, by request id."""
    return dict(zip((c.request_id for c in batch), itertools.accumulate((len(c.token_ids) for c in batch), initial=0)))


def kv_pool_blocks(cache: CacheConfig, args: ModelArgs, tp_size: int, num_stages: int, dtype: torch.dtype) -> int:
    """KV blocks per rank: cache.num_blocks, or as many as cache.kv_memory_gib holds. Every stage gets the
    same count (sized for stage 0, the largest), so one block table serves all of them."""
    if cache.num_blocks:
        return cache.num_blocks
    largest_stage = len(stage_layers(args.num_layers, num_stages, 0))
    per_block = KVCache.bytes_per_block(
        largest_stage, args.num_kv_heads // tp_size, args.head_dim, cache.block_size, dtype
    )
    return int(cache.kv_memory_gib * 2**30 // per_block)


class ModelRunner:
    def __init__(self, cfg: Config, ctx: ParallelContext, model_dir: Path, args: ModelArgs):
        self.ctx, self.args = ctx, args
        self.dtype = getattr(torch, cfg.model.dtype)
        tp = TensorParallel(ctx.tp_group, ctx.tp_rank, ctx.tp_size)
        layer_ids = stage_layers(args.num_layers, ctx.num_stages, ctx.stage)
        self.backend = select_backend(self.dtype, ctx.device)  # the kernels every layer computes with
        with torch.device("meta"):
            model = Transformer(args, tp, self.backend, layer_ids, ctx.first_stage, ctx.last_stage)
        self.model = load_model(model_dir, model, tp, self.dtype, ctx.device)
        kv_heads = args.num_kv_heads // ctx.tp_size
        block_size = cfg.cache.block_size
        self.num_blocks = kv_pool_blocks(cfg.cache, args, ctx.tp_size, ctx.num_stages, self.dtype)
        self.kv_cache = KVCache(
            len(layer_ids), kv_heads, args.head_dim, self.num_blocks, block_size, self.dtype, ctx.device
        )
        self.inv_freq = rope_inv_freq(args.head_dim, args.rope_theta, args.rope_scaling).to(ctx.device)
        self.layout = KVPLayout.of(cfg)
        self.block_tables: dict[int, list[int]] = {}  # request id → its blocks in this rank's KVP group

    def update_block_tables(self, tables: dict[int, tuple[int, list[list[int]]]], released: list[int]) -> None:
        """Keep this rank's KVP group's block table of every request a plan admitted or grew; drop the
        tables of released requests."""
        for request_id in released:
            self.block_tables.pop(request_id, None)
        group = self.ctx.kvp_rank
        for request_id, (first_group, group_tables) in tables.items():
            if first_group <= group < first_group + len(group_tables):
                self.block_tables[request_id] = group_tables[group - first_group]

    def forward(self, batch: MicroBatch, x: torch.Tensor) -> torch.Tensor:
        """This stage's layers over the micro-batch: token ids [T] on the first stage, hidden states
        [T, hidden] elsewhere → hidden states."""
        return self.model(x, self._metadata(batch), self.kv_cache)

    def sample(self, batch: MicroBatch, hidden: torch.Tensor, chunks: MicroBatch) -> tuple[list[int], torch.Tensor]:
        """The next token of each of `chunks` (some of `batch`), from its last row of `hidden`; and the
        logits they were sampled from."""
        first_row = _first_rows(batch)
        logits = self.model.logits(hidden[[first_row[c.request_id] + len(c.token_ids) - 1 for c in chunks]])
        return sample(logits, [c.sampling for c in chunks], [c.sample_position for c in chunks]), logits

    def logprobs(
        self, batch: MicroBatch, hidden: torch.Tensor, chunks: MicroBatch, sampled: dict[int, int], top: int
    ) -> torch.Tensor:
        """`logprob_rows` of `chunks` (some of `batch`), `Chunk.logprob_rows` of them each: the rows of its
        prompt targets, then its last row's with the token `sampled` for it."""
        first_row = _first_rows(batch)
        rows, targets = [], []
        for c in chunks:
            start = first_row[c.request_id]
            rows += range(start, start + len(c.prompt_targets))
            targets += c.prompt_targets
            if c.sampling is not None and c.sampling.logprobs is not None:
                rows.append(start + len(c.token_ids) - 1)
                targets.append(max(sampled[c.request_id], 0))  # a failed sample's row is dropped on rank 0
        return torch.cat(
            [
                logprob_rows(
                    self.model.logits(hidden[rows[i : i + LOGITS_ROWS]]),
                    torch.tensor(targets[i : i + LOGITS_ROWS], device=hidden.device),
                    top,
                )
                for i in range(0, len(rows), LOGITS_ROWS)
            ]
        )

    def _metadata(self, batch: MicroBatch) -> BatchMetadata:
        device, group = self.ctx.device, self.ctx.kvp_rank
        positions = torch.cat([torch.arange(c.start_pos, c.start_pos + len(c.token_ids)) for c in batch])
        write_slots, write_rows, sequences, decodes, merges, start = [], [], [], [], {}, 0
        for chunk in batch:
            end = start + len(chunk.token_ids)
            table = self.block_tables[chunk.request_id]
            holds_chunk = group == chunk.owner
            cached = self.layout.cached_tokens(chunk.first_group, chunk.start_pos, group)
            # A single token attends to its own K/V in the cache with the rest, in one unmasked call.
            within_chunk = holds_chunk and len(chunk.token_ids) > 1
            attended = cached + (holds_chunk and not within_chunk)
            runs = None
            if attended and len(chunk.token_ids) == 1 and not within_chunk:
                decodes.append((start, runs := self.kv_cache.runs(table, 0, attended)))
            else:
                slots = self.kv_cache.index(table, 0, attended) if attended else None
                sequences.append(
                    SequenceSlice(start, end, slots.to(device) if torch.is_tensor(slots) else slots, within_chunk)
                )
            if holds_chunk:  # a decode's own slot is the last one it attends to
                write_slots.append(
                    torch.tensor([runs[-1][0] + runs[-1][1] - 1])
                    if runs
                    else self.kv_cache.slots(table, cached, cached + len(chunk.token_ids))
                )
                write_rows.append(torch.arange(start, end))
            if len(chunk.groups) > 1:
                merges.setdefault((chunk.groups[0], chunk.groups[-1]), []).append(torch.arange(start, end))
            start = end
        decode_batch = DecodeBatch.of(*zip(*decodes), device) if decodes else None
        cos, signed_sin = rope_tables(positions.to(device)[:, None].float() * self.inv_freq[None], self.dtype)
        write_rows = torch.cat(write_rows) if write_rows else torch.empty(0, dtype=torch.long)
        return BatchMetadata(
            cos=cos,
            signed_sin=signed_sin,
            write_slots=torch.cat(write_slots).to(device) if write_slots else torch.empty(0, dtype=torch.long),
            write_rows=None if len(write_rows) == start else write_rows.to(device),
            sequences=sequences,
            decodes=decode_batch,
            merges=[(self.ctx.kvp_groups[key], torch.cat(rows).to(device)) for key, rows in sorted(merges.items())],
        )
