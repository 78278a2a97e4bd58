"""Prefix caching (engine/prefix_cache.py, the block books in engine/kv_cache.py): block identities,
reference counts and eviction, placement on the groups holding a prefix; and, on real ranks, a warm
cache gives the tokens and logits of a cold run at TP=2, SPP=2, KVP=2 and 2×2×2, and under eviction."""

from __future__ import annotations

import random

import pytest
import torch

from mnemosyne_hpc.distributed.kvp_layout import KVPLayout
from mnemosyne_hpc.engine.kv_cache import BlockAllocator, KVPlacement
from mnemosyne_hpc.engine.prefix_cache import BlockGrid, extend_hashes
from models import assert_matches_reference, make_tiny_model, reference_greedy
from ranks import run_engine, tiny_overrides


def identities(tokens: list[int], grid: BlockGrid) -> list[bytes]:
    return extend_hashes([], lambda start, end: tokens[start:end], grid, len(tokens))


def test_block_grid_restarts_blocks_at_each_kvp_group():
    grid = BlockGrid(KVPLayout(num_groups=3, group_tokens=40), block_size=16)  # blocks 16, 16, 8 per group
    assert grid.blocks_per_group == 3
    assert [(grid.start(k), grid.end(k)) for k in range(4)] == [(0, 16), (16, 32), (32, 40), (40, 56)]
    assert [grid.complete_blocks(n) for n in (15, 16, 39, 40, 55, 56)] == [0, 1, 2, 3, 3, 4]


def test_identities_match_only_with_equal_tokens_before_them():
    grid = BlockGrid(KVPLayout(1, 1024), block_size=4)
    a = identities(list(range(20)), grid)
    assert len(a) == 5 and len(set(a)) == 5
    assert identities(list(range(18)), grid) == a[:4]  # a prefix: the same blocks, the partial one left out
    changed = identities([99] + list(range(1, 20)), grid)
    assert all(x != y for x, y in zip(changed, a))  # the first token differs: so does every block after it
    assert identities(list(range(4, 8)), grid)[0] != a[1]  # the same tokens at another place


def test_cached_blocks_count_as_free_and_are_evicted_least_recently_released_first():
    pool = BlockAllocator(num_blocks=6, block_size=4)
    first, second = pool.take(2), pool.take(2)  # [0, 1], [2, 3]
    for block, name in zip(first + second, (b"a0", b"a1", b"b0", b"b1")):
        pool.register(block, name)
    pool.free(first)
    pool.free(second)
    assert pool.num_free == 6 and pool.lookup(b"a0") == 0
    pool.share(pool.lookup(b"b0"))  # a request reuses b0: taken back from the evictable ones
    assert pool.num_free == 5
    assert pool.take(2) == [4, 5]  # the never-cached blocks go first
    assert pool.take(1) == [1]  # then the oldest release, a sequence's last block first: a1
    assert pool.lookup(b"a1") is None and pool.lookup(b"a0") == 0
    pool.clear_cache()
    assert pool.lookup(b"a0") is None and pool.lookup(b"b0") is None and pool.num_free == 2
    with pytest.raises(MemoryError):
        pool.take(3)


def test_placement_reuses_a_prefix_in_the_groups_holding_it_and_computes_the_last_token():
    layout = KVPLayout(num_groups=4, group_tokens=32)
    placement = KVPlacement(layout, num_blocks=8, block_size=16, prefix_caching=True)
    document = list(range(100, 170))  # 70 tokens: groups' blocks of 16, 16 | 16, 16 | 6
    ids = identities(document, placement.grid)
    assert len(ids) == 4
    filler = placement.reserve(16, 16)  # placed first in group 0: the document's first group becomes 1
    first, tables, cached = placement.reserve(len(document), len(document), ids)
    assert (first, cached) == (1, 0)
    placement.register(first, tables, ids, range(4))
    placement.free(first, tables, len(document))
    placement.free(filler.first_group, filler.tables, 16)

    question = document + [7, 8, 9]  # the whole document cached, spanning groups 1 and 2
    again, shared, cached = placement.reserve(len(question), len(question), identities(question, placement.grid))
    assert (again, cached) == (1, 64) and shared[:2] == tables[:2]
    assert placement.cached_prefix(ids, len(document)) == 64
    exact = document[:64]  # whole blocks only: its last block is computed again, for the logits
    assert placement.reserve(64, 64, identities(exact, placement.grid)).cached_tokens == 48


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model("llama3", tmp_path_factory.mktemp("prefix") / "model")


def document_and_questions(seed: int, document_tokens: int, questions: int) -> tuple[list[int], list[list[int]]]:
    rng = random.Random(seed)
    return (
        [rng.randrange(3, 250) for _ in range(document_tokens)],
        [[rng.randrange(3, 250) for _ in range(rng.randrange(5, 12))] for _ in range(questions)],
    )


@pytest.mark.parametrize(
    "tp, spp, kvp", [(2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 2)], ids=["tp2", "spp2", "kvp2", "tp2-spp2-kvp2"]
)
def test_a_warm_cache_gives_the_tokens_and_logits_of_a_cold_run(tp, spp, kvp, model_dir, reference, tmp_path):
    """A 100-token document (it ends within a block, and with KVP it spans both groups: L = 64) asked
    two questions, one after the other, then the first again: the later ones find the document's
    complete blocks cached, and every answer equals the cold run's and transformers'."""
    document, questions = document_and_questions(tp + 2 * spp + 4 * kvp, 100, 2)
    prompts = [document + questions[0], document + questions[1], document + questions[0]]
    greedy = {"max_tokens": 6, "ignore_eos": True}
    warm = [{"prompt_token_ids": p, "arrival_step": 40 * i, **greedy} for i, p in enumerate(prompts)]
    cold = [{"prompt_token_ids": p, **greedy} for p in prompts[1:]]
    cases = [
        {"name": "warm", "chunk_size": 32, "requests": warm},
        {"name": "cold", "chunk_size": 32, "requests": cold},
    ]  # the cache cleared first
    overrides = tiny_overrides(
        model_dir,
        **{
            "parallel.tp": tp,
            "parallel.spp": spp,
            "parallel.kvp": kvp,
            "parallel.max_tokens_per_kvp_group": 64 if kvp > 1 else 0,
            "cache.max_model_len": 128,
        },
    )
    results = run_engine(tmp_path, tp * spp * kvp, overrides, cases)
    warm_out, cold_out = results["warm"]["outputs"], results["cold"]["outputs"]
    repeat_cached = (len(prompts[2]) - 1) // 16 * 16
    assert [o["cached_tokens"] for o in warm_out] == [0, 96, repeat_cached]
    assert [o["cached_tokens"] for o in cold_out] == [0, 0]
    hf = reference(model_dir)
    for prompt, warm_output, cold_output in zip(prompts[1:], warm_out[1:], cold_out):
        assert warm_output["token_ids"] == cold_output["token_ids"]
        torch.testing.assert_close(warm_output["logits"], cold_output["logits"], atol=1e-4, rtol=1e-4)
        assert_matches_reference(warm_output, *reference_greedy(hf, prompt, 6), f"warm tp{tp} spp{spp} kvp{kvp}")


def test_more_long_prompts_than_the_cache_holds_all_complete_and_hit_where_their_prefix_survived(
    model_dir, reference, tmp_path
):
    """128 blocks of 16 tokens; documents of 400 tokens (25 blocks): five fit. Seven documents, some
    asked again after others pushed them out, one at a time."""
    rng = random.Random(11)
    documents = [[rng.randrange(3, 250) for _ in range(400)] for _ in range(7)]
    order = [0, 1, 0, 2, 3, 4, 5, 0, 6, 1, 6]
    greedy = {"max_tokens": 3, "ignore_eos": True}
    requests = [
        {"prompt_token_ids": documents[d] + [5 + i], "arrival_step": 20 * i, **greedy} for i, d in enumerate(order)
    ]
    overrides = tiny_overrides(model_dir, **{"cache.max_model_len": 512})
    outputs = run_engine(tmp_path, 1, overrides, [{"name": "mixed", "chunk_size": 64, "requests": requests}])
    outputs = outputs["mixed"]["outputs"]
    cached = [o["cached_tokens"] for o in outputs]
    # asked again while cached: document 0 (twice: each use makes its blocks the last to go) and 6;
    # document 1 came back after five others had pushed it out (least recently released first)
    assert cached == [0, 0, 400, 0, 0, 0, 0, 400, 0, 0, 400], cached
    hf = reference(model_dir)
    for request, output in zip(requests, outputs):
        assert_matches_reference(output, *reference_greedy(hf, request["prompt_token_ids"], 3), "eviction")
