"""Offline batch generation: JSONL prompts in, JSONL results out.

    mpirun -n 3 python -m mnemosyne_hpc.generate parallel.tp=3 generate.input=prompts.jsonl

Each input line: {"prompt": "..."} or {"prompt_token_ids": [...]}, plus any sampling field
(temperature, top_k, top_p, max_tokens, seed, stop, stop_token_ids, ignore_eos, logprobs,
prompt_logprobs). Each output line, in input order: {"index", "token_ids", "text", "finish_reason",
"ttft_s", "tbt_s", "kvp_groups", "kv_blocks" (per KVP group), "preemptions", ...}, with "logprobs" and
"prompt_logprobs" where asked for, or {"index", "error"} for a request that was
rejected; the others still run. `generate.metrics` gets each request's latency record (arrival,
TTFT, every TBT, finish, preemptions), and the run's aggregates are printed at the end.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict

from tqdm import tqdm

from mnemosyne_hpc.config import Config, compose_command_line
from mnemosyne_hpc.engine.engine import Engine
from mnemosyne_hpc.engine.metrics import format_summary, request_record, summarize
from mnemosyne_hpc.engine.request import Request, RequestError
from mnemosyne_hpc.runtime import run
from mnemosyne_hpc.serving.inputs import InputProcessor

REQUEST_FIELDS = ("prompt", "prompt_token_ids")


def read_requests(path: str) -> list[dict | str]:
    """Each line parsed to a dict, or an error message for that line."""
    entries = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                entries.append(entry if isinstance(entry, dict) else f"line {number}: not a JSON object")
            except json.JSONDecodeError as e:
                entries.append(f"line {number}: malformed JSON: {e}")
    return entries


def generate(engine: Engine, entries: list, progress: bool = True) -> tuple[list[dict], list[dict]]:
    """Results in input order, and the latency record of every request that ran."""
    results: list[dict] = [{} for _ in entries]
    records: list[dict] = []
    index_of = {}
    inputs = InputProcessor(engine.tokenizer)
    start = time.perf_counter()
    for index, entry in enumerate(entries):
        try:
            if isinstance(entry, str):
                raise RequestError(entry)
            sampling = {k: v for k, v in entry.items() if k not in REQUEST_FIELDS}
            token_ids = inputs.prompt_tokens(entry.get("prompt"), entry.get("prompt_token_ids"))
            request_id = engine.add_request(token_ids, sampling)
            index_of[request_id] = index
        except RequestError as e:
            results[index] = {"index": index, "error": str(e)}
    with tqdm(total=len(index_of), desc="requests", unit="req", disable=not progress, file=sys.stderr) as bar:
        while engine.has_unfinished:
            for request in engine.step().finished:
                results[index_of[request.id]] = {
                    "index": index_of[request.id],
                    "prompt_tokens": len(request.prompt_token_ids),
                    "cached_tokens": request.cached_tokens,
                    "token_ids": request.output_token_ids,
                    "text": request.text,
                    "finish_reason": request.finish_reason,
                    "ttft_s": request.ttft_s,
                    "tbt_s": request.tbt_s,
                    "kvp_groups": list(range(request.first_group, request.first_group + len(request.block_tables))),
                    "kv_blocks": [len(table) for table in request.block_tables],  # per KVP group
                    "preemptions": request.preemptions,
                    **logprob_fields(request),
                }
                records.append({"index": index_of[request.id], **request_record(request, start)})
                bar.update(1)
    return results, records


def logprob_fields(request: Request) -> dict:
    """The log-probabilities the request asked for, as JSON: {"token_id", "logprob", "top": [[id, logprob]]}."""
    fields = {}
    if request.sampling.logprobs is not None:
        fields["logprobs"] = [asdict(x) for x in request.output_logprobs]
    if request.sampling.prompt_logprobs is not None:
        fields["prompt_logprobs"] = [x and asdict(x) for x in request.prompt_logprobs]
    return fields


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main(argv: list[str] | None = None) -> None:
    cfg: Config = compose_command_line(argv)
    try:
        entries = read_requests(cfg.generate.input)
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

    def leader(engine: Engine) -> None:
        results, records = generate(engine, entries, cfg.generate.progress)
        write_jsonl(cfg.generate.output, results)
        if cfg.generate.metrics:
            write_jsonl(cfg.generate.metrics, records)
        failed = sum("error" in r for r in results)
        print(f"wrote {len(results)} results to {cfg.generate.output} ({failed} rejected)", file=sys.stderr)
        print(format_summary(summarize(records, cfg.scheduler.tbt_slo_ms / 1000)), file=sys.stderr)

    run(cfg, leader)


if __name__ == "__main__":
    main()
