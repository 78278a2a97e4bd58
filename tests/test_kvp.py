"""KV-cache parallelism: a request's KV split over KVP groups, merged exactly per layer."""

from __future__ import annotations

import random

import pytest

from mnemosyne_hpc.distributed.kvp_layout import KVPLayout
from mnemosyne_hpc.engine.kv_cache import KVPlacement
from models import DECODE_STEPS, assert_matches_reference, reference_greedy
from ranks import GROUP_TOKENS, greedy_cases, kvp_overrides, kvp_prompts, run_engine, together_and_solo_cases


@pytest.mark.parametrize(
    "family, tp, spp, kvp",
    [
        ("llama", 1, 1, 2),
        ("llama", 1, 1, 3),
        ("qwen2", 1, 1, 4),
        ("llama", 2, 2, 2),
    ],
)
def test_kvp_matches_transformers_and_one_rank(family, tp, spp, kvp, tiny_models, reference, tmp_path):
    model_dir = tiny_models[family]
    hf = reference(model_dir)
    batch = kvp_prompts(kvp, hf.config.vocab_size)
    cases = greedy_cases(batch, (7, 0), DECODE_STEPS)
    max_model_len = kvp * GROUP_TOKENS
    results = run_engine(tmp_path / "kvp", tp * spp * kvp, kvp_overrides(model_dir, tp, spp, kvp, max_model_len), cases)
    one_rank = run_engine(tmp_path / "one", 1, kvp_overrides(model_dir, 1, 1, 1, max_model_len), cases)
    for index, prompt in enumerate(batch):
        ref_tokens, ref_logits = reference_greedy(hf, prompt, DECODE_STEPS)
        for case in cases:
            label = f"{family} tp×spp×kvp={tp}×{spp}×{kvp} {case['name']} prompt {index} ({len(prompt)} tokens)"
            output = results[case["name"]]["outputs"][index]
            assert_matches_reference(output, ref_tokens, ref_logits, label)
            single = one_rank[case["name"]]["outputs"][index]
            assert_matches_reference(output, single["token_ids"], single["logits"], label + " vs one rank")
        # the request really spread: its last decode ran on every group its tokens reach
        spans = [stages[0][index] for stages in results["chunk0"]["stage_groups"] if index in stages[0]]
        assert len(spans[-1]) == (len(prompt) + DECODE_STEPS - 1) // GROUP_TOKENS + 1, label
    # several requests spanning groups were in flight in the same tick
    assert any(
        sum(len(groups) > 1 for stage in stages for groups in stage.values()) >= 2
        for stages in results["chunk7"]["stage_groups"]
    )


def test_spanning_request_beside_short_requests_on_every_group(tiny_models, tmp_path):
    rng = random.Random(7)
    long = {
        "prompt_token_ids": [rng.randrange(2, 250) for _ in range(150)],
        "max_tokens": 20,
        "temperature": 0.8,
        "seed": 11,
    }
    short = [
        {
            "prompt_token_ids": [rng.randrange(2, 250) for _ in range(12)],
            "max_tokens": 24,
            "arrival_step": 1 + i,
            **({"temperature": 0.9, "seed": i} if i % 2 else {}),
        }
        for i in range(5)
    ]
    requests = [long] + short
    cases = together_and_solo_cases("together", 16, requests)
    model_dir = tiny_models["llama"]
    results = run_engine(tmp_path / "kvp", 3, kvp_overrides(model_dir, 1, 1, 3, 240), cases)
    one_rank = run_engine(tmp_path / "one", 1, kvp_overrides(model_dir, 1, 1, 1, 240), cases[:1])
    together = results["together"]
    for i, output in enumerate(together["outputs"]):
        assert output["token_ids"] == results[f"solo{i}"]["outputs"][0]["token_ids"], f"request {i} vs solo"
        assert output["token_ids"] == one_rank["together"]["outputs"][i]["token_ids"], f"request {i} vs one rank"
    entering = [stages[0] for stages in together["stage_groups"]]
    groups_of_short = {g for step in entering for i, gs in step.items() if i > 0 for g in gs}
    assert groups_of_short == {0, 1, 2}, "short requests were not spread over the KVP groups"
    # in one step the long request spans two groups while short requests run beside it, one of them
    # on the group that holds nothing of the long request
    assert any(len(step.get(0, [])) == 2 and any(gs == [2] for i, gs in step.items() if i > 0) for step in entering)


def test_placement_spans_consecutive_groups_and_spreads_short_requests():
    placement = KVPlacement(KVPLayout(num_groups=3, group_tokens=64), num_blocks=10, block_size=16)
    assert placement.layout.shard_tokens(150) == [64, 64, 22]
    first, tables, _ = placement.reserve(150, 150)
    assert first == 0 and [len(t) for t in tables] == [4, 4, 2]
    assert placement.reserve(30, 30)[0] == 2  # the group the long request leaves emptiest
    second = placement.reserve(150, 150)
    assert [a.num_free for a in placement.allocators] == [2, 2, 4]
    assert placement.reserve(150, 150) is None  # the only run of three groups lacks room in group 0
    assert placement.reserve(64, 64)[0] == 2
    placement.free(first, tables, 150)
    placement.free(*second[:2], 150)
    assert [a.num_free for a in placement.allocators] == [10, 10, 4]


def test_placement_reserves_the_prompt_and_grows_block_by_block():
    placement = KVPlacement(KVPLayout(num_groups=2, group_tokens=64), num_blocks=10, block_size=16)
    first, tables, _ = placement.reserve(20, 100)  # a 20-token prompt that may grow to 100 tokens
    assert first == 0 and tables == [[0, 1]] and placement.promised == [2, 3]
    assert placement.covers(tables, 31) and not placement.covers(tables, 32)
    for position in (32, 48, 64):  # the third block of group 0, its fourth, then group 1's first
        assert placement.extend(first, tables, position) and placement.covers(tables, position)
    assert [len(t) for t in tables] == [4, 1] and placement.promised == [0, 2]
    assert placement.headroom(1) == 10 - 1 - 2
    placement.free(first, tables, 100)
    assert placement.promised == [0, 0] and [a.num_free for a in placement.allocators] == [10, 10]
