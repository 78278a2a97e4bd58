"""Continuous batching: decodes first, then prefill chunks in priority order.

Each call forms the micro-batch that enters pipeline stage 0 this tick. Under SPP a request's next
prefill chunk may enter while earlier chunks are still in later stages; a decode always waits
for its previous token to come back from the last stage. Under KVP every group has its own
budget: a chunk costs its tokens (and time) in each group that runs it, and never crosses a group
boundary.

Chunking. `fixed` gives a prefill `chunk_size` tokens. `adaptive` gives it the largest size
`min_chunk + k · chunk_step <= max_chunk` whose predicted micro-batch time, with everything already
in the batch, fits the tick's share of the TBT SLO (`(1 − slo_headroom) × tbt_slo_ms / stages`), so
the chunks of a long prompt shrink as its prefix grows. When the most urgent prefill has slack and others
wait behind it, it leaves `space_share` of that time to them.

Memory. Admission reserves every KV block of what is to be prefilled, in every group it spans; a
decode takes a block when its position needs one. When that block's group has none free, the
lowest-priority request holding blocks there (and with nothing in the pipeline) is preempted: its
blocks are freed and it is prefilled again later. A request that can never fit is rejected before
it gets here.

Prefix caching. Admission first takes the cached blocks of the request's longest cached prefix
(`kv_cache.KVPlacement.reserve`): those tokens count as computed, and only the rest is prefilled,
predicted and weighed by the priority. Blocks are cached once their KV is in every stage (`computed`).
"""

from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass, field

from mnemosyne_hpc.config import SchedulerConfig
from mnemosyne_hpc.distributed.kvp_layout import KVPLayout
from mnemosyne_hpc.engine.kv_cache import KVPlacement
from mnemosyne_hpc.engine.plan import Chunk, MicroBatch
from mnemosyne_hpc.engine.prefix_cache import extend_hashes
from mnemosyne_hpc.engine.priority import Priority
from mnemosyne_hpc.engine.request import Request
from mnemosyne_hpc.perf.model import PerfModel, SequenceShape


def chunk_shapes(layout: KVPLayout, first_group: int, start: int, size: int, samples: bool):
    """(group, its sequence shape, sampled rows, merged rows) of every KVP group that runs a chunk of `size`
    tokens from position `start`: what the scheduler predicts before it forms a chunk, and what a
    simulator times once it is formed (`mnemosyne_hpc/sim/`)."""
    groups = layout.holders(first_group, start)
    merged = size if len(groups) > 1 else 0
    for g in groups:
        shape = SequenceShape(size, layout.cached_tokens(first_group, start, g))
        yield g, shape, int(samples and g == first_group), merged


@dataclass
class GroupLoad:
    """What one KVP group runs in the micro-batch being formed."""

    tokens_left: int
    sequences: list[SequenceShape] = field(default_factory=list)
    sampled_rows: int = 0
    merged_rows: int = 0
    has_prefill: bool = False

    def add(self, shape: SequenceShape, sampled: int, merged: int) -> None:
        self.sequences.append(shape)
        self.sampled_rows += sampled
        self.merged_rows += merged

    def time(self, perf_model: PerfModel) -> float:
        return perf_model.batch_time(self.sequences, self.sampled_rows, self.merged_rows)

    def time_with(self, perf_model: PerfModel, shape: SequenceShape, sampled: int, merged: int) -> float:
        return perf_model.batch_time(self.sequences + [shape], self.sampled_rows + sampled, self.merged_rows + merged)


class Scheduler:
    def __init__(
        self,
        cfg: SchedulerConfig,
        placement: KVPlacement,
        num_stages: int = 1,
        perf_model: PerfModel | None = None,
        clock=time.perf_counter,
    ):
        self.cfg, self.placement, self.layout, self.num_stages = cfg, placement, placement.layout, num_stages
        self.perf_model, self.clock = perf_model, clock
        self.priority = Priority(cfg, perf_model)
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self._loads: list[GroupLoad] = []  # what each KVP group runs in the last micro-batch formed
        self.released: list[int] = []  # requests whose blocks were freed since the last plan
        self.tables_changed: dict[int, Request] = {}  # requests admitted or grown since the last plan
        self.prefix_queried_tokens = self.prefix_hit_tokens = 0  # tokens admitted, and of those found cached

    def add(self, request: Request) -> None:
        prompt = len(request.prompt_token_ids)
        request.cached_at_arrival = self.placement.cached_prefix(self._lookup(request, prompt), prompt)
        self.waiting.append(request)

    def _lookup(self, request: Request, num_tokens: int) -> list[bytes]:
        """The identities to look up in the prefix cache: none for a request that wants the log-probabilities
        of its prompt, which must then be computed."""
        return [] if request.sampling.prompt_logprobs is not None else self._identities(request, num_tokens)

    def _identities(self, request: Request, num_tokens: int) -> list[bytes]:
        """The identities of the request's complete blocks within its first `num_tokens` (none without
        prefix caching)."""
        if not self.placement.prefix_caching:
            return []
        return extend_hashes(request.block_identities, request.token_ids, self.placement.grid, num_tokens)

    def computed(self, request: Request) -> None:
        """The request's KV grew in every stage: cache its blocks that are now complete."""
        complete = self.placement.grid.complete_blocks(request.num_computed)
        if self.placement.prefix_caching and complete > request.registered_blocks and request in self.running:
            self.placement.register(
                request.first_group,
                request.block_tables,
                self._identities(request, request.num_computed),
                range(request.registered_blocks, complete),
            )
            request.registered_blocks = complete

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def take_changes(self) -> tuple[list[int], list[Request]]:
        """Released request ids and requests with new block tables, for the next step plan."""
        released, changed = self.released, list(self.tables_changed.values())
        self.released, self.tables_changed = [], {}
        return released, changed

    def schedule(self) -> MicroBatch:
        now = self.clock()
        loads = self._loads = [GroupLoad(self.cfg.max_num_batched_tokens) for _ in self.placement.allocators]
        chunks: MicroBatch = []
        ready = [
            r
            for r in self.running
            if r.num_unscheduled and r.finish_reason is None and not (self.cfg.pipeline == "plain" and r.in_flight)
        ]
        # Spread decodes over the P micro-batches in flight so every pipeline stage has work.
        decoding = sum(not r.in_prefill for r in self.running)
        for request in [r for r in ready if not r.in_prefill][: math.ceil(decoding / self.num_stages)]:
            if request in self.running and self._make_room(request, now):
                self._add_chunk(chunks, loads, request, 1)
        waiting = [r for r in self.waiting if r.finish_reason is None]
        candidates = self.priority.order([r for r in ready if r.in_prefill and r in self.running] + waiting, now)
        admitting = True
        for i, request in enumerate(candidates):
            leave_share = i + 1 < len(candidates) and self._has_slack(request, now)
            if request in self.running:
                self._add_chunk(chunks, loads, request, self._chunk_size(loads, request, leave_share))
                continue
            if not admitting or len(self.running) >= self.cfg.max_num_seqs:
                continue
            placed = self.placement.reserve(
                request.prefill_len, request.max_len, self._lookup(request, request.prefill_len)
            )
            if placed is None:
                admitting = False  # nothing behind it overtakes it into memory
                continue
            request.first_group, request.block_tables, cached = placed
            request.num_scheduled = request.num_computed = cached
            size = self._chunk_size(loads, request, leave_share)
            if size == 0:
                self.placement.free(request.first_group, request.block_tables, request.max_len)
                request.block_tables, request.num_scheduled, request.num_computed = [], 0, 0
                continue
            if not request.preemptions:
                request.cached_tokens = cached
            self.prefix_queried_tokens += request.prefill_len
            self.prefix_hit_tokens += cached
            self.waiting.remove(request)
            self.running.append(request)
            self.tables_changed[request.id] = request
            self._add_chunk(chunks, loads, request, size)
        return chunks

    def predicted_time(self) -> float | None:
        """Predicted seconds of the last micro-batch formed (its slowest KVP group), given a performance model."""
        if self.perf_model is None or not self._loads:
            return None
        return max(
            self.perf_model.batch_time(load.sequences, load.sampled_rows, load.merged_rows) for load in self._loads
        )

    def _has_slack(self, request: Request, now: float) -> bool:
        return self.cfg.space_share > 0 and self.perf_model is not None and self.priority.slack(request, now) > 0

    def _groups(self, request: Request) -> range:
        """KVP groups that run the request's next chunk."""
        return self.layout.holders(request.first_group, request.num_scheduled)

    def _shapes(self, request: Request, size: int):
        """(group, its sequence shape, sampled rows, merged rows) for the request's next chunk of `size` tokens."""
        start = request.num_scheduled
        return chunk_shapes(self.layout, request.first_group, start, size, start + size == request.num_tokens)

    def _chunk_size(self, loads: list[GroupLoad], request: Request, leave_share: bool) -> int:
        start, groups = request.num_scheduled, self._groups(request)
        limit = min(
            request.num_unscheduled, min(loads[g].tokens_left for g in groups), self.layout.tokens_to_boundary(start)
        )
        if limit <= 0:
            return 0
        if self.cfg.chunking == "fixed":
            return min(limit, self.cfg.chunk_size or limit)
        cfg = self.cfg
        budget = cfg.tbt_slo_ms / 1000 * (1 - cfg.slo_headroom) / self.num_stages
        if leave_share:
            budget *= 1 - cfg.space_share
        sizes = [s for s in range(cfg.min_chunk, min(cfg.max_chunk, limit - 1) + 1, cfg.chunk_step)]
        if limit <= cfg.max_chunk:
            sizes.append(limit)

        def too_slow(size: int) -> bool:
            return any(
                loads[g].time_with(self.perf_model, shape, sampled, merged) > budget
                for g, shape, sampled, merged in self._shapes(request, size)
            )

        fitting = bisect.bisect_left(sizes, True, key=too_slow)  # predicted time grows with the size
        if fitting:
            return sizes[fitting - 1]
        # Nothing fits: the smallest chunk still runs when no other prefill shares these groups (progress).
        return sizes[0] if not any(loads[g].has_prefill for g in groups) else 0

    def _add_chunk(self, chunks: MicroBatch, loads: list[GroupLoad], request: Request, size: int) -> None:
        if size == 0:
            return
        for g, shape, sampled, merged in self._shapes(request, size):
            load = loads[g]
            load.tokens_left -= size
            load.add(shape, sampled, merged)
            load.has_prefill |= request.in_prefill
        groups = self._groups(request)
        start = request.num_scheduled
        end = request.num_scheduled = start + size
        chunks.append(
            Chunk(
                request_id=request.id,
                token_ids=request.token_ids(start, end),
                start_pos=start,
                groups=groups,
                sampling=request.sampling if end == request.num_tokens else None,
                prompt_targets=self._prompt_targets(request, start, end),
                prompt_top=request.sampling.prompt_logprobs or 0,
            )
        )

    @staticmethod
    def _prompt_targets(request: Request, start: int, end: int) -> list[int]:
        """The prompt tokens that rows [start, end) predict, when the request wants prompt log-probabilities
        it does not have yet for some of them."""
        last = min(end + 1, len(request.prompt_token_ids))
        if request.sampling.prompt_logprobs is None or last <= len(request.prompt_logprobs):
            return []
        return request.prompt_token_ids[start + 1 : last]

    def _make_room(self, request: Request, now: float) -> bool:
        """Make sure the KV block of the request's next position is reserved, preempting if needed.
        False when the request itself was preempted or must wait a tick."""
        position = request.num_scheduled
        while not self.placement.covers(request.block_tables, position):
            if self.placement.extend(request.first_group, request.block_tables, position):
                self.tables_changed[request.id] = request
                continue
            group = self.layout.group_of(request.first_group, position)
            victims = [r for r in self.running if not r.in_flight and self._holds_blocks(r, group)]
            if not victims:
                return False  # the holders all have work in the pipeline: try again next tick
            victim = max(victims, key=lambda r: self.priority.key(r, now))
            self._preempt(victim)
            if victim is request:
                return False
        return True

    @staticmethod
    def _holds_blocks(request: Request, group: int) -> bool:
        shard = group - request.first_group
        return 0 <= shard < len(request.block_tables) and bool(request.block_tables[shard])

    def _preempt(self, request: Request) -> None:
        self.placement.free(request.first_group, request.block_tables, request.max_len)
        request.preempt()
        self.running.remove(request)
        self.waiting.append(request)
        self.released.append(request.id)
        self.tables_changed.pop(request.id, None)

    def finish(self, request: Request) -> None:
        """Forget a finished (or aborted) request and free its blocks; the tables stay, for reporting."""
        if request in self.waiting:
            self.waiting.remove(request)
            return
        self.running.remove(request)
        self.placement.free(request.first_group, request.block_tables, request.max_len)
        self.released.append(request.id)
        self.tables_changed.pop(request.id, None)
