"""Start-up shared by every entry point: join the ranks, check they agree, load the model, run.

Rank 0 calls `leader(engine)`; every other rank follows rank 0's step plans. Any failure ends
every rank with a non-zero exit and a message, never a hang: peers see a closed connection or
hit `parallel.timeout_s`.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from mnemosyne_hpc.auto_config import settle
from mnemosyne_hpc.config import Config, config_digest, resolve_cache_dir
from mnemosyne_hpc.cpu_allocator import retain_freed_memory
from mnemosyne_hpc.distributed.launch import cpu_threads, discover_rank, fail, init_distributed, ranks_by_host
from mnemosyne_hpc.distributed.mesh import ParallelContext, build_mesh
from mnemosyne_hpc.engine.engine import Engine
from mnemosyne_hpc.engine.executor import Executor
from mnemosyne_hpc.engine.runner import ModelRunner, kv_pool_blocks
from mnemosyne_hpc.model.args import ModelArgs
from mnemosyne_hpc.model.gguf import convert_gguf, converted_dir
from mnemosyne_hpc.perf.calibrate import load_or_profile
from mnemosyne_hpc.perf.model import PerfModel

# Called on every rank once the model is loaded: rank 0's performance model (None on the others).
PerfModelSource = Callable[[Config, ModelRunner], PerfModel | None]


class ModelDirError(ValueError):
    pass


def check_model_path(cfg: Config) -> Path:
    """Fail before any rank joins when the model path cannot work."""
    path = Path(os.path.expanduser(cfg.model.path))
    if not path.exists():
        raise ModelDirError(f"model.path {path} does not exist")
    if path.is_file() and path.suffix != ".gguf":
        raise ModelDirError(f"model.path {path} is a file but not .gguf; give a Hugging Face directory or a GGUF file")
    if path.is_dir():
        config = path / "config.json"
        if not config.exists():
            raise ModelDirError(f"model directory {path} has no config.json")
        try:
            ModelArgs.from_hf_config(json.loads(config.read_text()))
        except (ValueError, KeyError) as e:
            raise ModelDirError(f"model directory {path}: bad config.json: {e!r}") from None
    return path


def _model_dir(cfg: Config, path: Path, rank: int) -> Path:
    if path.is_dir():
        return path
    cache_dir = resolve_cache_dir(cfg)
    if rank == 0:
        convert_gguf(path, cache_dir)
    dist.barrier()
    converted = converted_dir(path, cache_dir)
    if not (converted / "config.json").exists():
        raise ModelDirError(
            f"rank 0 converted {path} into {converted}, which this host cannot see: ranks on several hosts "
            "need model.path and model.cache_dir (MNEMOSYNE_CACHE) on a file system every node shares"
        )
    return converted


def _check_same_config(cfg: Config, group) -> None:
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, config_digest(cfg), group=group)
    if len(set(digests)) != 1:
        differing = [r for r, d in enumerate(digests) if d != digests[0]]
        raise RuntimeError(
            f"ranks {differing} composed a different config from rank 0; pass the same overrides to every rank"
        )


def _settle(cfg: Config, args: ModelArgs, model_dir: Path, ctx: ParallelContext) -> Config:
    """The config with its model- and machine-dependent defaults settled (`auto_config.py`). Every rank
    settles (a bad value fails everywhere with the same message), then takes rank 0's result: ranks on
    machines with different CPUs could choose differently."""

    def kv_blocks(dtype: torch.dtype) -> int:
        return kv_pool_blocks(cfg.cache, args, ctx.tp_size, ctx.num_stages, dtype)

    settled, notes = settle(cfg, args, model_dir, ctx.device, kv_blocks)
    chosen = [settled]
    dist.broadcast_object_list(chosen, src=0, group=ctx.cpu_group)
    if ctx.rank == 0:
        for note in notes:
            print(f"[rank 0] {note}", file=sys.stderr, flush=True)
    return chosen[0]


def load_tokenizer(model_dir: Path):
    if not (model_dir / "tokenizer.json").exists() and not (model_dir / "tokenizer.model").exists():
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _raised_in_collective(e: BaseException) -> bool:
    return any(f"torch{os.sep}distributed" in frame.filename for frame in traceback.extract_tb(e.__traceback__))


def run(
    cfg: Config,
    leader: Callable[[Engine], None],
    perf_model: PerfModelSource = load_or_profile,
    stop_signals: tuple[signal.Signals, ...] = (),
    **engine_options,
) -> None:
    """Start this rank; rank 0 calls `leader(engine)`. The engine's performance model comes from
    `perf_model` (by default the stored profile, or one taken now, where the scheduler uses one).
    `stop_signals` are the leader's to handle: ranks other than 0 ignore them from the start (rank 0
    alone decides what a signal means; a launcher forwards a terminal's Ctrl-C, or a scheduler's
    SIGTERM, to every rank), and rank 0 keeps those that arrive while it starts (`stopped_at_start`)
    for its leader, which then shuts every rank down: a job stopped while it loads ends cleanly."""
    try:
        _run_rank(cfg, leader, perf_model, stop_signals, engine_options)
    except KeyboardInterrupt:
        fail("interrupted")
    except Exception as e:  # noqa: BLE001 - every failure ends this rank loudly; peers follow
        if _raised_in_collective(e) and dist.is_initialized():
            placement = ranks_by_host()
            fail(
                f"lost contact with a peer rank (it exited, or was silent for parallel.timeout_s = "
                f"{cfg.parallel.timeout_s:g}s; {placement}): {type(e).__name__}: {e}"
            )
        fail(f"{type(e).__name__}: {e}")
    _leave()


_STOPPED_AT_START: list[signal.Signals] = []


def stopped_at_start() -> list[signal.Signals]:
    """The stop signals rank 0 received before its leader ran (see `run`)."""
    return list(_STOPPED_AT_START)


def _keep_for_the_leader(signum, frame) -> None:
    if not _STOPPED_AT_START:  # os.write: this thread may hold sys.stderr's lock
        os.write(2, f"[rank 0] {signal.Signals(signum).name} while starting: every rank stops once up\n".encode())
    _STOPPED_AT_START.append(signal.Signals(signum))


def _run_rank(cfg, leader, perf_model, stop_signals, engine_options) -> None:
    """`run`'s work; what this rank built (mesh, model, engine) is left behind when it returns."""
    handler = _keep_for_the_leader if discover_rank().rank == 0 else signal.SIG_IGN
    for signum in stop_signals:
        signal.signal(signum, handler)
    path = check_model_path(cfg)
    info = init_distributed(cfg.parallel.device, cfg.parallel.backend, cfg.parallel.timeout_s)
    on_gpu = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    if device.type == "cpu":
        retain_freed_memory()
        torch.set_num_threads(cpu_threads(info))
    ctx = build_mesh(cfg.parallel, device)
    _check_same_config(cfg, ctx.cpu_group)
    model_dir = _model_dir(cfg, path, info.rank)
    args = ModelArgs.from_dir(model_dir)
    cfg = _settle(cfg, args, model_dir, ctx)
    runner = ModelRunner(cfg, ctx, model_dir, args)
    model = perf_model(cfg, runner)
    if info.rank == 0:
        engine = Engine(cfg, runner, load_tokenizer(model_dir), model, **engine_options)
        leader(engine)
        engine.shutdown()
    else:
        Executor(runner).follow()
        print(f"[rank {info.rank}] rank 0 shut the job down; exiting", file=sys.stderr, flush=True)


def _leave() -> None:
    """Destroy the process groups, then collect what referred to them (mesh, model, engine), so that
    their destructors join gloo's worker threads while the interpreter still runs. Left to interpreter
    shutdown, a worker releasing the tensors of its last collective takes the GIL there, which ends the
    thread (pthread_exit) inside a C++ destructor: std::terminate, "terminate called without an active
    exception", exit status 134."""
    dist.destroy_process_group()
    gc.collect()
