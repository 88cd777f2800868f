"""Importance order and striping: nested, balanced, top-k budgets (invariants 2 and 3)."""

from __future__ import annotations

import pytest
import torch

from megatron_ext.elastic.layout import (
    active_mask,
    importance_order,
    inverse_permutation,
    local_prefix_len,
    rank_of_position,
    reorder_permutation,
    restripe_permutation,
    striped_positions,
)

N = 16
# (shards, group_size): plain axes striped over 1, 2, 4 ranks; grouped axes (4 groups of 4)
# kept whole on 1, 2, 4 ranks.
LAYOUTS = [(1, None), (2, None), (4, None), (1, 4), (2, 4), (4, 4)]


def _budgets(shards: int, group_size: int | None) -> list[int]:
    """Every width the layout allows: multiples of the shard count, or of the group count."""
    step = N // group_size if group_size else shards
    return list(range(step, N + 1, step))


def _scores(seed: int = 0) -> torch.Tensor:
    return torch.randn(N, generator=torch.Generator().manual_seed(seed))


def test_importance_order_sorts_by_descending_score():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7])
    assert importance_order(scores).tolist() == [1, 3, 2, 0]


def test_grouped_order_ranks_each_group_inside_its_own_slots():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3, 0.2])
    order = importance_order(scores, group_size=3)
    assert order.tolist() == [1, 2, 0, 3, 4, 5]


def test_ties_keep_index_order_and_are_deterministic():
    scores = torch.tensor([1.0, 2.0, 2.0, 1.0, 2.0, 1.0, 1.0, 2.0])
    assert importance_order(scores).tolist() == [1, 2, 4, 7, 0, 3, 5, 6]
    first = reorder_permutation(scores, shards=2)
    for _ in range(3):
        assert torch.equal(reorder_permutation(scores.clone(), shards=2), first)
    assert importance_order(scores, group_size=4).tolist() == [1, 2, 0, 3, 4, 7, 5, 6]


def test_striped_positions_is_a_permutation_dealing_ranks_round_robin():
    pos = striped_positions(8, 2)
    assert pos.tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert sorted(striped_positions(12, 3).tolist()) == list(range(12))


def test_rank_of_position_inverts_striping():
    for shards in (1, 2, 4):
        ranks = rank_of_position(N, shards)
        assert torch.equal(ranks[striped_positions(N, shards)], torch.arange(N))


@pytest.mark.parametrize(("shards", "group_size"), LAYOUTS)
def test_active_sets_nest_across_every_pair_of_widths(shards, group_size):
    widths = _budgets(shards, group_size)
    for small in widths:
        for large in widths:
            if small < large:
                a = active_mask(N, small, shards, group_size)
                b = active_mask(N, large, shards, group_size)
                assert not (a & ~b).any(), (small, large)
                assert int(a.sum()) == small


@pytest.mark.parametrize(("shards", "group_size"), LAYOUTS)
def test_every_shard_keeps_an_equal_local_prefix(shards, group_size):
    local = N // shards
    for k in _budgets(shards, group_size):
        per_shard = active_mask(N, k, shards, group_size).reshape(shards, local)
        if group_size is None:
            keep = local_prefix_len(k, shards)
            expected = torch.arange(local) < keep
            assert torch.equal(per_shard, expected.expand(shards, local)), k
        else:
            # each shard holds whole groups; each group keeps the prefix of its own slots
            per_group = per_shard.reshape(-1, group_size)
            keep = local_prefix_len(k, N // group_size)
            assert torch.equal(per_group, (torch.arange(group_size) < keep).expand_as(per_group))
        assert (per_shard.sum(dim=1) == k // shards).all()


@pytest.mark.parametrize(("shards", "group_size"), LAYOUTS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reorder_then_mask_keeps_exactly_the_top_k_scores(shards, group_size, seed):
    scores = _scores(seed)
    reordered = scores.index_select(0, reorder_permutation(scores, shards, group_size))
    for k in _budgets(shards, group_size):
        kept = reordered[active_mask(N, k, shards, group_size)]
        if group_size is None:
            expected = torch.topk(scores, k).values
            assert torch.equal(kept.sort().values, expected.sort().values)
        else:
            per = k // (N // group_size)
            groups = scores.reshape(-1, group_size)
            expected = torch.topk(groups, per, dim=1).values.reshape(-1)
            assert torch.equal(kept.sort().values, expected.sort().values)


def test_narrow_compute_per_shard_equals_masked_full_compute():
    # A TP-split MLP: fc1 column-parallel, fc2 row-parallel. Summing each rank's narrow
    # result over its local prefix must equal the full-width masked computation.
    # Tolerance: fp32 sums in a different order, so 1e-5.
    shards, hidden, ffn, k = 2, 8, N, 8
    gen = torch.Generator().manual_seed(0)
    fc1 = torch.randn(ffn, hidden, generator=gen)
    fc2 = torch.randn(hidden, ffn, generator=gen)
    x = torch.randn(3, hidden, generator=gen)
    perm = reorder_permutation(fc1.norm(dim=1), shards)
    fc1, fc2 = fc1.index_select(0, perm), fc2.index_select(1, perm)
    mask = active_mask(ffn, k, shards).float()
    masked = (torch.relu(x @ fc1.T) * mask) @ fc2.T
    keep, local = local_prefix_len(k, shards), ffn // shards
    narrow = sum(
        torch.relu(x @ fc1[r * local : r * local + keep].T) @ fc2[:, r * local : r * local + keep].T
        for r in range(shards)
    )
    assert torch.allclose(narrow, masked, atol=1e-5)


def test_restripe_moves_a_layout_to_another_shard_count():
    scores = _scores(3)
    at2 = scores.index_select(0, reorder_permutation(scores, 2))
    at4 = scores.index_select(0, reorder_permutation(scores, 4))
    assert torch.equal(at2.index_select(0, restripe_permutation(N, 2, 4)), at4)


def test_inverse_permutation_undoes_a_reorder():
    scores = _scores(4)
    perm = reorder_permutation(scores, 4)
    restored = scores.index_select(0, perm).index_select(0, inverse_permutation(perm))
    assert torch.equal(restored, scores)


def test_uneven_splits_are_rejected():
    with pytest.raises(ValueError, match="split"):
        striped_positions(10, 4)
    with pytest.raises(ValueError, match="split"):
        active_mask(N, 6, shards=4)
    with pytest.raises(ValueError, match="groups"):
        reorder_permutation(_scores(), group_size=5)
    with pytest.raises(ValueError, match="groups over shards"):
        reorder_permutation(_scores(), shards=8, group_size=4)
    with pytest.raises(ValueError, match="split"):
        active_mask(N, 6, group_size=4)
    with pytest.raises(ValueError, match="NaN"):
        importance_order(torch.tensor([1.0, float("nan")]))
