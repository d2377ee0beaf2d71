"""The sparse-delta linear layer: trainable deltas at k positions of a frozen (pruned) weight.

The effective weight W' (W with W'[p] = base[p] + δ at the delta positions) lives in the
``weight`` tensor itself and is rewritten after every optimizer step and topology change
(:meth:`SparseDeltaLinear.materialize`), so the forward is a plain ``F.linear`` with no copy.
The backward returns the input gradient through W' and the δ gradient sampled at the k
positions (:mod:`seft_trl.kernels`); the dense weight gradient is only formed once per
accumulation window, to choose topology candidates.

State per layer is O(k): δ (fp32), the flat positions, the fp32 base values, the budget, and
during a window the candidate positions with their accumulated gradients. No mask is stored;
the support (nonzero weights ∪ delta positions) is recomputed from the weight when needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import SamplingPattern, dense_weight_gradient, sampled_weight_gradient
from .patterns import Scope
from .topology import Candidates, SwapPlan, plan_swap, select_candidates


@dataclass
class UpdateStats:
    """What one topology update did to one layer."""

    dropped: int
    grown: int
    revived: int
    removed: int
    support: int
    budget: int


@dataclass
class WindowStatistics:
    """Candidates of one accumulation window and their accumulated weight gradients."""

    candidates: Candidates
    grad_sum: torch.Tensor  # fp32 [cg + cr]
    # Over cat(delta_index, grow_index, remove_index): one sampled product serves the δ gradient
    # and the statistics (delta positions do not change inside a window). Built on first use.
    pattern: SamplingPattern | None = None


class _SparseDeltaLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, delta, layer):  # noqa: ARG004 - delta is an input only for autograd
        ctx.layer = layer
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        layer: SparseDeltaLinear = ctx.layer
        grad_x = grad_bias = grad_delta = None
        if ctx.needs_input_grad[0]:
            # Under autocast the output (hence grad_output) is in the autocast dtype.
            grad_x = (grad_output @ weight.to(grad_output.dtype)).to(x.dtype)
        g = grad_output.reshape(-1, grad_output.shape[-1])  # [T, out]
        if ctx.needs_input_grad[2]:
            grad_bias = g.sum(0).to(layer.bias.dtype)
        if ctx.needs_input_grad[3]:
            grad_delta = layer._delta_gradient(g, x.reshape(-1, x.shape[-1]))  # [k] fp32
        return grad_x, None, grad_bias, grad_delta, None


class SparseDeltaLinear(nn.Module):
    """Drop-in replacement for a frozen ``nn.Linear`` with k trainable sparse deltas.

    Keeps the ``weight`` and ``bias`` attributes (and their state-dict keys) of the linear
    layer it replaces and adds ``delta``, ``delta_index``, ``delta_base``, ``support_budget``
    and, in row scope, ``row_budget``.
    """

    def __init__(self, base: nn.Linear, delta_index: torch.Tensor, scope: Scope) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.scope = scope
        flat_weight = self.weight.detach().view(-1)
        self.delta = nn.Parameter(torch.zeros(delta_index.numel(), dtype=torch.float32, device=flat_weight.device))
        self.register_buffer("delta_index", delta_index.to(flat_weight.device, torch.int64))
        self.register_buffer("delta_base", flat_weight[self.delta_index].float())
        support = self.support_mask()
        self.register_buffer("support_budget", support.sum().reshape(()))
        self.register_buffer("row_budget", support.sum(dim=1) if scope.kind == "row" else None)
        self._pattern: SamplingPattern | None = None
        self._pattern_key: tuple[int, int] | None = None  # (storage, version) of delta_index it was built for
        self._window: WindowStatistics | None = None
        self._select_count = 0  # > 0: the next backward selects this many growth candidates
        self._regrow_pruned = True
        self._prune_criterion = "sensitivity"
        # Sums a statistics tensor over data-parallel ranks in place (set by the engine under DDP).
        self.stats_all_reduce: Callable[[torch.Tensor], object] | None = None

    # ----------------------------------------------------------------------- forward / backward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SparseDeltaLinearFunction.apply(x, self.weight, self.bias, self.delta, self)

    def _sampling_pattern(self) -> SamplingPattern:
        # Rebuilt whenever delta_index changes: topology updates, load_state_dict, device moves.
        key = (self.delta_index.data_ptr(), self.delta_index._version)
        if key != self._pattern_key:
            self._pattern = SamplingPattern(self.delta_index, self.out_features, self.in_features)
            self._pattern_key = key
        return self._pattern

    def _delta_gradient(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """δ gradient [k] from grad_output [T, out] and input [T, in]; feeds the window statistics."""
        if self._select_count > 0:
            grad = dense_weight_gradient(g, x)  # [out, in]: the one dense product of the window
            grad_delta = grad.view(-1)[self.delta_index]  # this rank's own gradient, before any reduction
            world_size = 1
            if self.stats_all_reduce is not None:  # every rank must pick the same candidates
                self.stats_all_reduce(grad)
                world_size = torch.distributed.get_world_size()
            candidates = select_candidates(
                grad,
                self.weight,
                self.delta_index,
                self.scope,
                self._select_count,
                self._regrow_pruned,
                self._prune_criterion,
            )
            tracked = torch.cat([candidates.grow_index, candidates.remove_index])
            # Each rank holds 1/world_size of the summed first gradient, so that the sum over
            # ranks at the update counts it once.
            self._window = WindowStatistics(candidates, grad.view(-1)[tracked] / world_size)
            self._select_count = 0
            return grad_delta
        window = self._window
        if window is None:
            return sampled_weight_gradient(g, x, self._sampling_pattern())
        if window.pattern is None:
            positions = torch.cat([self.delta_index, window.candidates.grow_index, window.candidates.remove_index])
            window.pattern = SamplingPattern(positions, self.out_features, self.in_features)
        values = sampled_weight_gradient(g, x, window.pattern)  # [k + cg + cr]
        k = self.delta_index.numel()
        window.grad_sum += values[k:]
        return values[:k]

    # ------------------------------------------------------------------------------ weights
    @torch.no_grad()
    def materialize(self) -> None:
        """Write W'[p] = base[p] + δ into the weight at the k delta positions."""
        self.weight.view(-1)[self.delta_index] = (self.delta_base + self.delta).to(self.weight.dtype)

    @torch.no_grad()
    def support_mask(self) -> torch.Tensor:
        """bool [out, in]: nonzero weights ∪ delta positions (transient; never stored)."""
        support = self.weight != 0
        support.view(-1)[self.delta_index] = True
        return support

    def support_size(self) -> int:
        return int(self.support_mask().sum())

    def budget_violations(self) -> int:
        """Number of scope groups whose support exceeds their budget (0 when the layer is valid)."""
        support = self.support_mask()
        over = self.scope.group_support(support) > self.scope.group_budget(self.support_budget, self.row_budget)
        return int(over.sum())

    # ------------------------------------------------------------------- checkpoint / resume
    # An open accumulation window is part of the training state: a checkpoint taken inside a
    # window must resume with the same candidates and accumulated gradients. Its tensors change
    # size from window to window, so they are saved and restored here rather than as buffers.
    _WINDOW_KEYS = ("window_grow_index", "window_remove_index", "window_grad_sum")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._window is not None:
            candidates = self._window.candidates
            tensors = (candidates.grow_index, candidates.remove_index, self._window.grad_sum)
            for key, tensor in zip(self._WINDOW_KEYS, tensors):
                destination[prefix + key] = tensor.clone()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected, errors):
        window = [state_dict.pop(prefix + key, None) for key in self._WINDOW_KEYS]
        self._window = None
        if window[0] is not None:
            device = self.delta_index.device
            grow_index, remove_index, grad_sum = (tensor.to(device) for tensor in window)
            self._window = WindowStatistics(Candidates(grow_index, remove_index), grad_sum.float())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected, errors)

    # ----------------------------------------------------------------------------- topology
    def begin_window(self, n_swaps: int, candidate_factor: float, regrow_pruned: bool, prune_criterion: str) -> None:
        """Arm the next backward to pick candidates for an update that swaps ``n_swaps`` deltas."""
        self._window = None
        self._select_count = max(1, round(candidate_factor * n_swaps))
        self._regrow_pruned, self._prune_criterion = regrow_pruned, prune_criterion

    @torch.no_grad()
    def finalize_window(self) -> bool:
        """Sum the window statistics over ranks; False when they are not finite."""
        if self._window is None:
            return True
        if self.stats_all_reduce is not None:
            self.stats_all_reduce(self._window.grad_sum)
        return bool(torch.isfinite(self._window.grad_sum).all())

    @torch.no_grad()
    def update_topology(self, n_target: int, drop_mode: str) -> tuple[UpdateStats, torch.Tensor]:
        """Swap up to ``n_target`` deltas; returns the stats and the delta slots whose meaning changed."""
        window, self._window, self._select_count = self._window, None, 0
        if window is None or n_target == 0:
            return self._stats(0, 0, 0), self.delta_index.new_empty(0)
        plan = self._plan(window, n_target)
        self._apply_plan(plan, drop_mode)
        return self._stats(plan.grow_index.numel(), plan.revived, plan.remove_index.numel()), plan.drop_slots

    def _plan(self, window: WindowStatistics, n_target: int) -> SwapPlan:
        grow_index, remove_index = window.candidates.grow_index, window.candidates.remove_index
        grow_sum, remove_sum = window.grad_sum.split([grow_index.numel(), remove_index.numel()])
        weight = self.weight.view(-1)
        support = self.support_mask()
        group_slack = (
            self.scope.group_budget(self.support_budget, self.row_budget) - self.scope.group_support(support)
        ).clamp(min=0)
        grow_group = self.scope.group_of(grow_index)
        remove_weight = weight[remove_index].float()
        if self._prune_criterion == "sensitivity":
            remove_score = (remove_weight * remove_sum).abs()
        else:
            remove_score = remove_weight.abs()
        return plan_swap(
            delta_magnitude=self.delta.detach().abs(),
            grow_index=grow_index,
            grow_score=grow_sum.abs(),
            grow_revives=~support.view(-1)[grow_index],
            grow_group=grow_group,
            grow_slack=group_slack[grow_group],
            remove_index=remove_index,
            remove_score=remove_score,
            remove_group=self.scope.group_of(remove_index),
            n_target=n_target,
        )

    def _apply_plan(self, plan: SwapPlan, drop_mode: str) -> None:
        weight = self.weight.view(-1)
        slots = plan.drop_slots
        if drop_mode == "revert":
            weight[self.delta_index[slots]] = self.delta_base[slots].to(weight.dtype)
        weight[plan.remove_index] = 0
        self.delta_index[slots] = plan.grow_index
        self.delta_base[slots] = weight[plan.grow_index].float()
        self.delta.data[slots] = 0.0

    def _stats(self, swapped: int, revived: int, removed: int) -> UpdateStats:
        return UpdateStats(swapped, swapped, revived, removed, self.support_size(), int(self.support_budget))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"deltas={self.delta.numel()}, scope={self.scope.kind}"
        )
