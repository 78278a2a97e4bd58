"""The performance model of any TP × SPP × KVP layout of a model shape on a hardware profile.

One profile (`profiles/<name>.json`) serves every layout: it holds per-operation curves and figures,
each with its source, and `LayoutCost.perf_model` composes them into the `PerfModel` the scheduler and the
simulator use, for one pipeline stage of one KVP group:

- linear: one layer's projections, MLP and element-wise operations at this TP degree, from the measured
  layer of the reference model nearest in size, scaled by the ratio of weights (a layer's time is
  proportional to its weights both where it is memory-bound, few tokens, and where it is compute-bound),
  plus two TP all-reduces of the hidden states (measured, against bytes and ranks);
- attention: measured against query tokens × cached tokens where the profile has it (this machine's, from
  the engine's profiler: `perf/machine.py`), scaled to this model's heads; else derived (GPUs): a chunk of
  q queries over n cached tokens does 4·q·n·head_dim FLOPs per query head and reads n tokens of K and V per
  KV head, its time the larger of FLOPs at the profile's FlashAttention efficiency and bytes at its HBM
  efficiency, plus the causal part 2·q²·head_dim per head;
- KVP merge: measured against bytes where the profile has it; else each group's partial outputs and
  log-sum-exps sent around the k groups (k − 1 hops of the measured point-to-point curve, within a node
  or across nodes);
- SPP hand-over: a stage's hidden states to the next stage (point-to-point);
- LM head: measured with sampling where the profile has it, else the layer curve scaled to the head's weights;
- per step: the overhead, cost per sequence, kernel weights and wake after idle fitted to whole steps
  where the profile has them, else its stated overhead.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

from mnemosyne_hpc.distributed.mesh import stage_layers
from mnemosyne_hpc.model.args import ModelArgs
from mnemosyne_hpc.perf.model import AttentionFit, Curve, PerfModel

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
SHAPES_DIR = Path(__file__).resolve().parent / "shapes"
# Grid of tokens, query tokens and rows the curves are tabulated on, up to 16M: a whole multi-million-token
# prompt in one chunk (`scheduler.chunk_size=0`) gets its causal attention's q² from the grid, not a linear
# extension of its last two points.
POWERS_OF_TWO = [2**i for i in range(25)]
BF16 = 2  # bytes per weight, activation and KV element
GIB = 2**30


def load_hardware(name: str) -> dict:
    """A profile by name (`profiles/<name>.json`) or path."""
    path = Path(name).expanduser()
    return json.loads((path if path.suffix == ".json" else PROFILES_DIR / f"{name}.json").read_text())


def load_shape(name: str) -> ModelArgs:
    """A model shape without weights: a name from `shapes/` (llama3-8b, llama3-70b, llama3-405b), a
    Hugging Face config.json, or a directory holding one."""
    path = Path(name).expanduser()
    if path.is_dir():
        path = path / "config.json"
    elif path.suffix != ".json":
        path = SHAPES_DIR / f"{name}.json"
    return ModelArgs.from_hf_config(json.loads(path.read_text()))


def measured_curve(x: list, ms: list) -> Curve:
    """Seconds against x from a measured table in ms, proportional to x beyond the last point (bandwidth- or
    compute-bound there), not extended along the last two points' slope, which noise can make negative."""
    x, y = [float(v) for v in x], [v / 1000 for v in ms]
    return Curve(x + [x[-1] * 2**30], y + [y[-1] * 2**30])


def layer_weights(args: ModelArgs) -> int:
    """Weights of one decoder layer's projections and gated MLP."""
    h, d = args.hidden_size, args.head_dim
    return h * (args.num_heads + 2 * args.num_kv_heads) * d + args.num_heads * d * h + 3 * h * args.intermediate_size


@dataclass(frozen=True)
class Layout:
    tp: int
    spp: int
    kvp: int

    @property
    def gpus(self) -> int:
        return self.tp * self.spp * self.kvp

    def __str__(self) -> str:
        return f"TP{self.tp}×SPP{self.spp}×KVP{self.kvp}"


class Reference(NamedTuple):
    name: str  # the measured model's, as the profile lists it
    shape: dict
    scale: float  # a layer's weights here over the measured model's


@dataclass(frozen=True)
class LayoutCost:
    """Memory of one GPU of a layout, and its performance model."""

    hw: dict
    args: ModelArgs
    layout: Layout

    @cached_property
    def stage_layers(self) -> int:
        return len(stage_layers(self.args.num_layers, self.layout.spp, 0))  # the first stage is the largest

    @property
    def kv_heads(self) -> int:
        return max(1, self.args.num_kv_heads // self.layout.tp)

    @property
    def weight_bytes(self) -> float:
        """A GPU of the largest stage: its layers' shard, and the embedding or LM head shard (both at SPP 1)."""
        args, tp = self.args, self.layout.tp
        vocab = args.vocab_size * args.hidden_size * (2 if self.layout.spp == 1 else 1)
        return BF16 * (self.stage_layers * layer_weights(args) + vocab) / tp

    @property
    def kv_bytes_per_token(self) -> float:
        return 2 * self.stage_layers * self.kv_heads * self.args.head_dim * BF16

    @property
    def kv_capacity_bytes(self) -> float:
        """GPU memory left for the KV cache once weights and the activation reserve are placed."""
        hw = self.hw
        usable = hw["gpu_memory_gib"] * hw["memory_utilization"] - hw["activation_reserve_gib"]
        return usable * GIB - self.weight_bytes

    def kv_blocks(self, block_size: int) -> int:
        """KV blocks of `block_size` tokens that fit in a GPU's `kv_capacity_bytes` (per KVP group)."""
        return int(max(self.kv_capacity_bytes, 0) // (block_size * self.kv_bytes_per_token))

    def _collective(self, name: str, key: str) -> Curve:
        """A measured collective's seconds against message bytes."""
        table = self.hw["measured"][name][key]
        return measured_curve(table["bytes"], table["ms"])

    def _p2p(self, across_nodes: bool) -> Curve:
        return self._collective("send_recv", "inter_node" if across_nodes else "intra_node")

    @cached_property
    def _reference(self) -> Reference:
        """The measured model nearest in size (by a layer's weights)."""
        references = self.hw["measured"]["linear_layer"]

        def weights(shape: dict) -> int:
            h, heads = shape["n_embd"], shape["n_head"]
            d = h // heads
            return h * (heads + 2 * shape["n_kv_head"]) * d + heads * d * h + 3 * h * shape["n_expanded_embd"]

        ours = layer_weights(self.args)
        name = min(references, key=lambda m: abs(math.log(weights(references[m]["shape"]) / ours)))
        shape = references[name]["shape"]
        return Reference(name, shape, ours / weights(shape))

    def _table(self, kind: str) -> dict:
        """The reference model's measured `kind` at this TP degree."""
        name = self._reference.name
        tables = self.hw["measured"][kind][name]["tp"]
        if str(self.layout.tp) not in tables:
            raise ValueError(
                f"{self.hw['name']}: {kind} of {name} is measured at TP {', '.join(tables)}, not {self.layout.tp}"
            )
        return tables[str(self.layout.tp)]

    def _measured(self, kind: str) -> bool:
        """Whether the profile measured `kind` itself (this machine's profiles), not derived it (GPUs')."""
        return kind in self.hw["measured"]

    @cached_property
    def _layer(self) -> Curve:
        """The reference model's measured layer at this TP degree (seconds against tokens, unscaled)."""
        table = self._table("linear_layer")
        return measured_curve(table["tokens"], table["ms"])

    def linear_s(self, tokens: int) -> float:
        seconds = self._layer(tokens) * self._reference.scale
        if self.layout.tp > 1:
            all_reduce = self._collective("all_reduce", str(self.layout.tp))
            seconds += 2 * all_reduce(tokens * self.args.hidden_size * BF16)
        return seconds

    def lm_head_s(self, rows: int) -> float:
        """The measured LM head and sampling where the profile has them, else the layer curve scaled to the
        head's weights."""
        args, shape = self.args, self._reference.shape
        if self._measured("lm_head"):
            table = self._table("lm_head")
            scale = args.vocab_size * args.hidden_size / (shape["vocab_size"] * shape["n_embd"])
            return measured_curve(table["rows"], table["ms"])(rows) * scale
        return self._layer(rows) * self._reference.scale * args.vocab_size * args.hidden_size / layer_weights(args)

    def attention(self) -> AttentionFit:
        return self._measured_attention() if self._measured("attention") else self._derived_attention()

    def _measured_attention(self) -> AttentionFit:
        """The reference's measured curves (as the engine's profile holds them), scaled to this model: a
        decode by the KV it reads (KV heads × head size), a chunk by its query heads × head size."""
        args, shape, table = self.args, self._reference.shape, self._table("attention")
        kv = args.num_kv_heads * args.head_dim / (shape["n_kv_head"] * shape["head_dim"])
        queries = args.num_heads * args.head_dim / (shape["n_head"] * shape["head_dim"])
        return AttentionFit(
            table["queries"],
            [
                Curve(x, [(kv if q == 1 else queries) * ms / 1000 for ms in y])
                for q, x, y in zip(table["queries"], table["contexts"], table["ms"])
            ],
        )

    def _derived_attention(self) -> AttentionFit:
        hw, args = self.hw, self.args
        heads = args.num_heads / self.layout.tp
        flops = hw["bf16_peak_tflops"] * 1e12 * hw["prefill_attention_efficiency"]
        read = hw["hbm_tb_per_s"] * 1e12 * hw["decode_attention_efficiency"]
        per_cached = [
            max(4 * q * args.head_dim * heads / flops, 2 * self.kv_heads * args.head_dim * BF16 / read)
            for q in POWERS_OF_TWO
        ]
        fixed = [2 * q * q * args.head_dim * heads / flops + hw["attention_kernel_us"] * 1e-6 for q in POWERS_OF_TWO]
        return AttentionFit.linear(POWERS_OF_TWO, fixed, per_cached)

    def _merge_s(self, rows: int) -> float:
        """One layer's KVP merge of `rows` rows: measured where the profile has it at this KVP degree, else
        each group's partial outputs and log-sum-exps sent around the k groups (k − 1 point-to-point hops)."""
        layout, args = self.layout, self.args
        row = args.num_heads / layout.tp * (args.head_dim + 1) * 4  # fp32 output and log-sum-exp per head
        if self._measured("kvp_merge"):
            return self._collective("kvp_merge", str(layout.kvp))(rows * row)
        p2p = self._p2p(layout.tp * layout.kvp > self.hw["gpus_per_node"])  # TP innermost, then KVP
        return (layout.kvp - 1) * p2p(rows * row)

    def _step(self) -> dict:
        """The performance model's per-step terms: overhead, cost per sequence, the kernels' weights and
        the wake after idle as fitted to whole steps where the profile has them, else its stated overhead."""
        if not self._measured("step"):
            return {"overhead_s": self.hw["step_overhead_ms"] / 1000}
        step = self._table("step")
        terms = {
            "overhead_s": step["overhead_ms"] / 1000,
            "per_sequence_s": step["per_sequence_ms"] / 1000,
            "weights": dict(step["weights"]),
        }
        if "wake" in step:
            terms |= {"wake": step["wake"], "wake_after_s": step["wake_after_ms"] / 1000}
        return terms

    def perf_model(self) -> PerfModel:
        layout, args, per_node = self.layout, self.args, self.hw["gpus_per_node"]
        merge = hand_over = None
        if layout.kvp > 1:
            merge = Curve(POWERS_OF_TWO, [self._merge_s(m) for m in POWERS_OF_TWO])
        if layout.spp > 1:  # the next stage is tp × kvp ranks away
            p2p = self._p2p(layout.tp * layout.kvp >= per_node)
            hand_over = Curve(POWERS_OF_TWO, [p2p(t * args.hidden_size * BF16) for t in POWERS_OF_TWO])
        return PerfModel(
            key=f"{self.hw['name']}: {layout}",
            layers=self.stage_layers,
            stages=layout.spp,
            linear=Curve(POWERS_OF_TWO, [self.linear_s(t) for t in POWERS_OF_TWO]),
            attention=self.attention(),
            lm_head=Curve(POWERS_OF_TWO, [self.lm_head_s(r) for r in POWERS_OF_TWO]),
            merge=merge,
            hand_over=hand_over,
            **self._step(),
        )
