"""The layout performance model and the planner: their figures follow from the profile's sources, and
the simulated layouts behave as SPP and KVP should (TTFT falls with pipeline stages, TBT with KVP groups)."""

from __future__ import annotations

import json

import pytest

from mnemosyne_hpc import plan
from mnemosyne_hpc.config import compose
from mnemosyne_hpc.model.args import ModelArgs
from mnemosyne_hpc.perf.layout import Layout, LayoutCost, load_hardware, load_shape
from mnemosyne_hpc.perf.machine import machine_profile, reference
from mnemosyne_hpc.perf.model import AttentionFit, Curve, PerfModel, SequenceShape
from mnemosyne_hpc.sim.planner import evaluate, layouts
from ranks import run_ranks

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


def test_a_whole_prompt_in_one_chunk_pays_its_causal_attention_in_full():
    """A chunk of 1M query tokens (scheduler.chunk_size=0) costs q² of causal attention, 64× a 128k one."""
    args = load_shape("llama3-8b")
    attention = LayoutCost(HW, args, Layout(8, 1, 1)).attention()
    flops = HW["bf16_peak_tflops"] * 1e12 * HW["prefill_attention_efficiency"]
    q = 2**20
    assert attention(q, 0) == pytest.approx(2 * q * q * args.head_dim * args.num_heads / 8 / flops, rel=1e-3)
    assert attention(q, 0) == pytest.approx(64 * attention(q // 8, 0), rel=1e-3)


def test_prefill_time_of_any_prefix_is_the_sum_of_its_chunks_in_whatever_order_it_is_asked():
    model = LayoutCost(HW, load_shape("llama3-8b"), Layout(8, 2, 1)).perf_model()

    def from_scratch(tokens, chunk=512):
        ticks = sum(model.batch_time([SequenceShape(min(chunk, tokens - s), s)], 0) for s in range(0, tokens, chunk))
        return ticks + (model.stages - 1) * model.batch_time([SequenceShape(min(chunk, tokens), 0)], 0)

    for tokens in (100_000, 1, 512, 513, 1024, 3_000_000, 70_001):
        assert model.prefill_time(tokens) == from_scratch(tokens)
    assert model.prefill_time(5000, chunk=1000) == from_scratch(5000, 1000)
    assert model.prefill_time(0) == 0.0


def test_a_layout_that_does_not_fit_is_simulated_only_when_asked():
    cfg = compose(["plan.context=1M", "plan.decode_tokens=2"], "plan")
    args, layout = load_shape(cfg.model.path), Layout(1, 1, 1)  # 8B at TP 1: 128 KiB of KV per token
    bound, unbound = (evaluate(cfg, args, HW, layout, memory_bound=m) for m in (True, False))
    assert not bound["fits"] and "ttft_s" not in bound and bound["why_not"].startswith("KV 122.1 GiB")
    assert not unbound["fits"] and unbound["ttft_s"] > 0 and unbound["tbt_p50_s"] > 0


def test_the_a100_profile_is_slower_than_the_h100_one_by_its_own_figures():
    """Vidur's A100 layers are slower than its H100 ones at the same shape and TP degree, and the attention
    figures follow the stated peaks: a layout's prefill and decode take longer on A100 nodes."""
    a100 = load_hardware("a100-dgx")
    assert {"linear_layer", "all_reduce", "send_recv"} <= set(a100["measured"]) and all(
        a100["sources"][key] for key in ("measured", "bf16_peak_tflops", "hbm_tb_per_s", "prefill_attention_efficiency")
    )
    args = load_shape("llama3-8b")
    h100_cost, a100_cost = LayoutCost(HW, args, Layout(8, 1, 1)), LayoutCost(a100, args, Layout(8, 1, 1))
    assert a100_cost.linear_s(4096) > h100_cost.linear_s(4096)
    h100_model, a100_model = h100_cost.perf_model(), a100_cost.perf_model()
    for shape in (SequenceShape(8192, 100_000), SequenceShape(1, 1_000_000)):
        assert a100_model.batch_time([shape], 1) > h100_model.batch_time([shape], 1)


def _single_rank_profile(args: ModelArgs) -> PerfModel:
    """A performance model as `python -m mnemosyne_hpc.profile` stores one for a single rank (its curves
    made up: what matters is that the layout model composes them as the engine's model does)."""
    return PerfModel(
        key="made-up",
        layers=args.num_layers,
        stages=1,
        linear=Curve([1, 64, 2048], [0.002, 0.004, 0.09]),
        attention=AttentionFit(
            [1, 32, 512],
            [Curve([0, 1024, 16384], [y, 2 * y, 9 * y]) for y in (1e-4, 4e-4, 5e-3)],
        ),
        lm_head=Curve([1, 16], [0.003, 0.006]),
        overhead_s=0.0007,
        per_sequence_s=0.0002,
        weights={"linear": 1.1, "decode_attention": 0.9, "prefill_attention": 1.0, "lm_head": 1.05},
        report={"layout": {"tp": 1, "spp": 1, "kvp": 1}, "dtype": "bfloat16", "date": "today"},
    )


COLLECTIVES = {
    "send_recv": {"2": {"bytes": [1024, 1 << 20], "ms": [0.05, 0.5]}},
    "kvp_merge": {"2": {"bytes": [1024, 1 << 20], "ms": [0.2, 2.0]}},
    "source": "made up",
}


def test_this_machines_profile_reproduces_its_single_rank_model_and_adds_each_layouts_collectives():
    args = load_shape("llama3-8b")
    single_rank = _single_rank_profile(args)
    hw = machine_profile({"ref": reference(single_rank, args)}, COLLECTIVES, "a CPU")
    steps = [
        [SequenceShape(1, 3000)] * 5 + [SequenceShape(300, 700)],
        [SequenceShape(2048, 0)],
        [SequenceShape(1, 20000), SequenceShape(1, 1)],
    ]
    same = LayoutCost(hw, args, Layout(1, 1, 1)).perf_model()
    for step in steps:
        assert same.batch_time(step, 3) == pytest.approx(single_rank.batch_time(step, 3), rel=1e-9)
    # two pipeline stages: half the layers each, plus the hidden states handed to the next stage
    spp = LayoutCost(hw, args, Layout(1, 2, 1)).perf_model()
    hand_over = Curve(COLLECTIVES["send_recv"]["2"]["bytes"], [ms / 1000 for ms in COLLECTIVES["send_recv"]["2"]["ms"]])
    assert spp.layers == args.num_layers // 2
    assert spp.terms([SequenceShape(64, 0)], 0)["hand_over"] == pytest.approx(
        hand_over(64 * args.hidden_size * 2), rel=1e-9
    )
    # two KVP groups: every layer merges the rows' partial outputs, measured against bytes
    kvp = LayoutCost(hw, args, Layout(1, 1, 2)).perf_model()
    row_bytes = args.num_heads * (args.head_dim + 1) * 4
    assert kvp.merge(16) == pytest.approx(0.0002 + (0.002 - 0.0002) * (16 * row_bytes - 1024) / ((1 << 20) - 1024))
    with pytest.raises(ValueError, match="measured at TP 1, not 2"):
        LayoutCost(hw, args, Layout(2, 1, 1)).perf_model()
    assert all(layout.tp == 1 for layout in layouts(args, hw, 2))


def test_a_machine_profile_takes_single_rank_bfloat16_profiles_only():
    args = load_shape("llama3-8b")
    profile = _single_rank_profile(args)
    profile.report["layout"]["spp"] = 2
    with pytest.raises(ValueError, match="one rank"):
        reference(profile, args)
    profile = _single_rank_profile(args)
    profile.report["dtype"] = "float32"
    with pytest.raises(ValueError, match="bfloat16"):
        reference(profile, args)


def test_collectives_are_timed_on_two_real_ranks(tmp_path):
    out = tmp_path / "collectives.json"
    done = run_ranks(2, ["-m", "mnemosyne_hpc.perf.collectives", str(out), "--max-bytes", "65536", "--repeats", "3"])
    assert done.returncode == 0, done.stderr
    measured = json.loads(out.read_text())
    for name in ("send_recv", "kvp_merge"):
        curve = measured[name]["2"]
        assert curve["bytes"] == [1024, 4096, 16384, 65536] and all(ms > 0 for ms in curve["ms"])
    assert "2 ranks" in measured["source"]
