"""Runs under mpirun: one engine, a list of cases, rank 0 saves tokens, logits, step shapes and times.

    mpirun -n N python tests/engine_worker.py SPEC.json OUT.pt

SPEC: {"overrides": [...hydra overrides...], "cases": [{"name", "chunk_size", "scheduler": {field: value},
"warm_prefix_cache": bool, "requests": [{"prompt_token_ids", "arrival_step", sampling fields...}]}]}.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

import torch

from mnemosyne_hpc.config import compose
from mnemosyne_hpc.engine.engine import Engine
from mnemosyne_hpc.runtime import run


def phase(chunk, prompt_len: int) -> str:
    if chunk.start_pos >= prompt_len:
        return "decode"
    return "first-chunk" if chunk.start_pos == 0 else "next-chunk"


def run_case(engine: Engine, case: dict) -> dict:
    # Scheduling is rank 0's decision alone: followers never see these.
    for key, value in {"chunk_size": case.get("chunk_size", 0), **case.get("scheduler", {})}.items():
        setattr(engine.scheduler.cfg, key, value)
    if not case.get("warm_prefix_cache"):  # every case starts cold unless it asks for what earlier ones cached
        engine.placement.clear_cache()
    engine.logits.clear()
    pending = sorted(enumerate(case["requests"]), key=lambda item: item[1].get("arrival_step", 0))
    index_of, outputs, step_phases, stage_requests, stage_groups, chunk_lengths, step = {}, {}, [], [], [], [], 0
    arrivals, step_starts = {}, []  # the engine clock when each request arrived and each step began
    while pending or engine.has_unfinished:
        while pending and pending[0][1].get("arrival_step", 0) <= step:
            index, spec = pending.pop(0)
            sampling = {k: v for k, v in spec.items() if k not in ("prompt_token_ids", "arrival_step")}
            request_id = engine.add_request(prompt_token_ids=spec["prompt_token_ids"], sampling=sampling)
            index_of[request_id], arrivals[index] = index, engine.requests[request_id].arrival
        if engine.has_unfinished:
            step_starts.append(engine.clock())
            live = engine.scheduler.running + list(engine.scheduler.waiting)
            prompt_len = {r.id: len(r.prompt_token_ids) for r in live}
            for request in engine.step().finished:
                outputs[index_of[request.id]] = {
                    "token_ids": request.output_token_ids,
                    "logits": torch.stack(engine.logits.pop(request.id)),
                    "preemptions": request.preemptions,
                    "cached_tokens": request.cached_tokens,
                    "logprobs": [asdict(x) for x in request.output_logprobs],
                    "prompt_logprobs": [x and asdict(x) for x in request.prompt_logprobs],
                }
            step_phases.append(
                {index_of[c.request_id]: phase(c, prompt_len[c.request_id]) for c in engine.last_plan.entering}
            )
            chunk_lengths.append({index_of[c.request_id]: len(c.token_ids) for c in engine.last_plan.entering})
            stage_requests.append([[index_of[c.request_id] for c in batch] for batch in engine.last_plan.stages])
            stage_groups.append(
                [{index_of[c.request_id]: list(c.groups) for c in batch} for batch in engine.last_plan.stages]
            )
        step += 1
    step_starts.append(engine.clock())  # the end of the last step
    return {
        "outputs": [outputs[i] for i in range(len(case["requests"]))],
        "step_phases": step_phases,
        "stage_requests": stage_requests,
        "stage_groups": stage_groups,
        "chunk_lengths": chunk_lengths,
        "arrivals": [arrivals[i] for i in range(len(case["requests"]))],
        "step_starts": step_starts,
    }


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    cfg = compose(spec["overrides"])

    def leader(engine: Engine) -> None:
        torch.save({case["name"]: run_case(engine, case) for case in spec["cases"]}, sys.argv[2])

    run(cfg, leader, record_logits=True)


if __name__ == "__main__":
    main()
