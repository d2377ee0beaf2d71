"""Topology decisions of sparsity evolution, as pure functions on tensors.

One update (every ``update_interval`` optimizer steps) swaps n delta positions:

* **drop** the n deltas with the smallest ``|δ|``;
* **grow** n new positions, outside the delta set, with the largest accumulated ``|grad|``;
  a grown position whose weight is zero is a *revival* of a pruned weight;
* **adapt**: each revival is paid for inside its scope group (layer, row or N:M group), first
  from the group's unused budget (slack), then by removing the non-delta support weight with
  the lowest accumulated sensitivity ``|w·grad|`` (or ``|w|``). A revival that cannot be paid
  for is not grown, and then fewer deltas are dropped, so the number of deltas never changes.

Candidates are chosen from one dense gradient at the start of the accumulation window
(:func:`select_candidates`) and ranked at the update by the gradient accumulated over the
window (:func:`plan_swap`). Ties break towards the lower flat index, so decisions are
deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .patterns import Scope


def drop_fraction_at(step: int, end_step: int, drop_fraction: float, schedule: str) -> float:
    """Fraction of deltas to swap at optimizer ``step``, decaying to 0 at ``end_step``."""
    if schedule == "constant":
        return drop_fraction
    progress = min(step / end_step, 1.0) if end_step > 0 else 1.0
    if schedule == "linear":
        return drop_fraction * (1.0 - progress)
    return drop_fraction * 0.5 * (1.0 + math.cos(math.pi * progress))


def is_update_step(step: int, update_interval: int, end_step: int) -> bool:
    return 0 < step <= end_step and step % update_interval == 0


def top_indices(score: torch.Tensor, count: int, largest: bool = True) -> torch.Tensor:
    """Indices of the ``count`` largest (or smallest) entries of a flat ``score``: the set ``torch.topk`` returns.

    On CPU ``torch.topk`` over tens of millions of entries costs several times the dense gradient
    itself, so large inputs first keep the entries beyond a threshold taken from a strided sample,
    loose enough to keep about twice ``count``; when at least ``count`` entries pass, the c-th
    entry lies beyond the threshold, so the exact top-c is among them.
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


_SAMPLED_TOPK_MIN = 1 << 20  # below this, plain topk is fast enough
_TOPK_SAMPLE = 1 << 16


@dataclass
class Candidates:
    """Positions tracked over an accumulation window (sorted, disjoint flat indices)."""

    grow_index: torch.Tensor  # [cg]
    remove_index: torch.Tensor  # [cr]


def select_candidates(
    grad: torch.Tensor,
    weight: torch.Tensor,
    delta_index: torch.Tensor,
    scope: Scope,
    count: int,
    regrow_pruned: bool,
    prune_criterion: str,
) -> Candidates:
    """Growth and removal candidates from one dense gradient.

    grad: fp32 [out, in]; weight: [out, in] (the effective weight); delta_index: [k].
    Growth: the ``count`` non-delta positions with the largest |grad| (pruned positions only
    when ``regrow_pruned``). Removal: in each scope group, as many non-delta, non-candidate
    support weights of lowest score as the group has revival candidates (all of them in an
    N:M group, which holds at most N).
    """
    # Memory: besides grad, one dense fp32 score buffer (reused for removal) and bool masks.
    flat_grad, flat_weight = grad.reshape(-1), weight.reshape(-1)
    pruned = flat_weight == 0
    pruned[delta_index] = False  # a delta position is in the support even when its value is 0

    grow_score = flat_grad.abs()
    grow_score[delta_index] = -1.0
    if not regrow_pruned:
        grow_score[pruned] = -1.0
    top = top_indices(grow_score, min(count, grow_score.numel()))
    grow_index = torch.sort(top[grow_score[top] >= 0]).values

    revival_index = grow_index[pruned[grow_index]]
    if revival_index.numel() == 0:
        return Candidates(grow_index, grow_index.new_empty(0))

    remove_score = grow_score.copy_(flat_weight)  # growth is decided: reuse its buffer
    if prune_criterion == "sensitivity":
        remove_score.mul_(flat_grad)
    remove_score.abs_()
    remove_score[pruned] = math.inf
    remove_score[delta_index] = math.inf
    remove_score[grow_index] = math.inf

    if scope.kind == "nm":
        members = scope.group_members(torch.unique(scope.group_of(revival_index))).reshape(-1)
        remove_index = members[torch.isfinite(remove_score[members])]
    elif scope.kind == "layer":
        bottom = top_indices(remove_score, min(revival_index.numel(), remove_score.numel()), largest=False)
        remove_index = bottom[torch.isfinite(remove_score[bottom])]
    else:
        rows = remove_score.view(-1, scope.in_features)
        per_row = torch.bincount(revival_index // scope.in_features, minlength=rows.shape[0])
        bottom = torch.topk(rows, int(per_row.max()), dim=1, largest=False)
        keep = torch.isfinite(bottom.values)
        keep &= torch.arange(bottom.values.shape[1], device=rows.device) < per_row.unsqueeze(1)
        row_ids = torch.arange(rows.shape[0], device=rows.device).unsqueeze(1).expand_as(keep)
        remove_index = row_ids[keep] * scope.in_features + bottom.indices[keep]
    return Candidates(grow_index, torch.sort(remove_index).values)


@dataclass
class SwapPlan:
    """What one update changes in one layer."""

    drop_slots: torch.Tensor  # [n] delta slots that give up their position
    grow_index: torch.Tensor  # [n] new flat positions, paired with drop_slots
    revived: int  # how many grown positions were pruned (weight 0)
    remove_index: torch.Tensor  # [m] support weights set to zero to pay for revivals


def _rank_within_groups(groups: torch.Tensor) -> torch.Tensor:
    """For each element, how many earlier elements share its group: [c] -> [c]."""
    order = torch.sort(groups, stable=True).indices
    _, counts = torch.unique_consecutive(groups[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(groups.numel(), device=groups.device) - torch.repeat_interleave(starts, counts)
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted
    return rank


def _count_in(sorted_values: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """How often each query occurs in ``sorted_values``."""
    return torch.searchsorted(sorted_values, queries, right=True) - torch.searchsorted(sorted_values, queries)


def plan_swap(
    delta_magnitude: torch.Tensor,
    grow_index: torch.Tensor,
    grow_score: torch.Tensor,
    grow_revives: torch.Tensor,
    grow_group: torch.Tensor,
    grow_slack: torch.Tensor,
    remove_index: torch.Tensor,
    remove_score: torch.Tensor,
    remove_group: torch.Tensor,
    n_target: int,
) -> SwapPlan:
    """Decide one update; see the module docstring.

    delta_magnitude: |δ| per slot [k]. Growth candidates [cg] (sorted by index): accumulated
    score, whether the position is pruned, its scope group and that group's slack (budget minus
    support). Removal candidates [cr] (sorted by index): score and group.
    """
    # Growth candidates in decreasing score; ties keep index order (stable sort).
    order = torch.sort(grow_score, descending=True, stable=True).indices
    index, revives, group, slack = grow_index[order], grow_revives[order], grow_group[order], grow_slack[order]

    # A revival is feasible while its group can still pay: slack first, then removal candidates.
    capacity = slack + _count_in(torch.sort(remove_group).values, group)
    rank = torch.zeros_like(index)
    rank[revives] = _rank_within_groups(group[revives])
    accepted = torch.nonzero(~revives | (rank < capacity)).squeeze(1)[:n_target]
    index, revives, group, slack = index[accepted], revives[accepted], group[accepted], slack[accepted]

    # Removals: per group, revivals beyond the slack, lowest score first (ties: lower index).
    revived_groups, inverse, revived_counts = torch.unique(group[revives], return_inverse=True, return_counts=True)
    group_slack = torch.zeros_like(revived_counts).scatter_(0, inverse, slack[revives])
    needed = (revived_counts - group_slack).clamp(min=0)
    removed = remove_index.new_empty(0)
    if revived_groups.numel() > 0:
        by_score = torch.sort(remove_score, stable=True).indices
        by_group = by_score[torch.sort(remove_group[by_score], stable=True).indices]
        groups = remove_group[by_group]
        position = torch.searchsorted(revived_groups, groups).clamp(max=revived_groups.numel() - 1)
        needed_here = torch.where(revived_groups[position] == groups, needed[position], 0)
        removed = remove_index[by_group[_rank_within_groups(groups) < needed_here]]
    assert removed.numel() == int(needed.sum()), "every revival must be paid for"

    n = index.numel()
    drop_slots = torch.sort(torch.sort(delta_magnitude, stable=True).indices[:n]).values
    return SwapPlan(
        drop_slots=drop_slots,
        grow_index=torch.sort(index).values,
        revived=int(revives.sum()),
        remove_index=torch.sort(removed).values,
    )
