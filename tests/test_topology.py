"""The pure topology decisions: schedule, candidate selection and the swap planner."""

from __future__ import annotations

import math

import pytest
import torch

from seft_trl.criteria import GAIN_ESTIMATES, GROWTH_CRITERIA, REMOVAL_CRITERIA, SWAP_TESTS
from seft_trl.patterns import Scope, SparsityPattern, detect_pattern, satisfies
from seft_trl.topology import (
    drop_fraction_at, is_update_step, next_update_step, plan_swap, select_candidates, window_group_offsets,
)

L = torch.tensor


def test_schedules():
    assert drop_fraction_at(0, 100, 0.2, "cosine") == pytest.approx(0.2)
    assert drop_fraction_at(50, 100, 0.2, "cosine") == pytest.approx(0.1)
    assert drop_fraction_at(100, 100, 0.2, "cosine") == pytest.approx(0.0)
    assert drop_fraction_at(25, 100, 0.2, "linear") == pytest.approx(0.15)
    assert drop_fraction_at(90, 100, 0.2, "constant") == 0.2
    assert [s for s in range(1, 60) if is_update_step(s, 10, 45)] == [10, 20, 30, 40]

def test_window_groups_spread_their_updates_over_the_interval():
    assert window_group_offsets(20, 1) == [0] and window_group_offsets(20, 4) == [0, 5, 10, 15]
    assert [s for s in range(1, 60) if is_update_step(s, 20, 50, offset=5)] == [25, 45]  # none before the first interval
    assert next_update_step(1, 20, 5) == 25 and next_update_step(21, 20, 5) == 25 and next_update_step(26, 20, 0) == 40



def plan(**overrides):
    """A layer-scope plan: 6 deltas, growth candidates at 100.. and removal candidates at 200.."""
    args = dict(
        delta_magnitude=L([0.5, 0.1, 0.3, 0.0, 0.9, 0.2]),
        grow_index=L([100, 101, 102, 103]),
        grow_score=L([1.0, 4.0, 3.0, 2.0]),
        grow_revives=L([False, True, True, False]),
        grow_group=L([0, 0, 0, 0]),
        grow_slack=L([0, 0, 0, 0]),
        layer_slack=1000,
        remove_index=L([200, 201, 202]),
        remove_score=L([0.3, 0.1, 0.2]),
        remove_group=L([0, 0, 0]),
        n_swaps=3,
        swap_test=None,
    )
    args.update(overrides)
    n_grow, n_remove, k = len(args["grow_index"]), len(args["remove_index"]), len(args["delta_magnitude"])
    args.setdefault("grow_gain", torch.ones(n_grow))
    args.setdefault("remove_cost", torch.zeros(n_remove))
    args.setdefault("drop_forgone", torch.zeros(k))
    return plan_swap(**args)


def test_plan_grows_top_scores_drops_smallest_and_pays_each_revival():
    p = plan()
    assert sorted(p.grow_index.tolist()) == [101, 102, 103]  # scores 4, 3, 2
    assert p.drop_slots.tolist() == [1, 3, 5]  # |δ| 0.1, 0.0, 0.2
    assert p.revived == 2
    assert p.remove_index.tolist() == [201, 202]  # lowest scores 0.1, 0.2


def test_column_cap_passes_over_candidates_past_their_columns_room():
    # Priority 101, 102 (column 0), 103 (column 1), 100 (column 0); column 0 has room for one more.
    p = plan(grow_column=L([0, 0, 0, 1]), grow_column_room=L([1, 1, 1, 5]))
    assert sorted(p.grow_index.tolist()) == [101, 103]  # 102 and 100 are past column 0's room
    assert p.drop_slots.tolist() == [1, 3]  # only as many slots move as positions grow
    assert p.revived == 1 and p.remove_index.tolist() == [201]  # 102's payment is not spent


def test_column_cap_follows_the_swap_tests_ranking():
    # Ranked by benefit (gain - cost), 100 comes first in column 0 and takes its only room.
    p = plan(grow_column=L([0, 0, 0, 1]), grow_column_room=L([1, 1, 1, 1]), grow_gain=L([9.0, 1.0, 1.0, 1.0]),
             swap_test=SWAP_TESTS["taylor"], drop_forgone=torch.full((6,), -1.0))
    assert sorted(p.grow_index.tolist()) == [100, 103] and p.revived == 0 and p.remove_index.numel() == 0


def test_plan_uses_slack_before_removing():
    p = plan(grow_slack=L([1, 1, 1, 1]))
    assert p.revived == 2 and p.remove_index.tolist() == [201]


def test_unpayable_revival_is_skipped_and_fewer_deltas_move():
    p = plan(remove_index=L([200]), remove_score=L([0.3]), remove_group=L([0]), n_swaps=4)
    # Only one revival can be paid: 101 (score 4) is grown, 102 is not; both non-revivals are.
    assert sorted(p.grow_index.tolist()) == [100, 101, 103]
    assert p.drop_slots.numel() == 3 and p.remove_index.tolist() == [200]


def test_payment_stays_inside_the_group():
    p = plan(
        grow_group=L([0, 1, 2, 0]),
        remove_group=L([2, 1, 1]),  # group 1 can pay twice, group 2 once
        grow_revives=L([False, True, True, False]),
    )
    assert p.revived == 2
    assert p.remove_index.tolist() == [200, 201]  # 101 (group 1) pays with 201 (lower score in group 1), 102 with 200


def test_nm_groups_below_n_fill_only_while_the_layer_has_slack():
    # Two 2:4 groups hold one weight each (slack 1 each) but the layer is at its starting count.
    common = dict(grow_revives=L([True, True, True, True]), grow_group=L([0, 1, 0, 1]), grow_slack=L([1, 1, 1, 1]),
                  remove_group=L([0, 1, 1]), n_swaps=4)
    p = plan(layer_slack=0, **common)
    # Every revival must then be paid by a removal in its own group: group 0 once, group 1 twice.
    assert p.revived == p.remove_index.numel() == 3
    p = plan(layer_slack=1, **common)  # one unit of layer slack: the first revival (101) is free
    assert p.revived == 3 and p.remove_index.numel() == 2 and 101 in p.grow_index.tolist()


def test_swap_test_refuses_a_revival_whose_cost_exceeds_its_gain():
    one_revival = dict(grow_index=L([100]), grow_score=L([5.0]), grow_revives=L([True]), grow_group=L([0]),
                       grow_slack=L([0]), remove_index=L([200]), remove_score=L([0.0]), remove_group=L([0]),
                       n_swaps=1, swap_test=SWAP_TESTS["taylor"])
    refused = plan(grow_gain=L([1.0]), remove_cost=L([2.0]), **one_revival)
    assert refused.grow_index.numel() == 0 and refused.remove_index.numel() == 0 and refused.refused == 1
    accepted = plan(grow_gain=L([2.0]), remove_cost=L([1.0]), **one_revival)
    assert accepted.grow_index.tolist() == [100] and accepted.remove_index.tolist() == [200] and accepted.revived == 1
    # ... and what the dropped delta would still have gained counts against the swap.
    forgone = torch.full((6,), 1.5)
    assert plan(grow_gain=L([2.0]), remove_cost=L([1.0]), drop_forgone=forgone, **one_revival).grow_index.numel() == 0


def test_reachable_gain_is_newtons_within_reach_and_bounded_by_slope_times_reach_beyond():
    newton, reachable = GAIN_ESTIMATES["newton"], GAIN_ESTIMATES["reachable"]
    # A steady gradient (mean_sq = mean², one step: no noise to remove, snr 1) of slope 2 at three
    # curvatures: Newton steps 2/4 = 0.5, 2/1 = 2 and 2/0.01 = 200; reach = rate_sum = 1.
    mean, curvature = torch.full((3,), 2.0), torch.tensor([4.0, 1.0, 0.01])
    full, bounded = newton(mean, mean * mean, 1, curvature), reachable(mean, mean * mean, 1, curvature, 1.0)
    torch.testing.assert_close(full, torch.tensor([0.5, 2.0, 200.0]))
    assert bounded[0] == full[0]  # the Newton step is within reach: same gain
    torch.testing.assert_close(bounded[1:], torch.tensor([2.0 - 0.5, 2.0 - 0.005]))  # |m|·1 − ½·h·1²
    assert bool((bounded <= full).all()) and bool((bounded <= 2.0 * 1.0).all())
    # Noise shrinks the reach: snr = |E g| / √E g² = 2 / 4 (the mean square also carries the variance).
    noisy = reachable(mean, torch.full((3,), 16.0), 1, curvature, 1.0)
    torch.testing.assert_close(noisy[2], torch.tensor(2.0 * 0.5 - 0.5 * 0.01 * 0.25))
    # No schedule known (rate_sum inf): the Newton gain.
    torch.testing.assert_close(reachable(mean, mean * mean, 1, curvature, math.inf), full)


def test_reachable_gain_refuses_a_revival_that_only_an_unreachable_newton_step_pays_for():
    # A pruned position in a quiet column: slope 1, curvature 1e-4, so a Newton step of 1e4 and a
    # Newton gain of 5000; the kept weight that pays costs 0.5. With 0.1 of learning rate left in
    # the run the delta can move 0.1 at most: gain ≈ 0.1 < 0.5, and the swap test refuses.
    slope, curvature = torch.ones(1), torch.full((1,), 1e-4)
    one_revival = dict(grow_index=L([100]), grow_score=L([1.0]), grow_revives=L([True]), grow_group=L([0]),
                       grow_slack=L([0]), remove_index=L([200]), remove_score=L([0.0]), remove_group=L([0]),
                       remove_cost=L([0.5]), n_swaps=1, swap_test=SWAP_TESTS["taylor"])
    newton_gain = GAIN_ESTIMATES["newton"](slope, slope, 1, curvature, 0.1)
    assert plan(grow_gain=newton_gain, **one_revival).revived == 1
    reachable_gain = GAIN_ESTIMATES["reachable"](slope, slope, 1, curvature, 0.1)
    refused = plan(grow_gain=reachable_gain, **one_revival)
    assert refused.revived == 0 and refused.remove_index.numel() == 0 and refused.refused == 1


def test_swap_test_ranks_by_net_benefit_and_pairs_the_cheapest_removal():
    p = plan(
        grow_score=L([4.0, 3.0, 2.0, 1.0]),  # the growth criterion's order ...
        grow_gain=L([1.0, 3.0, 2.0, 0.5]),
        grow_revives=L([True, False, True, False]),
        remove_score=L([0.3, 0.1, 0.2]),
        remove_cost=L([0.3, 0.1, 0.2]),
        n_swaps=2,
        swap_test=SWAP_TESTS["taylor"],
    )
    # ... but net benefit decides: 101 (3.0, free) and 102 (2.0 - 0.2), not 100 (1.0 - 0.1).
    assert sorted(p.grow_index.tolist()) == [101, 102]
    assert p.revived == 1 and p.remove_index.tolist() == [202]


def test_ties_break_towards_lower_index():
    p = plan(grow_score=L([1.0, 1.0, 1.0, 1.0]), grow_revives=L([False] * 4), delta_magnitude=torch.zeros(6))
    assert sorted(p.grow_index.tolist()) == [100, 101, 102] and p.drop_slots.tolist() == [0, 1, 2]


SENSITIVITY = GROWTH_CRITERIA["gradient"], REMOVAL_CRITERIA["sensitivity"]


def flat_curvature(weight):
    return torch.ones(weight.shape[0]), torch.ones(weight.shape[1])


def test_select_candidates_layer_scope_excludes_deltas_and_respects_regrow_flag():
    torch.manual_seed(0)
    weight = torch.randn(8, 16)
    weight[weight.abs() < 0.7] = 0
    grad = torch.randn(8, 16)
    delta_index = torch.nonzero(weight.view(-1)).squeeze(1)[:10]
    scope = Scope("layer", 16)
    c = select_candidates(grad, weight, delta_index, scope, 20, True, *SENSITIVITY, *flat_curvature(weight))
    assert not set(c.grow_index.tolist()) & set(delta_index.tolist())
    expected = grad.abs().view(-1).clone()
    expected[delta_index] = -1
    assert c.grow_index.tolist() == sorted(torch.topk(expected, 20).indices.tolist())
    revivals = int((weight.view(-1)[c.grow_index] == 0).sum())
    assert c.remove_index.numel() == revivals  # one removal candidate per revival candidate
    assert (weight.view(-1)[c.remove_index] != 0).all()
    assert not set(c.remove_index.tolist()) & (set(delta_index.tolist()) | set(c.grow_index.tolist()))

    no_regrow = select_candidates(grad, weight, delta_index, scope, 20, False, *SENSITIVITY, *flat_curvature(weight))
    assert (weight.view(-1)[no_regrow.grow_index] != 0).all() and no_regrow.remove_index.numel() == 0


def test_select_candidates_on_a_layer_of_several_score_chunks_matches_a_plain_reference():
    """A 300 x 700 layer: the removal score is computed in several chunks and both top-k take the
    sampled path; the candidates must be those of whole-tensor topk on the same scores."""
    from seft_trl import topology

    rows, cols = 300, 700
    assert rows * cols > 2 * topology._SCORE_CHUNK and rows * cols > topology._SAMPLED_TOPK_MIN
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(rows, cols, generator=generator)
    weight[weight.abs() < 0.67] = 0  # about half pruned
    grad = torch.randn(rows, cols, generator=generator)
    delta_index = torch.randperm(rows * cols, generator=generator)[:4000].to(torch.int32)
    row_sq, col_sq = torch.rand(rows, generator=generator), torch.rand(cols, generator=generator)
    growth, removal = GROWTH_CRITERIA["gradient"], REMOVAL_CRITERIA["taylor"]
    c = select_candidates(grad, weight, delta_index, Scope("layer", cols), 3000, True, growth, removal, row_sq, col_sq)

    flat_weight, deltas = weight.view(-1), delta_index.long()
    grow_score = grad.abs().view(-1).clone()
    grow_score[deltas] = -math.inf
    expected_grow = torch.sort(torch.topk(grow_score, 3000).indices).values
    assert torch.equal(c.grow_index, expected_grow)
    revivals = int((flat_weight[expected_grow] == 0).sum())
    remove_score = removal(weight, grad, row_sq[:, None] * col_sq[None, :]).view(-1).clone()
    remove_score[(flat_weight == 0)] = math.inf
    remove_score[deltas] = math.inf
    remove_score[expected_grow] = math.inf
    expected_remove = torch.sort(torch.topk(remove_score, revivals, largest=False).indices).values
    assert revivals > 500 and torch.equal(c.remove_index, expected_remove)


def test_select_candidates_row_and_nm_scopes_pay_in_their_group():
    torch.manual_seed(1)
    weight = torch.randn(6, 16)
    weight.view(6, 4, 4)[..., :2] = 0  # 2:4
    grad = torch.randn(6, 16)
    delta_index = L([2, 3, 18])
    for scope in (Scope("row", 16), Scope("nm", 16, 2, 4)):
        magnitude = GROWTH_CRITERIA["gradient"], REMOVAL_CRITERIA["magnitude"]
        c = select_candidates(grad, weight, delta_index, scope, 12, True, *magnitude, *flat_curvature(weight))
        revival_groups = scope.group_of(c.grow_index[weight.view(-1)[c.grow_index] == 0])
        for group in scope.group_of(c.remove_index).unique():
            assert group in revival_groups
        assert (weight.view(-1)[c.remove_index] != 0).all()


def test_pattern_parse_detect_and_check():
    assert SparsityPattern.parse("2:4") == SparsityPattern(2, 4)
    assert str(SparsityPattern.parse("unstructured")) == "unstructured"
    for bad in ("4:4", "3:2", "2-4", "dense"):
        with pytest.raises(ValueError, match="pattern"):
            SparsityPattern.parse(bad)
    w = torch.randn(4, 8)
    w.view(4, 2, 4)[..., 1:3] = 0
    assert detect_pattern([w]) == SparsityPattern(2, 4) and satisfies(w, SparsityPattern(2, 4))
    w = torch.randn(4, 8)
    w[:, [3, 5, 6, 7]] = 0  # 3 nonzeros in the first 4 inputs, 4 in all 8: 4:8 but not 2:4
    assert detect_pattern([w]) == SparsityPattern(4, 8) and not satisfies(w, SparsityPattern(2, 4))
    w[0, 5] = 1.0
    assert detect_pattern([w]) == SparsityPattern()


@pytest.mark.parametrize("n,count", [(5000, 40), (110_592, 2034), (3_000_000, 1000), (3_000_000, 150_000), (2_000_000, 1)])
def test_top_indices_finds_the_same_set_as_topk(n, count):
    from seft_trl.topology import top_indices

    score = torch.randn(n, generator=torch.Generator().manual_seed(n + count))
    for largest in (True, False):
        expected = torch.topk(score, count, largest=largest).indices
        got = top_indices(score, count, largest=largest)
        assert got.numel() == count and torch.equal(torch.sort(got).values, torch.sort(expected).values)


@pytest.mark.parametrize("count", [0, 1, 7, 40, 199, 200])
def test_smallest_in_order_is_a_stable_sorts_prefix(count):
    from seft_trl.topology import smallest_in_order

    values = torch.randint(0, 25, (200,), generator=torch.Generator().manual_seed(count)).float()  # many ties
    values[::3] = float("nan")  # NaN sorts last
    expected = torch.sort(values, stable=True).indices[:count]
    assert torch.equal(smallest_in_order(values, count), expected)
    values = torch.cat([values, torch.full((1000,), float("nan"))])  # the count-th smallest is NaN
    assert torch.equal(smallest_in_order(values, count), torch.sort(values, stable=True).indices[:count])


def test_capped_removals_keep_the_cheapest_share_of_the_budget_in_candidate_order():
    from seft_trl.topology import capped_removals

    score = torch.tensor([5.0, 1.0, 4.0, 0.5, 3.0, 2.0])
    assert capped_removals(score, 1000, None) is None  # no cap
    assert capped_removals(score, 1000, 0.01) is None  # 10 allowed: every candidate fits
    assert torch.equal(capped_removals(score, 300, 0.01), torch.tensor([1, 3, 5]))  # the 3 cheapest, by position
    assert capped_removals(score, 1000, 0.0).numel() == 0
