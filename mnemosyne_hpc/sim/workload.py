"""Request streams for the simulator from a published trace: the Azure LLM inference traces of 2023
(Patel et al., Splitwise, ISCA 2024; `TIMESTAMP,ContextTokens,GeneratedTokens` per request), and the
same stream with a share of its requests turned into long ones.

The traces' prompts are short (the conversation trace's longest is 14k tokens). `with_long_prompts` keeps
every arrival time and output length and gives a seeded share of the requests a prompt drawn
log-uniformly between two lengths, so that long requests arrive among the short ones as often as the
share says.
"""

from __future__ import annotations

import csv
import datetime
import math
import random
from pathlib import Path

from mnemosyne_hpc.sim.simulator import Arrival


def azure_trace(path: Path, seconds: float | None = None) -> list[Arrival]:
    """The trace's requests in order, arrival times in seconds from the first one; with `seconds`, only
    those arriving within that many seconds of it."""
    arrivals, first = [], None
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            # seven fractional digits: datetime reads at most six
            at = datetime.datetime.fromisoformat(row["TIMESTAMP"][:26])
            first = first or at
            time = (at - first).total_seconds()
            if seconds is not None and time > seconds:
                break
            arrivals.append(Arrival(time, int(row["ContextTokens"]), int(row["GeneratedTokens"])))
    return arrivals


def with_long_prompts(
    arrivals: list[Arrival], share: float, shortest: int, longest: int, seed: int = 0
) -> tuple[list[Arrival], list[int]]:
    """`arrivals` with round(share × len(arrivals)) of them, chosen at random (at least one when share > 0),
    given a prompt of log-uniform length in [shortest, longest]; also the indices of those requests."""
    rng = random.Random(seed)
    count = max(round(share * len(arrivals)), 1 if share > 0 else 0)
    chosen = sorted(rng.sample(range(len(arrivals)), count))
    mixed = list(arrivals)
    for i in chosen:
        tokens = round(math.exp(rng.uniform(math.log(shortest), math.log(longest))))
        mixed[i] = Arrival(arrivals[i].time, tokens, arrivals[i].max_tokens)
    return mixed, chosen
