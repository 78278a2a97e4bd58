"""The layout performance model and the planner: their figures follow from the profile's sources, and
the simulated layouts behave as SPP and KVP should (TTFT falls with pipeline stages, TBT with KVP groups)."""

from __future__ import annotations

import json

import pytest

from mnemosyne_hpc import plan
from mnemosyne_hpc.config import compose
from mnemosyne_hpc.model.args import ModelArgs
from mnemosyne_hpc.perf.layout import Layout, LayoutCost, load_hardware, load_shape
from mnemosyne_hpc.perf.model import SequenceShape
from mnemosyne_hpc.sim.planner import evaluate

HW = load_hardware("h100-dgx")


def test_a_measured_shape_gets_its_measured_layer_time_and_decode_reads_its_kv_at_the_stated_bandwidth():
    llama2_7b = ModelArgs.from_hf_config(
        {
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 32000,
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
        }
    )
    table = HW["measured"]["linear_layer"]["meta-llama/Llama-2-7b-hf"]["tp"]["1"]
    cost = LayoutCost(HW, llama2_7b, Layout(1, 1, 1))
    assert cost.linear_s(4096) == pytest.approx(table["ms"][table["tokens"].index(4096)] / 1000)
    kv_bytes = 1_000_000 * 2 * 8 * 128 * 2  # Llama-3-8B, one layer, TP 1: K and V of 8 heads of 128, bf16
    attention = LayoutCost(HW, load_shape("llama3-8b"), Layout(1, 1, 1)).attention()
    assert attention(1, 1_000_000) == pytest.approx(
        kv_bytes / (HW["hbm_tb_per_s"] * 1e12 * HW["decode_attention_efficiency"]), rel=0.01
    )


def test_ttft_falls_with_pipeline_stages_and_tbt_with_kvp_groups():
    """At 2M tokens reading the KV dominates a decode step, and splitting it over KVP groups on other nodes
    pays for the merge (at 256k it does not: the merge's inter-node hops cost more than the reads saved)."""
    short, long = (compose([f"plan.context={n}", "plan.decode_tokens=4"], "plan") for n in ("256k", "2M"))
    args = load_shape(short.model.path)
    ttft = [evaluate(short, args, HW, Layout(8, spp, 1))["ttft_s"] for spp in (1, 2, 4)]
    tbt = [evaluate(long, args, HW, Layout(8, 1, kvp))["tbt_p50_s"] for kvp in (1, 2, 4)]
    print(
        f"Llama-3-8B, TP 8: TTFT at 256k tokens, SPP 1/2/4 {[round(t, 2) for t in ttft]} s; "
        f"TBT at 2M tokens, KVP 1/2/4 {[round(1000 * t, 2) for t in tbt]} ms"
    )
    assert ttft[0] > ttft[1] > ttft[2] > ttft[0] / 4
    assert tbt[0] > tbt[1] > tbt[2]
    model = LayoutCost(HW, args, Layout(8, 1, 2)).perf_model()
    # a chunk over two groups' KV pays the merge; the same chunk in one group does not
    chunk = [SequenceShape(512, 1000)]
    assert model.batch_time(chunk, 0, merged_rows=512) > model.batch_time(chunk, 0)


def test_plan_command_ranks_layouts_and_writes_its_result(tmp_path, capsys):
    out = tmp_path / "plan.json"
    plan.main(["model=llama3-70b", "plan.gpus=16", "plan.context=1M", "plan.progress=false", f"plan.output={out}"])
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())["layouts"]
    print(printed)
    assert len(rows) == len({r["layout"] for r in rows}) and all(r["gpus"] <= 16 for r in rows)
    assert rows[0]["fits"] and rows[0]["meets_slo"] and rows[0]["layout"] in printed.splitlines()[2]
    assert not rows[-1]["fits"] and rows[-1]["layout"] == "TP1×SPP1×KVP1"  # 70B in bf16 alone: 131 GiB of weights
