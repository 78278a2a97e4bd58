"""Continuous batching with fixed-size prefill chunks: decodes first, then prefill chunks.

Each call forms the micro-batch that enters pipeline stage 0 this tick. Under SPP a request's next
prefill chunk may enter while earlier chunks are still in later stages; a decode always waits
for its previous token to come back from the last stage.
"""
from __future__ import annotations

import math
from collections import deque

from mnemosyne_hpc.config import SchedulerConfig
from mnemosyne_hpc.engine.kv_cache import BlockAllocator
from mnemosyne_hpc.engine.plan import Chunk, MicroBatch
from mnemosyne_hpc.engine.request import Request


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, allocator: BlockAllocator, num_stages: int = 1):
        self.cfg, self.allocator, self.num_stages = cfg, allocator, num_stages
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> MicroBatch:
        budget = self.cfg.max_num_batched_tokens
        chunks = []
        ready = [r for r in self.running if r.num_unscheduled and not (self.cfg.pipeline == "plain" and r.in_flight)]
        # Spread decodes over the P micro-batches in flight so every pipeline stage has work.
        decoding = sum(not r.in_prefill for r in self.running)
        decodes = [r for r in ready if not r.in_prefill][: math.ceil(decoding / self.num_stages)]
        prefills = [r for r in ready if r.in_prefill]
        for request in decodes + prefills:
            if budget == 0:
                break
            chunks.append(self._chunk(request, budget))
            budget -= len(chunks[-1].token_ids)
        while budget > 0 and self.waiting and len(self.running) < self.cfg.max_num_seqs:
            request = self.waiting[0]
            if not self.allocator.can_reserve(request.max_len):
                break  # FCFS: wait for blocks rather than overtake
            self.waiting.popleft()
            request.block_ids = self.allocator.reserve(request.max_len)
            self.running.append(request)
            chunks.append(self._chunk(request, budget))
            budget -= len(chunks[-1].token_ids)
        return chunks

    def _chunk(self, request: Request, budget: int) -> Chunk:
        size = min(request.num_unscheduled, budget)
        if request.in_prefill and self.cfg.chunk_size:
            size = min(size, self.cfg.chunk_size)
        start = request.num_scheduled
        end = start + size
        sample = size == request.num_unscheduled
        request.num_scheduled = end
        return Chunk(request_id=request.id, token_ids=request.token_ids(start, end), start_pos=start,
                     block_table=request.block_ids[: self.allocator.blocks_for(end)],
                     sampling=request.sampling if sample else None)

    def finish(self, request: Request) -> None:
        self.running.remove(request)
        self.allocator.free(request.block_ids)
        request.block_ids = []
