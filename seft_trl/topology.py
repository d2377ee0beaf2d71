"""Topology decisions of sparsity evolution, as pure functions on tensors.

One update (every ``update_interval`` optimizer steps) moves up to ``n_swaps`` delta slots:

* **drop** the ``n_swaps`` deltas with the smallest ``|δ|``;
* **grow** as many new positions, outside the delta set, ranked by the growth criterion (largest
  accumulated ``|grad|``); a grown position whose weight is zero is a *revival* of a pruned weight;
* **adapt**: each revival is paid for inside its scope group (layer, row or N:M group), first
  from unused budget (slack: the group's, and for N:M also the layer's, so that a layer never
  holds more nonzeros than it started with), then by removing the support weight of lowest
  removal score (:mod:`seft_trl.criteria`). A revival that cannot be paid for is not grown;
* **test**: with a swap test, candidates are ranked by net benefit, the predicted gain of the
  grown delta minus the predicted cost of the weight removed to pay for it, and a pair moves only
  where that exceeds what the dropped delta would still have gained. Fewer pairs than ``n_swaps``
  may move (none, when nothing is worth it); the number of deltas never changes;
* **spread** (optional): an input column takes grown deltas only up to its room under a cap, so
  growth cannot pile the layer's deltas into the few columns of largest activations, where they all
  move the outputs along one input feature (see ``column_cap`` in :mod:`seft_trl.config`).

Candidates are chosen from one dense gradient at the start of the accumulation window
(:func:`select_candidates`) and decided at the update from the statistics accumulated over the
window (:func:`plan_swap`). Ties break towards the lower index, so decisions are deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .criteria import GROWTH_CRITERIA, REMOVAL_CRITERIA, SWAP_TESTS, GrowthScore, RemovalScore, SwapTest
from .kernels import compiled_on_cpu
from .patterns import Scope


def drop_fraction_at(step: int, end_step: int, drop_fraction: float, schedule: str) -> float:
    """Fraction of deltas to swap at optimizer ``step``, decaying to 0 at ``end_step``."""
    if schedule == "constant":
        return drop_fraction
    progress = min(step / end_step, 1.0) if end_step > 0 else 1.0
    if schedule == "linear":
        return drop_fraction * (1.0 - progress)
    return drop_fraction * 0.5 * (1.0 + math.cos(math.pi * progress))


def is_update_step(step: int, update_interval: int, end_step: int, offset: int = 0) -> bool:
    """Whether a group of layers whose updates sit ``offset`` steps into each interval updates at ``step``:
    once an interval, from the first interval's end to ``end_step``."""
    return update_interval <= step <= end_step and (step - offset) % update_interval == 0


def window_group_offsets(update_interval: int, groups: int) -> list[int]:
    """Each group's offset into the update interval: spread evenly, the first at 0 (one group: every
    layer updates at each multiple of the interval, as in the paper)."""
    return [round(g * update_interval / groups) for g in range(groups)]


def next_update_step(step: int, update_interval: int, offset: int) -> int:
    """The first step at or after ``step`` at which a group at ``offset`` updates (the run's end aside)."""
    update = step + (offset - step) % update_interval
    return update if update >= update_interval else update + update_interval


def top_indices(score: torch.Tensor, count: int, largest: bool = True) -> torch.Tensor:
    """Indices of the ``count`` largest (or smallest) entries of a flat ``score``: the set ``torch.topk`` returns.

    On CPU ``torch.topk`` costs several times the dense gradient itself (the update picks a few
    percent of each layer), so inputs of more than ``_SAMPLED_TOPK_MIN`` entries first keep the
    entries beyond a threshold taken from a strided sample, loose enough to keep about twice
    ``count``; when at least ``count`` entries pass, the c-th entry lies beyond the threshold, so
    the exact top-c is among them.
    """
    n = score.numel()
    if n <= _SAMPLED_TOPK_MIN or count * 16 > n:
        return torch.topk(score, count, largest=largest, sorted=False).indices
    sample = score[:: n // _TOPK_SAMPLE]
    rank = min(sample.numel(), 2 * count * sample.numel() // n + 16)
    bound = torch.topk(sample, rank, largest=largest, sorted=False).values
    passes = score >= bound.min() if largest else score <= bound.max()
    survivors = torch.nonzero(passes).squeeze(1)
    if survivors.numel() < count:
        return torch.topk(score, count, largest=largest, sorted=False).indices
    return survivors[torch.topk(score[survivors], count, largest=largest, sorted=False).indices]


# Below this, plain topk is as fast; the sample's size hardly matters between 2¹² and 2¹⁶
# (timings: benchmarks/results/engine_constants.md).
_SAMPLED_TOPK_MIN = 1 << 16
_TOPK_SAMPLE = 1 << 14


@dataclass
class Candidates:
    """Positions tracked over an accumulation window (sorted, disjoint flat indices)."""

    grow_index: torch.Tensor  # [cg]
    remove_index: torch.Tensor  # [cr]


# Elements (whole rows) of the dense removal score computed at once: a criterion's temporaries
# then stay in cache (timings against 2²²: benchmarks/results/engine_constants.md).
_SCORE_CHUNK = 1 << 16


def _registry_name(registry: dict, function) -> str | None:
    return next((name for name, registered in registry.items() if registered is function), None)


def _fused_kernel_names(grad: torch.Tensor, growth: GrowthScore, removal: RemovalScore) -> tuple[str, str] | None:
    """The criteria's names when the compiled CPU selection (:mod:`seft_trl.numba_topology`) scores them."""
    if not compiled_on_cpu(grad):
        return None
    from .numba_topology import SCORE_KINDS

    names = _registry_name(GROWTH_CRITERIA, growth), _registry_name(REMOVAL_CRITERIA, removal)
    return names if all(name in SCORE_KINDS for name in names) else None  # type: ignore[return-value]


def _contains(sorted_values: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """bool [q]: which of ``query`` occur in the ascending ``sorted_values``."""
    if sorted_values.numel() == 0:
        return torch.zeros(query.shape, dtype=torch.bool, device=query.device)
    at = torch.searchsorted(sorted_values, query).clamp_(max=sorted_values.numel() - 1)
    return sorted_values[at] == query


# Entries sampled for the compiled pass's threshold. Its reads are scattered over the layer (a cache
# miss each), and the threshold only needs to land near twice ``count``: a quarter of
# ``_TOPK_SAMPLE`` took the samples' share of a SmolLM2 window start from 0.12 to 0.03 s.
_FUSED_SAMPLE = 1 << 12


def _sample_plan(shape: torch.Size, count: int) -> tuple[int, int]:
    """(stride, rank) of a compiled ranking's threshold: every ``stride``-th entry is sampled, and its
    ``rank``-th best score is loose enough to keep about twice ``count`` entries (as :func:`top_indices`)."""
    n = shape[0] * shape[1]
    stride = max(1, n // _FUSED_SAMPLE)
    while math.gcd(stride, shape[1]) > 1:  # a stride sharing a factor with the row length
        stride += 1  # would sample a few columns only
    return stride, 2 * count * -(-n // stride) // n + 16  # the sample's share of 2 × count, before exclusions


def _fused_extreme(
    criterion: str, grad: torch.Tensor, weight: torch.Tensor, row_sq: torch.Tensor, col_sq: torch.Tensor,
    count: int, largest: bool, skip_zero: bool, excluded: torch.Tensor,
) -> torch.Tensor:
    """Flat positions (int64, ascending) of the ``count`` largest (or smallest) finite scores of ``criterion``.

    Among eligible entries: where ``excluded`` (bool [out, in]) is False, and the weight is nonzero
    where ``skip_zero``. A strided sample sets a threshold (:func:`_sample_plan`), a compiled pass
    keeps the entries beyond it, and the exact top ``count`` is taken among those
    (:meth:`~seft_trl.numba_topology.ScoredLayer.extreme`).
    """
    from .numba_topology import ScoredLayer

    layer = ScoredLayer(criterion, grad, weight, row_sq, col_sq, excluded, skip_zero)
    return layer.extreme(count, largest, *_sample_plan(grad.shape, count))[0]


def select_candidates(
    grad: torch.Tensor,
    weight: torch.Tensor,
    delta_index: torch.Tensor,
    scope: Scope,
    n_candidates: int,
    regrow_pruned: bool,
    growth: GrowthScore,
    removal: RemovalScore,
    row_sq: torch.Tensor,
    col_sq: torch.Tensor,
) -> Candidates:
    """Growth and removal candidates from one dense gradient.

    grad: fp32 [out, in]; weight: [out, in] (the effective weight); delta_index: [k]; row_sq [out]
    and col_sq [in]: the curvature factors of the same micro-batch (see :mod:`seft_trl.criteria`).
    Growth: the ``n_candidates`` non-delta positions of highest growth score (pruned positions only when
    ``regrow_pruned``). Removal: in each scope group, as many non-delta, non-candidate support
    weights of lowest removal score as the group has revival candidates (all of them in an N:M
    group, which holds at most N). Both come in the dtype of ``delta_index``, sorted.

    On the CPU with Numba the layer-wide rankings run as compiled passes
    (:mod:`seft_trl.numba_topology`); elsewhere as torch operations over the dense scores.
    """
    fused = _fused_kernel_names(grad, growth, removal)
    flat_weight = weight.reshape(-1)
    if fused is not None:
        excluded = torch.zeros(grad.shape, dtype=torch.bool)  # [out, in]: the deltas
        excluded.view(-1)[delta_index] = True
        if scope.kind == "layer" and regrow_pruned:  # both rankings in one compiled call
            from .numba_topology import choose_candidates

            stride, rank = _sample_plan(grad.shape, n_candidates)  # the revivals are at most n_candidates
            grow_index, remove_index, _ = choose_candidates(*fused, grad, weight, row_sq, col_sq, excluded,
                                                            n_candidates, stride, rank)
            return Candidates(grow_index.to(delta_index.dtype), remove_index.to(delta_index.dtype))
        # Without revival every growth candidate is a nonzero weight: no removal, in layer scope.
        grow_index = _fused_extreme(fused[0], grad, weight, row_sq, col_sq, n_candidates, True, not regrow_pruned,
                                    excluded)
    else:
        grow_index = torch.sort(_dense_growth(grad, flat_weight, delta_index, n_candidates, regrow_pruned, growth)).values

    revival_index = grow_index[flat_weight[grow_index] == 0]  # no candidate is a delta position
    if revival_index.numel() == 0:
        remove_index = grow_index.new_empty(0)
    elif scope.kind == "nm":
        members = scope.group_members(torch.unique(scope.group_of(revival_index))).reshape(-1)
        taken = torch.sort(torch.cat([delta_index.long(), grow_index])).values  # positions removal may not take
        remove_index = members[(flat_weight[members] != 0) & ~_contains(taken, members)]
    else:
        remove_index = _dense_removal(grad, weight, delta_index, grow_index, revival_index, scope, removal,
                                      row_sq, col_sq)
        remove_index = torch.sort(remove_index).values
    index_dtype = delta_index.dtype
    return Candidates(grow_index.to(index_dtype), remove_index.to(index_dtype))


def _dense_growth(grad: torch.Tensor, flat_weight: torch.Tensor, delta_index: torch.Tensor, n_candidates: int,
                  regrow_pruned: bool, growth: GrowthScore) -> torch.Tensor:
    """Growth candidates from the dense growth score (unsorted)."""
    grow_score = growth(grad.reshape(-1)).float()
    if not regrow_pruned:
        grow_score.masked_fill_(flat_weight == 0, -math.inf)
    grow_score[delta_index] = -math.inf  # a delta position is in the support even when its value is 0
    top = top_indices(grow_score, min(n_candidates, grow_score.numel()))
    return top[torch.isfinite(grow_score[top])]


def _dense_removal(grad: torch.Tensor, weight: torch.Tensor, delta_index: torch.Tensor, grow_index: torch.Tensor,
                   revival_index: torch.Tensor, scope: Scope, removal: RemovalScore, row_sq: torch.Tensor,
                   col_sq: torch.Tensor) -> torch.Tensor:
    """Removal candidates of a layer or row scope from the dense removal score (unsorted)."""
    remove_score = torch.empty_like(grad)  # [out, in]
    rows = max(1, _SCORE_CHUNK // grad.shape[1])
    for start in range(0, grad.shape[0], rows):
        part = slice(start, start + rows)
        weight_part = weight[part].float()
        curvature = row_sq[part, None] * col_sq[None, :]
        score = remove_score[part]
        score.copy_(removal(weight_part, grad[part], curvature))
        score.masked_fill_(weight_part == 0, math.inf)  # a pruned weight has nothing to remove
    remove_score = remove_score.view(-1)
    remove_score[delta_index] = math.inf
    remove_score[grow_index] = math.inf
    if scope.kind == "layer":
        bottom = top_indices(remove_score, min(revival_index.numel(), remove_score.numel()), largest=False)
        return bottom[torch.isfinite(remove_score[bottom])]
    by_row = remove_score.view(-1, scope.in_features)
    per_row = torch.bincount(revival_index // scope.in_features, minlength=by_row.shape[0])
    bottom = torch.topk(by_row, int(per_row.max()), dim=1, largest=False)
    keep = torch.isfinite(bottom.values)
    keep &= torch.arange(bottom.values.shape[1], device=by_row.device) < per_row.unsqueeze(1)
    row_ids = torch.arange(by_row.shape[0], device=by_row.device).unsqueeze(1).expand_as(keep)
    return row_ids[keep] * scope.in_features + bottom.indices[keep]


def _stable_order(values: torch.Tensor, descending: bool = False) -> torch.Tensor:
    """``torch.sort(values, descending=descending, stable=True).indices``; by radix on the CPU with Numba."""
    if compiled_on_cpu(values) and values.dtype == torch.float32:
        from .numba_topology import stable_argsort

        return stable_argsort(values, descending)
    return torch.sort(values, descending=descending, stable=True).indices


def smallest_in_order(values: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` smallest ``values``, ascending, ties by lower index: the first ``count``
    of a stable sort, without sorting all of them (an update swaps a fifth of the deltas or fewer)."""
    bound = torch.kthvalue(values, count).values if 0 < count and 4 * count < values.numel() else None
    if bound is None or bool(bound.isnan()):  # NaN: nothing compares below it
        return _stable_order(values)[:count]
    below = values < bound
    ties = torch.nonzero(values == bound).squeeze(1)[: count - int(below.sum())]  # the lowest indices
    below[ties] = True
    chosen = torch.nonzero(below).squeeze(1)  # ascending: the stable sort below keeps ties in index order
    return chosen[_stable_order(values[chosen])]


def capped_removals(remove_score: torch.Tensor, support_budget: int, revival_cap: float | None) -> torch.Tensor | None:
    """The removal candidates an update may use under ``revival_cap`` (a fraction of the layer's starting
    nonzeros, ``support_budget``): the ``⌊cap · budget⌋`` of lowest score, in candidate order; None where
    every candidate may be used.

    The planner pays revivals in growth-score order with the cheapest removals first, so keeping only
    the cheapest ``⌊cap · budget⌋`` candidates pays the revivals of largest gradient and no more; the
    rest are infeasible, like revivals past the end of the candidates.
    """
    if revival_cap is None:
        return None
    allowed = math.floor(revival_cap * support_budget)
    if allowed >= remove_score.numel():
        return None
    return torch.sort(smallest_in_order(remove_score, allowed)).values


@dataclass
class SwapPlan:
    """What one update changes in one layer. Pairs are aligned: slot ``drop_slots[p]`` moves to
    ``grow_index[p]``, whose window statistics are those of growth candidate ``grow_candidate[p]``."""

    drop_slots: torch.Tensor  # [n] delta slots that give up their position (sorted)
    grow_index: torch.Tensor  # [n] their new flat positions
    grow_candidate: torch.Tensor  # [n] index into the growth candidates
    revived: int  # how many grown positions were pruned (weight 0)
    remove_index: torch.Tensor  # [m] support weights set to zero to pay for revivals (sorted)
    refused: int  # ranked pairs the swap test turned down


def _single_group(groups: torch.Tensor) -> bool:
    """Whether every element is in one group (a layer scope): the planner's sorts by group are then no-ops."""
    return groups.numel() == 0 or bool((groups == groups[0]).all())


def _rank_within_groups(groups: torch.Tensor) -> torch.Tensor:
    """For each element, how many earlier elements share its group: [c] -> [c]."""
    if _single_group(groups):
        return torch.arange(groups.numel(), device=groups.device)
    order = torch.sort(groups, stable=True).indices
    _, counts = torch.unique_consecutive(groups[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(groups.numel(), device=groups.device) - torch.repeat_interleave(starts, counts)
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted
    return rank


def _assign_payments(
    revives: torch.Tensor,
    group: torch.Tensor,
    slack: torch.Tensor,
    layer_slack: int,
    remove_rank: torch.Tensor,
    remove_group: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """How each revival (in priority order) is paid: its group's unused budget, or one removal.

    Slack is spent first, per group while the group has some and in all while the layer has some
    (an N:M group under N may only fill up while the layer stays within its starting count). The
    others take their group's removal candidates in increasing ``remove_rank``, one each.
    Returns ``feasible`` bool [c] and ``payment`` int64 [c]: the removal candidate paying for each
    growth candidate, -1 where none is needed (a non-revival, or slack).
    """
    rank = torch.zeros_like(group)
    rank[revives] = _rank_within_groups(group[revives])
    wants_slack = revives & (rank < slack)
    uses_slack = wants_slack & (torch.cumsum(wants_slack.long(), 0) <= layer_slack)
    needs_removal = revives & ~uses_slack
    removal_rank = torch.zeros_like(group)
    removal_rank[needs_removal] = _rank_within_groups(group[needs_removal])

    by_rank = _stable_order(remove_rank)
    by_group = by_rank if _single_group(remove_group) else by_rank[torch.sort(remove_group[by_rank], stable=True).indices]
    sorted_groups = remove_group[by_group]
    first = torch.searchsorted(sorted_groups, group)
    available = torch.searchsorted(sorted_groups, group, right=True) - first
    feasible = ~needs_removal | (removal_rank < available)
    payment = torch.full_like(group, -1)
    paid = needs_removal & feasible
    if bool(paid.any()):
        payment[paid] = by_group[first[paid] + removal_rank[paid]]
    return feasible, payment


def plan_swap(
    delta_magnitude: torch.Tensor,
    drop_forgone: torch.Tensor,
    grow_index: torch.Tensor,
    grow_score: torch.Tensor,
    grow_gain: torch.Tensor,
    grow_revives: torch.Tensor,
    grow_group: torch.Tensor,
    grow_slack: torch.Tensor,
    layer_slack: int,
    remove_index: torch.Tensor,
    remove_score: torch.Tensor,
    remove_cost: torch.Tensor,
    remove_group: torch.Tensor,
    n_swaps: int,
    swap_test: SwapTest | None,
    grow_column: torch.Tensor | None = None,
    grow_column_room: torch.Tensor | None = None,
) -> SwapPlan:
    """Decide one update; see the module docstring.

    Per delta slot [k]: ``|δ|`` and what dropping it gives up (its own predicted gain). Per growth
    candidate [cg]: growth score, predicted gain, whether it revives a pruned weight, its scope
    group and that group's slack; ``layer_slack``: the layer's starting count minus its support.
    Per removal candidate [cr]: removal score (lower goes first), predicted cost, group.
    ``swap_test`` None ranks by growth score and swaps every feasible pair; a test ranks by net
    benefit (gain − cost of the removal that pays) and keeps the pairs it accepts.
    ``grow_column`` / ``grow_column_room`` [cg]: each candidate's input column and how many more
    deltas that column may take; in priority order, candidates past their column's room are passed
    over (None: no cap).
    """
    scores = (delta_magnitude, drop_forgone, grow_score, grow_gain, remove_score, remove_cost)
    if _compiles_as_one_group(scores, grow_revives, grow_group, remove_group, swap_test):
        return _plan_one_group(
            delta_magnitude, drop_forgone, grow_index, grow_score, grow_gain, grow_revives, grow_slack, layer_slack,
            remove_index, remove_score, remove_cost, n_swaps, swap_test, grow_column, grow_column_room,
        )
    order = _stable_order(grow_score, descending=True)
    feasible, payment = _assign_payments(
        grow_revives[order], grow_group[order], grow_slack[order], layer_slack, remove_score, remove_group
    )
    candidate, payment = order[feasible], payment[feasible]
    if swap_test is not None:
        cost = torch.zeros_like(grow_gain[candidate])
        paid = payment >= 0
        cost[paid] = remove_cost[payment[paid]]
        benefit = grow_gain[candidate] - cost
        ranked = _stable_order(benefit, descending=True)
    else:
        ranked = torch.arange(candidate.numel(), device=candidate.device)  # already in growth-score order
    if grow_column_room is not None:
        in_order = candidate[ranked]
        ranked = ranked[_rank_within_groups(grow_column[in_order]) < grow_column_room[in_order]]
    ranked = ranked[:n_swaps]
    candidate, payment = candidate[ranked], payment[ranked]
    if swap_test is not None:
        benefit = benefit[ranked]
    drop_slots = smallest_in_order(delta_magnitude, candidate.numel())
    refused = 0
    if swap_test is not None:
        accept = swap_test(benefit, drop_forgone[drop_slots])
        refused = int((~accept).sum())
        candidate, payment, drop_slots = candidate[accept], payment[accept], drop_slots[accept]

    by_slot = torch.sort(drop_slots).indices
    return SwapPlan(
        drop_slots=drop_slots[by_slot],
        grow_index=grow_index[candidate[by_slot]],
        grow_candidate=candidate[by_slot],
        revived=int(grow_revives[candidate].sum()),
        remove_index=torch.sort(remove_index[payment[payment >= 0]]).values,
        refused=refused,
    )


def _compiles_as_one_group(scores: tuple[torch.Tensor, ...], grow_revives: torch.Tensor, grow_group: torch.Tensor,
                           remove_group: torch.Tensor, swap_test: SwapTest | None) -> bool:
    """Whether :func:`plan_swap` can run as one compiled pass: on the CPU with Numba, fp32 ``scores``, every
    candidate in one scope group (a layer scope), and a swap test the kernel knows. A layer's plan in torch
    is about a hundred small operations on a few thousand entries, dominated by their dispatch
    (benchmarks/results/engine_constants.md)."""
    if not compiled_on_cpu(grow_revives) or swap_test not in (None, SWAP_TESTS["taylor"]):
        return False
    if grow_revives.dtype != torch.bool or any(t.dtype != torch.float32 for t in scores):
        return False
    return _single_group(torch.cat([grow_group, remove_group]))


def _plan_one_group(
    delta_magnitude: torch.Tensor, drop_forgone: torch.Tensor, grow_index: torch.Tensor, grow_score: torch.Tensor,
    grow_gain: torch.Tensor, grow_revives: torch.Tensor, grow_slack: torch.Tensor, layer_slack: int,
    remove_index: torch.Tensor, remove_score: torch.Tensor, remove_cost: torch.Tensor, n_swaps: int,
    swap_test: SwapTest | None, grow_column: torch.Tensor | None, grow_column_room: torch.Tensor | None,
) -> SwapPlan:
    """:func:`plan_swap`'s decisions, compiled (:func:`seft_trl.numba_topology.plan_single_group`)."""
    from .numba_topology import plan_single_group

    # A revival fills unused budget while its group (here: everyone's) and the layer both have some.
    free_slack = min(int(grow_slack[0]), layer_slack) if grow_slack.numel() else 0
    drop_slots, candidate, payment, refused = plan_single_group(
        grow_score, grow_gain, grow_revives, free_slack, remove_score, remove_cost, n_swaps, swap_test is not None,
        grow_column, grow_column_room, delta_magnitude, drop_forgone,
    )
    return SwapPlan(
        drop_slots=drop_slots,
        grow_index=grow_index[candidate],
        grow_candidate=candidate,
        revived=int(grow_revives[candidate].sum()),
        remove_index=torch.sort(remove_index[payment[payment >= 0]]).values,
        refused=refused,
    )
