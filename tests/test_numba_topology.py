"""The compiled CPU topology passes against the torch paths they replace: the same scores bit for bit,
the same candidates (also when the sampled threshold lets too few entries through), the same orders
and the same swap plans."""

from __future__ import annotations

import math

import pytest
import torch

from seft_trl import numba_topology, topology
from seft_trl.criteria import GROWTH_CRITERIA, REMOVAL_CRITERIA, SWAP_TESTS
from seft_trl.numba_topology import ScoredLayer
from seft_trl.patterns import Scope
from seft_trl.topology import plan_swap, select_candidates


def layer(rows: int, cols: int, seed: int) -> dict[str, torch.Tensor]:
    """A half-pruned layer with its gradient, curvature factors and 5% delta positions (int32)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator)
    weight[weight.abs() < 0.67] = 0
    return dict(
        grad=torch.randn(rows, cols, generator=generator) * torch.rand(cols, generator=generator),  # uneven columns
        weight=weight,
        delta_index=torch.randperm(rows * cols, generator=generator)[: rows * cols // 20].to(torch.int32),
        row_sq=torch.rand(rows, generator=generator),
        col_sq=torch.rand(cols, generator=generator),
    )


def torch_path(monkeypatch: pytest.MonkeyPatch, **kwargs) -> topology.Candidates:
    with monkeypatch.context() as patch:
        patch.setattr(topology, "_fused_kernel_names", lambda *args: None)
        return select_candidates(**kwargs)


@pytest.mark.parametrize("removal", sorted(REMOVAL_CRITERIA))
def test_compiled_scores_equal_the_criteria_bit_for_bit(removal):
    data = layer(40, 56, seed=1)
    excluded = torch.zeros(40, 56, dtype=torch.bool)
    excluded.view(-1)[data["delta_index"]] = True
    scored = ScoredLayer(removal, data["grad"], data["weight"], data["row_sq"], data["col_sq"], excluded, True)
    index, score = scored.beyond(math.inf, largest=False)  # every eligible entry
    eligible = torch.nonzero((data["weight"].view(-1) != 0) & ~excluded.view(-1)).squeeze(1)
    curvature = data["row_sq"][:, None] * data["col_sq"][None, :]
    expected = REMOVAL_CRITERIA[removal](data["weight"], data["grad"], curvature).view(-1)
    assert torch.equal(index, eligible) and torch.equal(score, expected[eligible])

    growth = ScoredLayer("gradient", data["grad"], data["weight"], data["row_sq"], data["col_sq"], excluded, False)
    index, score = growth.beyond(-math.inf, largest=True)
    outside = torch.nonzero(~excluded.view(-1)).squeeze(1)
    assert torch.equal(index, outside) and torch.equal(score, GROWTH_CRITERIA["gradient"](data["grad"]).view(-1)[outside])


@pytest.mark.parametrize("shape", [(12, 20), (300, 700), (700, 300)])
@pytest.mark.parametrize("removal", sorted(REMOVAL_CRITERIA))
@pytest.mark.parametrize("regrow_pruned", [True, False])
def test_compiled_selection_picks_the_torch_paths_candidates(monkeypatch, shape, removal, regrow_pruned):
    data = layer(*shape, seed=shape[0] + len(removal))
    n_candidates = max(3, shape[0] * shape[1] // 50)
    kwargs = dict(**data, scope=Scope("layer", shape[1]), n_candidates=n_candidates, regrow_pruned=regrow_pruned,
                  growth=GROWTH_CRITERIA["gradient"], removal=REMOVAL_CRITERIA[removal])
    assert topology._fused_kernel_names(data["grad"], kwargs["growth"], kwargs["removal"]) is not None
    fused, reference = select_candidates(**kwargs), torch_path(monkeypatch, **kwargs)
    assert fused.grow_index.dtype == fused.remove_index.dtype == torch.int32
    assert torch.equal(fused.grow_index, reference.grow_index.to(torch.int32))
    assert torch.equal(fused.remove_index, reference.remove_index.to(torch.int32))
    assert fused.grow_index.numel() == n_candidates
    assert fused.remove_index.numel() == (0 if not regrow_pruned else int((data["weight"].view(-1)[fused.grow_index] == 0).sum()))


def first_sampled(rows: int, cols: int, count: int) -> torch.Tensor:
    """The flat positions of the first ``count`` entries the compiled rankings sample for their threshold."""
    stride = topology._sample_plan(torch.Size([rows, cols]), 1)[0]
    return torch.arange(0, count * stride, stride)


def recorded_thresholds(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, ...]]:
    """The thresholds each compiled ranking tried, in call order: (first, last) per criterion ranked."""
    tried = []
    extreme, choose = ScoredLayer.extreme, numba_topology.choose_candidates

    def recorded_extreme(self, *args):
        index, thresholds = extreme(self, *args)
        tried.append(thresholds)
        return index, thresholds

    def recorded_choose(*args):
        grow, remove, thresholds = choose(*args)
        tried.append(thresholds)
        return grow, remove, thresholds

    monkeypatch.setattr(ScoredLayer, "extreme", recorded_extreme)
    monkeypatch.setattr(numba_topology, "choose_candidates", recorded_choose)
    return tried


@pytest.mark.parametrize("regrow_pruned", [True, False])
def test_a_threshold_that_lets_too_few_through_falls_back_to_every_entry(monkeypatch, regrow_pruned):
    """Large gradients only at the first sampled positions: the sample's threshold keeps far fewer
    than the candidates asked for, so the pass must run again with every eligible entry."""
    rows, cols = 300, 700
    grad = torch.rand(rows, cols, generator=torch.Generator().manual_seed(0))  # below 1
    grad.view(-1)[first_sampled(rows, cols, 400)] = 10.0
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(1))
    tried = recorded_thresholds(monkeypatch)
    kwargs = dict(grad=grad, weight=weight, delta_index=torch.tensor([5, 17], dtype=torch.int32),
                  scope=Scope("layer", cols), n_candidates=2000, regrow_pruned=regrow_pruned,
                  growth=GROWTH_CRITERIA["gradient"], removal=REMOVAL_CRITERIA["taylor"],
                  row_sq=torch.ones(rows), col_sq=torch.ones(cols))
    fused = select_candidates(**kwargs)
    assert tried[0][:2] == (10.0, -math.inf)  # growth: the sampled threshold, then everything
    assert torch.equal(fused.grow_index, torch_path(monkeypatch, **kwargs).grow_index.to(torch.int32))


def test_removal_collects_every_entry_when_its_threshold_passes_only_growth_candidates(monkeypatch):
    """The lowest removal scores sit at the first sampled positions, which growth takes as well (tiny
    weights under large gradients): once the growth candidates are excluded nothing the removal
    threshold kept is left, so removal must be collected again with every eligible entry."""
    rows, cols = 300, 700
    generator = torch.Generator().manual_seed(0)
    grad = torch.rand(rows, cols, generator=generator)  # below 1
    weight = torch.randn(rows, cols, generator=generator)
    weight[weight.abs() < 0.67] = 0  # half pruned: growth revives some
    trap = first_sampled(rows, cols, 400)
    grad.view(-1)[trap], weight.view(-1)[trap] = 5.0, 1e-3  # removal score ½w² ≈ 5e-7, the layer's lowest
    tried = recorded_thresholds(monkeypatch)
    kwargs = dict(grad=grad, weight=weight, delta_index=torch.tensor([1, 3], dtype=torch.int32),
                  scope=Scope("layer", cols), n_candidates=2000, regrow_pruned=True,
                  growth=GROWTH_CRITERIA["gradient"], removal=REMOVAL_CRITERIA["taylor"],
                  row_sq=torch.ones(rows), col_sq=torch.ones(cols))
    fused, reference = select_candidates(**kwargs), torch_path(monkeypatch, **kwargs)
    assert tried[0][2] == pytest.approx(5e-7) and tried[0][3] == math.inf  # removal: sampled, then everything
    assert set(trap.tolist()) <= set(fused.grow_index.tolist())
    assert torch.equal(fused.grow_index, reference.grow_index.to(torch.int32))
    assert torch.equal(fused.remove_index, reference.remove_index.to(torch.int32))
    assert fused.remove_index.numel() == int((weight.view(-1)[fused.grow_index.long()] == 0).sum()) > 0


def test_equal_scores_at_the_cut_go_to_the_lower_positions():
    rows, cols = 300, 700
    grad = torch.rand(rows, cols, generator=torch.Generator().manual_seed(0))
    grad[:, ::2] = 2.0  # 105,000 equal best scores for 1,000 candidates
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(1))
    c = select_candidates(grad=grad, weight=weight, delta_index=torch.tensor([0], dtype=torch.int32),
                          scope=Scope("layer", cols), n_candidates=1000, regrow_pruned=True,
                          growth=GROWTH_CRITERIA["gradient"], removal=REMOVAL_CRITERIA["taylor"],
                          row_sq=torch.ones(rows), col_sq=torch.ones(cols))
    assert c.grow_index.tolist() == list(range(2, 2001, 2))  # position 0 is a delta


def test_non_finite_scores_are_never_candidates(monkeypatch):
    data = layer(300, 700, seed=3)
    data["grad"].view(-1)[5::89] = float("inf")  # best by rank, then dropped: as on the torch path
    kwargs = dict(**data, scope=Scope("layer", 700), n_candidates=3000, regrow_pruned=True,
                  growth=GROWTH_CRITERIA["gradient"], removal=REMOVAL_CRITERIA["taylor"])
    fused, reference = select_candidates(**kwargs), torch_path(monkeypatch, **kwargs)
    assert torch.equal(fused.grow_index, reference.grow_index.to(torch.int32))
    assert torch.equal(fused.remove_index, reference.remove_index.to(torch.int32))
    assert 0 < fused.grow_index.numel() < 3000
    data["grad"].view(-1)[::97] = float("nan")  # a NaN never passes a threshold here (the update is skipped anyway)
    fused = select_candidates(**kwargs)
    assert torch.isfinite(data["grad"].view(-1)[fused.grow_index.long()]).all() and fused.grow_index.numel() > 0


def test_nm_scope_removal_takes_every_free_support_weight_of_the_revival_groups():
    weight = torch.randn(4, 16)
    weight.view(4, 4, 4)[..., :2] = 0  # 2:4, the first two inputs of each group pruned
    grad = torch.zeros(4, 16)
    grad[0, 0] = grad[1, 4] = grad[2, 10] = 5.0  # two revivals (pruned) and one live weight
    delta_index = torch.tensor([16 + 6, 3 * 16 + 2], dtype=torch.int32)  # a delta on a live weight of group (1, 1)
    c = select_candidates(grad, weight, delta_index, Scope("nm", 16, 2, 4), 3, True, GROWTH_CRITERIA["gradient"],
                          REMOVAL_CRITERIA["magnitude"], torch.ones(4), torch.ones(16))
    assert c.grow_index.tolist() == [0, 20, 42]
    # Revival groups: row 0 inputs 0-3 (live 2, 3) and row 1 inputs 4-7 (live 6, 7; 6 is a delta).
    assert c.remove_index.tolist() == [2, 3, 16 + 7]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_support_per_row_counts_what_a_mask_counts(dtype):
    from seft_trl.numba_topology import support_per_row

    weight = torch.randn(37, 53, generator=torch.Generator().manual_seed(0)).to(dtype)
    weight[weight.abs() < 0.5] = 0
    weight[3, :7] = -0.0  # zero, though its sign bit is set
    weight[5, 2], weight[6, 1] = float("nan"), float("-inf")
    delta_index = torch.tensor([3 * 53 + 1, 3 * 53 + 2, 5 * 53 + 2, 36 * 53 + 52, 0], dtype=torch.int32)

    def expected(weight, delta_index):
        support = (weight != 0).contiguous()
        support.view(-1)[delta_index] = True
        return support.sum(dim=1), int((weight.reshape(-1)[delta_index] == 0).sum())

    def check(weight, delta_index):
        per_row, zero_deltas = support_per_row(weight, delta_index)
        want_per_row, want_zero_deltas = expected(weight, delta_index)
        assert torch.equal(per_row, want_per_row) and zero_deltas == want_zero_deltas

    check(weight, delta_index)
    check(weight, delta_index[:0])
    check(weight[:, 10:], delta_index[:2])  # a strided view


@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize("n", [0, 1, 300, 20_000])
def test_stable_argsort_orders_as_torchs_stable_sort(descending, n):
    from seft_trl.numba_topology import stable_argsort

    generator = torch.Generator().manual_seed(n)
    values = torch.randn(n, generator=generator) * 10 ** torch.randint(-40, 38, (n,), generator=generator).float()
    if n >= 300:
        values[::7] = values[3]  # ties
        values[1::11] = 0.0
        values[2::13] = -0.0
        values[4::17] = float("nan")
        values[5::19], values[6::23] = float("inf"), float("-inf")
        values[8::29] = -float("nan")
    expected = torch.sort(values, descending=descending, stable=True).indices
    assert torch.equal(stable_argsort(values, descending), expected)


def test_compiled_passes_leave_the_weights_storage_resizable():
    """FSDP2 frees a gathered parameter by resizing its storage to zero; Tensor.numpy() would forbid that."""
    from seft_trl.numba_topology import support_per_row

    data = layer(30, 40, seed=0)
    weight = data.pop("weight")
    support_per_row(weight, data["delta_index"])
    select_candidates(weight=weight, scope=Scope("layer", 40), n_candidates=20, regrow_pruned=True,
                      growth=GROWTH_CRITERIA["gradient"], removal=REMOVAL_CRITERIA["taylor"], **data)
    weight.untyped_storage().resize_(0)  # raises if any pass pinned the storage


def random_plan_inputs(seed: int, k: int, n_grow: int, n_remove: int, slack: int, swap_test: str,
                       column_cap: bool) -> dict:
    """A layer-scope planning problem with ties, zeros and NaN among the scores."""
    generator = torch.Generator().manual_seed(seed)

    def scores(n: int) -> torch.Tensor:
        values = torch.randn(n, generator=generator).abs()
        if n > 20:
            values[::9] = values[1]  # ties
            values[2::17] = 0.0
            values[3::23] = float("nan")
        return values

    args = dict(
        delta_magnitude=scores(k),
        drop_forgone=torch.randn(k, generator=generator) * 0.5,
        grow_index=torch.randperm(10 * n_grow + 1, generator=generator)[:n_grow].sort().values.to(torch.int32),
        grow_score=scores(n_grow),
        grow_gain=scores(n_grow),
        grow_revives=torch.rand(n_grow, generator=generator) < 0.4,
        grow_group=torch.zeros(n_grow, dtype=torch.int64),
        grow_slack=torch.full((n_grow,), slack, dtype=torch.int64),
        layer_slack=slack // 2 + 3,
        remove_index=torch.randperm(10 * n_remove + 1, generator=generator)[:n_remove].sort().values.to(torch.int32),
        remove_score=scores(n_remove),
        remove_cost=scores(n_remove) * 0.3,
        remove_group=torch.zeros(n_remove, dtype=torch.int64),
        n_swaps=n_grow // 3 + 1,
        swap_test=SWAP_TESTS[swap_test],
    )
    if column_cap:
        args["grow_column"] = torch.randint(0, 7, (n_grow,), generator=generator)
        args["grow_column_room"] = torch.randint(0, n_grow // 10 + 2, (n_grow,), generator=generator)
    return args


@pytest.mark.parametrize("swap_test", sorted(SWAP_TESTS))
@pytest.mark.parametrize("column_cap", [False, True])
@pytest.mark.parametrize("sizes", [(50, 0, 0, 0), (50, 40, 0, 0), (300, 200, 30, 10), (2000, 1600, 600, 0)])
def test_compiled_plan_decides_as_the_torch_planner(monkeypatch, swap_test, column_cap, sizes):
    k, n_grow, n_remove, slack = sizes
    moved = 0
    for seed in range(3):
        args = random_plan_inputs(seed, k, n_grow, n_remove, slack, swap_test, column_cap)
        compiled = plan_swap(**args)
        with monkeypatch.context() as patch:
            patch.setattr(topology, "_compiles_as_one_group", lambda *a: False)
            expected = plan_swap(**args)
        for field in ("drop_slots", "grow_index", "grow_candidate", "remove_index"):
            got, want = getattr(compiled, field), getattr(expected, field)
            assert got.dtype == want.dtype and torch.equal(got, want), (field, seed)
        assert (compiled.revived, compiled.refused) == (expected.revived, expected.refused)
        moved += expected.grow_index.numel()
    assert moved > 0 or n_grow == 0


def test_plans_of_several_groups_stay_on_the_torch_planner(monkeypatch):
    args = random_plan_inputs(0, 300, 200, 30, 0, "taylor", False)
    args["grow_group"] = torch.arange(200) % 2
    args["remove_group"] = torch.arange(30) % 2
    monkeypatch.setattr(numba_topology, "plan_single_group", None)  # would fail if called
    assert plan_swap(**args).grow_index.numel() > 0
