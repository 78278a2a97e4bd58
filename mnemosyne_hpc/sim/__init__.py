"""A cluster simulator: the engine's own scheduler and request books on a virtual clock, with step times
from a performance model (or from a real run's measurements) instead of a model running.

- `clock.py`: the virtual clock.
- `executor.py`: the executor and runner stand-ins that let a real `Engine` step without a model.
- `step_time.py`: how long a step takes: a lock-step pipeline tick predicted per stage and KVP group,
  or a real run's measured durations replayed.
- `simulator.py`: the discrete-event loop over a request stream, and its metrics.
- `planner.py`: every layout of a GPU count checked for memory and simulated (`python -m mnemosyne_hpc.plan`).
- `workload.py`: request streams from the Azure LLM traces, with a share of long prompts mixed in.
"""
