"""Continuous batching with fixed-size prefill chunks: decodes first, then prefill chunks.

Each call forms the micro-batch that enters pipeline stage 0 this tick. Under SPP a request's next
prefill chunk may enter while earlier chunks are still in later stages; a decode always waits
for its previous token to come back from the last stage. Under KVP every group has its own token
budget: a chunk costs its tokens in each group that runs it, and never crosses a group boundary.
"""
from __future__ import annotations

import math
from collections import deque

from mnemosyne_hpc.config import SchedulerConfig
from mnemosyne_hpc.engine.kv_cache import KVPlacement
from mnemosyne_hpc.engine.plan import Chunk, MicroBatch
from mnemosyne_hpc.engine.request import Request


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, placement: KVPlacement, num_stages: int = 1):
        self.cfg, self.placement, self.num_stages = cfg, placement, num_stages
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> MicroBatch:
        budget = [self.cfg.max_num_batched_tokens] * len(self.placement.allocators)  # per KVP group
        chunks = []
        ready = [r for r in self.running if r.num_unscheduled and not (self.cfg.pipeline == "plain" and r.in_flight)]
        # Spread decodes over the P micro-batches in flight so every pipeline stage has work.
        decoding = sum(not r.in_prefill for r in self.running)
        decodes = [r for r in ready if not r.in_prefill][: math.ceil(decoding / self.num_stages)]
        prefills = [r for r in ready if r.in_prefill]
        for request in decodes + prefills:
            self._add_chunk(chunks, request, budget)
        while any(budget) and self.waiting and len(self.running) < self.cfg.max_num_seqs:
            request = self.waiting[0]
            placed = self.placement.reserve(request.max_len)
            if placed is None:
                break  # FCFS: wait for blocks rather than overtake
            self.waiting.popleft()
            request.first_group, request.block_tables = placed
            self.running.append(request)
            self._add_chunk(chunks, request, budget)
        return chunks

    def _add_chunk(self, chunks: MicroBatch, request: Request, budget: list[int]) -> None:
        start = request.num_scheduled
        group_tokens = self.placement.group_tokens
        groups = range(request.first_group, request.first_group + start // group_tokens + 1)
        size = min(request.num_unscheduled, min(budget[g] for g in groups),
                   group_tokens - start % group_tokens)  # stop at the group boundary
        if request.in_prefill and self.cfg.chunk_size:
            size = min(size, self.cfg.chunk_size)
        if size == 0:
            return
        for g in groups:
            budget[g] -= size
        end = start + size
        request.num_scheduled = end
        chunks.append(Chunk(request_id=request.id, token_ids=request.token_ids(start, end), start_pos=start,
                            first_group=request.first_group, num_groups=len(groups),
                            sampling=request.sampling if end == request.num_tokens else None))

    def finish(self, request: Request) -> None:
        self.running.remove(request)
        self.placement.free(request.first_group, request.block_tables)  # the tables stay, for reporting
