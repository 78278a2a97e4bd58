"""Request streams from the Azure LLM traces, and the same stream with a share of long prompts."""

from __future__ import annotations

import math

import pytest

from mnemosyne_hpc.sim.simulator import Arrival
from mnemosyne_hpc.sim.workload import azure_trace, with_long_prompts

TRACE = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:50.9951690,396,109
2023-11-16 18:15:51.2224670,879,55
2023-11-16 18:16:47.0000000,91,16
"""


def test_a_trace_gives_arrivals_in_seconds_from_its_first_request(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text(TRACE)
    arrivals = azure_trace(path)
    assert [(a.prompt_tokens, a.max_tokens) for a in arrivals] == [(374, 44), (396, 109), (879, 55), (91, 16)]
    assert [a.time for a in arrivals] == pytest.approx([0.0, 4.314579, 4.541877, 60.319410])
    assert len(azure_trace(path, seconds=60)) == 3


def test_a_share_of_requests_gets_long_prompts_and_keeps_its_arrival_and_output():
    arrivals = [Arrival(float(i), 100 + i, 10 + i) for i in range(1000)]
    mixed, chosen = with_long_prompts(arrivals, share=0.01, shortest=1_000_000, longest=10_000_000, seed=3)
    assert len(chosen) == 10 and mixed != arrivals
    for i, (before, after) in enumerate(zip(arrivals, mixed)):
        assert (after.time, after.max_tokens) == (before.time, before.max_tokens)
        if i in chosen:
            assert 1_000_000 <= after.prompt_tokens <= 10_000_000
        else:
            assert after == before
    lengths = sorted(mixed[i].prompt_tokens for i in chosen)
    assert math.log(lengths[-1] / lengths[0]) > 1  # spread over the range, not bunched
    assert with_long_prompts(arrivals, 0.01, 1_000_000, 10_000_000, seed=3) == (mixed, chosen)
    assert with_long_prompts(arrivals[:10], 0.001, 10, 20)[1] != []  # a positive share gets at least one
