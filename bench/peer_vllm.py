"""vLLM's side of bench/peers.py; runs in the vLLM environment (stdlib and vllm only).

    <vllm env>/bin/python bench/peer_vllm.py SPEC.json RESULT.json

Drives `LLMEngine.step()` itself and stamps each new token with `time.perf_counter()`, the way
bench/peers.py stamps the other systems.
"""

from __future__ import annotations

import json
import sys
import time


def main(spec_path: str, result_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = json.loads(open(spec_path).read())
    llm = LLM(
        spec["model_dir"],
        dtype="bfloat16",
        max_model_len=spec["max_model_len"],
        skip_tokenizer_init=True,
        enable_prefix_caching=False,
        max_num_batched_tokens=spec["max_num_batched_tokens"],
        gpu_memory_utilization=spec["memory_fraction"],
        seed=0,
    )
    engine = llm.llm_engine

    def run(requests: list[dict]) -> list[dict]:
        """Token times of each request, all submitted at once."""
        submitted = time.perf_counter()
        times: dict[str, list[float]] = {}
        tokens: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            params = SamplingParams(max_tokens=r["max_tokens"], temperature=0.0, ignore_eos=True)
            engine.add_request(str(i), TokensPrompt(prompt_token_ids=r["prompt_token_ids"]), params)
            times[str(i)] = []
        while engine.has_unfinished_requests():
            for output in engine.step():
                now = time.perf_counter()
                ids = output.outputs[0].token_ids
                times[output.request_id] += [now] * (len(ids) - len(times[output.request_id]))
                tokens[output.request_id] = list(ids)
        return [
            {"submitted": submitted, "token_times": times[str(i)], "token_ids": tokens[str(i)]}
            for i in range(len(requests))
        ]

    results = {name: [run(batch) for batch in batches] for name, batches in spec["runs"].items()}
    open(result_path, "w").write(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:3])
