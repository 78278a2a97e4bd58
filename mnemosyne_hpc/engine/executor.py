"""The control plane: how rank 0's step plan reaches every rank, how hidden states pass between
pipeline stages, and how sampled tokens come back to rank 0. Collectives only.

Each tick, a stage first sends on what it computed last tick (the next stage runs that micro-batch
now), then receives its own input from the previous stage, computes, and keeps the output for the
next tick. Every KVP group's sampler (last stage, TP rank 0) sends rank 0 the tokens of the requests
whose first group it is.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from mnemosyne_hpc.engine.plan import StepPlan
from mnemosyne_hpc.engine.runner import ModelRunner

PLAN_BUFFER_BYTES = 1 << 14
_LENGTH_BYTES = 8


def broadcast_plan(plan: Optional[StepPlan], group) -> StepPlan:
    """Rank 0's plan to every rank: its length and pickle in one fixed-size broadcast, and a second
    broadcast only for the part of a larger plan that does not fit. Per step: one collective's latency."""
    if dist.get_world_size(group) == 1:
        return plan
    packed = b""
    if plan is not None:
        data = pickle.dumps(plan)
        packed = len(data).to_bytes(_LENGTH_BYTES, "little") + data
    buffer = torch.empty(PLAN_BUFFER_BYTES, dtype=torch.uint8)
    head = packed[:PLAN_BUFFER_BYTES]
    if head:
        buffer[: len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
    dist.broadcast(buffer, src=0, group=group)
    received = buffer.numpy().tobytes()
    end = _LENGTH_BYTES + int.from_bytes(received[:_LENGTH_BYTES], "little")
    if end > PLAN_BUFFER_BYTES:
        rest = torch.empty(end - PLAN_BUFFER_BYTES, dtype=torch.uint8)
        if plan is not None:
            rest[:] = torch.frombuffer(bytearray(packed[PLAN_BUFFER_BYTES:]), dtype=torch.uint8)
        dist.broadcast(rest, src=0, group=group)
        received += rest.numpy().tobytes()
    return plan if plan is not None else pickle.loads(received[_LENGTH_BYTES:end])


@dataclass
class Sampled:
    """What a tick computed for one request: its next token (None where the chunk samples none), the
    logits it was sampled from, and its rows of log-probabilities (`ModelRunner.logprobs`)."""

    token: Optional[int]
    logits: Optional[torch.Tensor] = None  # [vocab] float32, when the plan asked for logits
    logprobs: Optional[torch.Tensor] = None


class Executor:
    """Runs step plans on this rank's `runner`: rank 0 calls `run` with each plan, every other rank
    calls `follow` once."""

    def __init__(self, runner: ModelRunner):
        self.runner, self.ctx = runner, runner.ctx
        self._output: torch.Tensor | None = None  # hidden states computed last tick, for the next stage

    def run(self, plan: StepPlan) -> dict[int, Sampled]:
        """Rank 0: send `plan` to every rank and run its part here; the tokens sampled for
        `plan.sampled`, by request id."""
        broadcast_plan(plan, self.ctx.cpu_group)
        return self.execute(plan)

    def follow(self) -> None:
        """Every rank but 0: run each plan rank 0 sends until it says shut down. A plan with no stages
        is rank 0 keeping in touch while it has no work."""
        while not (plan := broadcast_plan(None, self.ctx.cpu_group)).shutdown:
            if plan.stages:
                self.execute(plan)

    def shutdown(self) -> None:
        broadcast_plan(StepPlan(shutdown=True), self.ctx.cpu_group)

    def keep_alive(self) -> None:
        """An empty plan: the other ranks' wait for the next plan starts over (parallel.timeout_s)."""
        broadcast_plan(StepPlan(), self.ctx.cpu_group)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> dict[int, Sampled]:
        """This rank's stage of one tick; on rank 0, the sampled tokens of the whole tick."""
        ctx, runner = self.ctx, self.runner
        runner.update_block_tables(plan.block_tables, plan.released)
        send = None
        if self._output is not None:
            send = dist.isend(self._output, dst=ctx.next_rank)
            self._output = None
        batch = [c for c in plan.stages[ctx.stage] if ctx.kvp_rank in c.groups]
        sampled: dict[int, Sampled] = {}
        if batch:
            if ctx.first_stage:
                x = torch.tensor([t for c in batch for t in c.token_ids], device=ctx.device)
            else:
                x = torch.empty(
                    sum(len(c.token_ids) for c in batch), runner.args.hidden_size, dtype=runner.dtype, device=ctx.device
                )
                dist.recv(x, src=ctx.prev_rank)
            hidden = runner.forward(batch, x)
            if ctx.last_stage:
                sampled = self._sample(batch, hidden, plan)
            else:
                self._output = hidden
        if send is not None:
            send.wait()
        return self._gather(plan, sampled)

    def _sample(self, batch, hidden: torch.Tensor, plan: StepPlan) -> dict[int, Sampled]:
        group, sampled = self.ctx.kvp_rank, {}
        if chunks := plan.sampled_by(group):
            tokens, logits = self.runner.sample(batch, hidden, chunks)
            rows = logits.cpu() if plan.return_logits else [None] * len(chunks)
            sampled = {c.request_id: Sampled(t, row) for c, t, row in zip(chunks, tokens, rows)}
        if chunks := plan.with_logprobs_by(group):
            tokens = {i: s.token for i, s in sampled.items()}
            _attach_logprobs(
                sampled, chunks, self.runner.logprobs(batch, hidden, chunks, tokens, plan.top_logprobs).cpu()
            )
        return sampled

    def _gather(self, plan: StepPlan, sampled: dict[int, Sampled]) -> dict[int, Sampled]:
        """Every sampler sends rank 0 (request id, token) rows, and the logits if the plan asks; rank 0
        knows from the plan how many rows each group's sampler sends."""
        ctx = self.ctx
        if ctx.rank != 0:
            if ctx.is_sampler and sampled:
                chunks = plan.sampled_by(ctx.kvp_rank)
                if chunks:
                    dist.send(
                        torch.tensor([[c.request_id, sampled[c.request_id].token] for c in chunks]),
                        dst=0,
                        group=ctx.cpu_group,
                    )
                if chunks and plan.return_logits:
                    dist.send(torch.stack([sampled[c.request_id].logits for c in chunks]), dst=0, group=ctx.cpu_group)
                if chunks := plan.with_logprobs_by(ctx.kvp_rank):
                    dist.send(torch.cat([sampled[c.request_id].logprobs for c in chunks]), dst=0, group=ctx.cpu_group)
            return {}
        for group, sampler in enumerate(ctx.sampler_ranks):
            if sampler == 0:
                continue
            if rows := len(plan.sampled_by(group)):
                pairs = torch.empty(rows, 2, dtype=torch.long)
                dist.recv(pairs, src=sampler, group=ctx.cpu_group)
                logits = [None] * rows
                if plan.return_logits:
                    logits = torch.empty(rows, self.runner.args.vocab_size)
                    dist.recv(logits, src=sampler, group=ctx.cpu_group)
                sampled.update({i: Sampled(t, row) for (i, t), row in zip(pairs.tolist(), logits)})
            if chunks := plan.with_logprobs_by(group):
                rows = torch.empty(sum(c.logprob_rows for c in chunks), 2 + 2 * plan.top_logprobs, dtype=torch.float64)
                dist.recv(rows, src=sampler, group=ctx.cpu_group)
                _attach_logprobs(sampled, chunks, rows)
        return sampled


def _attach_logprobs(sampled: dict[int, Sampled], chunks, rows: torch.Tensor) -> None:
    """Each chunk's `logprob_rows` of `rows` (the chunks' rows in order) to its request's entry."""
    for c, part in zip(chunks, rows.split([c.logprob_rows for c in chunks])):
        sampled.setdefault(c.request_id, Sampled(None)).logprobs = part
