"""Rank 0 owns the requests: each step, the scheduler forms a plan, the executor runs it on every
rank, and the sampled tokens update the requests."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from mnemosyne_hpc.config import Config
from mnemosyne_hpc.engine.detokenizer import TextOutput
from mnemosyne_hpc.engine.executor import Executor, Sampled
from mnemosyne_hpc.engine.kv_cache import KVPlacement
from mnemosyne_hpc.engine.plan import Chunk, MicroBatch, StepPlan
from mnemosyne_hpc.engine.request import Request, RequestError, SamplingParams
from mnemosyne_hpc.engine.runner import ModelRunner
from mnemosyne_hpc.engine.sampler import FAILED, token_logprob
from mnemosyne_hpc.engine.scheduler import Scheduler
from mnemosyne_hpc.perf.model import PerfModel


@dataclass
class StepOutput:
    """What one step did: the requests that got a token (finished ones included), and those that
    finished (stopped, reached their length, were aborted, or failed)."""

    sampled: list[Request] = field(default_factory=list)
    finished: list[Request] = field(default_factory=list)


class Engine:
    def __init__(
        self,
        cfg: Config,
        runner: ModelRunner,
        tokenizer=None,
        perf_model: PerfModel | None = None,
        record_logits: bool = False,
        clock=time.perf_counter,
        executor: Executor | None = None,
    ):
        """`clock` and `executor` are the simulator's seams (`mnemosyne_hpc/sim/`): a virtual clock, and an
        executor that runs no model but advances that clock by a step's time."""
        self.cfg, self.runner, self.tokenizer, self.perf_model = cfg, runner, tokenizer, perf_model
        self.args = runner.args
        self.max_model_len = cfg.cache.max_model_len
        self.clock = clock
        self.executor = executor or Executor(runner)
        self.placement = KVPlacement(runner.layout, runner.num_blocks, cfg.cache.block_size, cfg.cache.prefix_caching)
        self.scheduler = Scheduler(cfg.scheduler, self.placement, runner.ctx.num_stages, perf_model, clock)
        self.requests: dict[int, Request] = {}
        self.record_logits = record_logits
        self.logits: dict[int, list] = {}  # request id → logits of each sampled token (record_logits)
        self._ids = itertools.count()
        self.last_plan: StepPlan | None = None
        # micro-batches now in stages 1 … P−1, newest first
        self.in_flight: list[MicroBatch] = [[] for _ in range(runner.ctx.num_stages - 1)]

    def add_request(
        self, prompt_token_ids: list[int], sampling: dict | None = None, arrival: float | None = None
    ) -> int:
        """Queue a request; raises RequestError (nothing queued) when its input is bad. Text is
        tokenised by the front ends (`serving/inputs.py`), not on this thread."""
        params = SamplingParams.from_request(self.cfg.sampling, sampling)
        return self.enqueue(self._checked(prompt_token_ids), params, arrival)

    def enqueue(self, token_ids: list[int], params: SamplingParams, arrival: float | None = None) -> int:
        """Queue a request whose token ids are known to be good (checked, or a simulator's); raises
        RequestError when it can never fit."""
        if len(token_ids) >= self.max_model_len:
            raise RequestError(
                f"prompt has {len(token_ids)} tokens; cache.max_model_len = {self.max_model_len} "
                "leaves no room to generate"
            )
        max_len = min(len(token_ids) + params.max_tokens, self.max_model_len)
        blocks = self.placement.blocks_needed(max_len)
        if blocks > self.placement.blocks_per_group:
            raise RequestError(
                f"request needs {blocks} KV blocks in one KVP group, a group holds "
                f"{self.placement.blocks_per_group}; shorten it or enlarge cache.kv_memory_gib"
            )
        request = Request(
            id=next(self._ids),
            prompt_token_ids=token_ids,
            sampling=params,
            max_len=max_len,
            arrival=self.clock() if arrival is None else arrival,
            output=TextOutput(self.tokenizer, params.stop) if self.tokenizer is not None else None,
            prompt_logprobs=[None] if params.prompt_logprobs is not None else [],  # the first token has none
        )
        self.requests[request.id] = request
        self.scheduler.add(request)
        return request.id

    def _checked(self, prompt_token_ids) -> list[int]:
        if not isinstance(prompt_token_ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt_token_ids
        ):
            raise RequestError("prompt_token_ids must be a list of integers")
        if not prompt_token_ids:
            raise RequestError("empty prompt")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.args.vocab_size]
        if bad:
            raise RequestError(f"token id {bad[0]} outside the vocabulary [0, {self.args.vocab_size})")
        return list(prompt_token_ids)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> StepOutput:
        """Run one pipeline tick on every rank."""
        stages = [self.scheduler.schedule()] + self.in_flight
        released, changed = self.scheduler.take_changes()
        tables = {r.id: (r.first_group, [list(t) for t in r.block_tables]) for r in changed}
        plan = StepPlan(stages=stages, block_tables=tables, released=released, return_logits=self.record_logits)
        self.last_plan = plan
        results = self.executor.run(plan)
        self.in_flight = stages[:-1]
        now = self.clock()
        out = StepOutput()
        for chunk in plan.leaving:
            request = self.requests[chunk.request_id]
            request.num_computed += len(chunk.token_ids)
            self.scheduler.computed(request)
            if chunk.logprob_rows:
                self._take_logprobs(request, chunk, results[chunk.request_id])
        for chunk in plan.sampled:
            request, result = self.requests[chunk.request_id], results[chunk.request_id]
            if result.token == FAILED:  # its sampling raised on the last stage: this request ends, the others go on
                request.finish_reason = "error"
                out.finished.append(self._finish(request, now))
                continue
            request.output_token_ids.append(result.token)
            request.token_times.append(now)
            out.sampled.append(request)
            if self.record_logits:
                self.logits.setdefault(request.id, []).append(result.logits)
            if self._check_finished(request, result.token):
                out.finished.append(self._finish(request, now))
        for chunk in plan.leaving:  # aborted while in the pipeline: finished once nothing of it is left there
            request = self.requests.get(chunk.request_id)
            if request is not None and request.finish_reason == "abort" and not request.in_flight:
                out.finished.append(self._finish(request, now))
        return out

    @staticmethod
    def _take_logprobs(request: Request, chunk: Chunk, result: Sampled) -> None:
        """Keep the prompt log-probabilities the request lacks, and its sampled token's (a failed sample's
        row is dropped: the request ends)."""
        params, rows = request.sampling, result.logprobs
        for position, row in enumerate(rows[: len(chunk.prompt_targets)], chunk.start_pos + 1):
            if position == len(request.prompt_logprobs):
                request.prompt_logprobs.append(token_logprob(row, params.prompt_logprobs))
        if len(rows) > len(chunk.prompt_targets) and result.token != FAILED:
            request.output_logprobs.append(token_logprob(rows[-1], params.logprobs))

    def abort(self, request_id: int) -> Request | None:
        """Stop a request (a client went away) with reason "abort": returned finished now if nothing of
        it is in the pipeline, else by the step that sees the last of it leave."""
        request = self.requests.get(request_id)
        if request is None or request.finish_reason is not None:
            return None
        request.finish_reason = "abort"
        return None if request.in_flight else self._finish(request, self.clock())

    def _finish(self, request: Request, now: float) -> Request:
        request.finish_time = now
        if request.output is not None:
            request.output.close()
        self.scheduler.finish(request)
        return self.requests.pop(request.id)

    def keep_alive(self) -> None:
        """An empty plan: the other ranks' wait for the next plan starts over (parallel.timeout_s)."""
        self.executor.keep_alive()

    def _check_finished(self, request: Request, token: int) -> bool:
        params = request.sampling
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.args.eos_token_ids):
            request.finish_reason = "stop"
        elif request.num_tokens >= request.max_len:
            request.finish_reason = "length"
        if request.output is not None and request.output.add(token, last=request.finish_reason is not None):
            request.finish_reason = "stop"  # a stop string: the text ends before it
        return request.finish_reason is not None

    def shutdown(self) -> None:
        """The last plan: every rank stops. Then the engine lets go of this rank's model and process
        groups, which must be collected before the interpreter exits (runtime._leave) even where the
        engine itself lives on (a web framework's caches keep the server's handlers, and with them the
        engine)."""
        self.executor.shutdown()
        self.executor = self.runner = None
