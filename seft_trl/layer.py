"""The sparse-delta linear layer: trainable deltas at k positions of a frozen (pruned) weight.

The effective weight W' (W with W'[p] = base[p] + δ at the delta positions) lives in the
``weight`` tensor itself and is rewritten after every optimizer step and topology change
(:meth:`SparseDeltaLinear.materialize`), so the forward is a plain ``F.linear`` with no copy.
The backward returns the input gradient through W' and the δ gradient sampled at the k
positions (:mod:`seft_trl.kernels`); the dense weight gradient is only formed once per
accumulation window, to choose topology candidates.

State per layer is O(k): δ (fp32), the flat positions (int32), the base values (in the weight's
dtype), the budget, and during a window the candidate positions with their gradient statistics
and the O(out + in) curvature factors. No mask is stored; the support (nonzero weights ∪ delta
positions) is recomputed from the weight when needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import SparsityEvolutionConfig
from .criteria import (
    GAIN_ESTIMATES,
    DenseRevival,
    DenseValues,
    GROWTH_CRITERIA,
    REMOVAL_CRITERIA,
    SWAP_TESTS,
    GainEstimate,
    GrowthScore,
    RemovalScore,
    SwapTest,
    curvature_at,
    dense_revival,
    lookup,
    taylor_removal_cost,
)
from .kernels import (
    SamplingPattern,
    compiled_on_cpu,
    dense_weight_gradient,
    sampled_gradient_and_square_sums,
    sampled_weight_gradient,
    token_square_sums,
)
from .patterns import Scope, SparsityPattern
from .sharding import is_sharded, local, own, row_range, whole
from .topology import Candidates, SwapPlan, capped_removals, plan_swap, select_candidates
from .window import WINDOW_KEYS, WindowStatistics, clear_step, fold_step, window_entries, window_from_entries


@dataclass
class UpdateStats:
    """What one topology update did to one layer."""

    dropped: int
    grown: int
    revived: int
    removed: int
    refused: int  # ranked swaps the swap test turned down
    support: int
    budget: int
    nonzeros: int  # nonzero weights after the update (the support less the delta positions that hold zero)


@dataclass
class TopologyCriteria:
    """The criteria of one run's updates (resolved from the config's names by the engine)."""

    growth: GrowthScore
    removal: RemovalScore
    swap_test: SwapTest | None
    gain: GainEstimate
    regrow_pruned: bool
    drop_mode: str
    column_cap: float | None = None
    revival_cap: float | None = None

    @classmethod
    def from_config(cls, config: SparsityEvolutionConfig, pattern: SparsityPattern | None = None) -> "TopologyCriteria":
        """``pattern``: the model's sparsity pattern, on which revival's default depends (None: unstructured)."""
        return cls(
            growth=lookup(GROWTH_CRITERIA, "growth_criterion", config.growth_criterion),
            removal=lookup(REMOVAL_CRITERIA, "removal_criterion", config.removal_criterion),
            swap_test=lookup(SWAP_TESTS, "swap_test", config.swap_test),
            gain=lookup(GAIN_ESTIMATES, "gain_estimate", config.gain_estimate),
            regrow_pruned=config.revives_pruned(pattern is not None and pattern.is_nm),
            drop_mode=config.drop_mode,
            column_cap=config.column_cap,
            revival_cap=config.revival_cap,
        )


def _support_per_row(weight: torch.Tensor, delta_index: torch.Tensor) -> tuple[torch.Tensor, int]:
    """int64 [out]: the support of each row (nonzero weights ∪ delta positions), and how many delta
    positions hold zero; compiled on the CPU where Numba is installed."""
    if compiled_on_cpu(weight) and weight.element_size() in (2, 4):
        from .numba_topology import support_per_row

        return support_per_row(weight, delta_index)
    zero_deltas = delta_index[weight.view(-1)[delta_index] == 0]  # [z]
    # A bool sum into int32 beats count_nonzero on the CPU (benchmarks/results/engine_constants.md);
    # a layer has < 2³¹ weights.
    nonzero = (weight != 0).sum(dim=1, dtype=torch.int32).long()
    return nonzero + torch.bincount(zero_deltas.long() // weight.shape[1], minlength=weight.shape[0]), zero_deltas.numel()


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

    def __init__(
        self, base: nn.Linear, delta_index: torch.Tensor, scope: Scope, criteria: TopologyCriteria | None = None
    ) -> None:
        """``criteria``: how this layer's updates decide (default: those of the default config)."""
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
        # int32 positions whenever they fit (every LLM layer has fewer than 2³¹ weights), and the
        # base in the weight's own dtype, which holds it exactly: 4 + 4 + 2 bytes a delta under bf16.
        index_dtype = torch.int32 if flat_weight.numel() < 2**31 else torch.int64
        self.register_buffer("delta_index", delta_index.to(flat_weight.device, index_dtype))
        self.register_buffer("delta_base", flat_weight[self.delta_index].clone())
        support = self.support_mask()
        self.register_buffer("support_budget", support.sum().reshape(()))
        self.register_buffer("row_budget", support.sum(dim=1) if scope.kind == "row" else None)
        self._pattern: SamplingPattern | None = None
        self._pattern_key: tuple[int, int] | None = None  # (storage, version) of delta_index it was built for
        # Outside windows, patterns built so far: one per topology change is expected; one per step
        # means something rewrites delta_index in place every step.
        self.pattern_builds = 0
        self._window: WindowStatistics | None = None
        self._candidate_count = 0  # > 0: the next backward opens a window with this many growth candidates
        self.criteria = criteria or TopologyCriteria.from_config(SparsityEvolutionConfig())
        # Sums a statistics tensor over data-parallel ranks in place (set by the engine under DDP).
        self.stats_all_reduce: Callable[[torch.Tensor], object] | None = None
        self.world_size = 1
        # The factor of the loss in the coming backward (fp16's GradScaler; set by the engine). The
        # window statistics divide it out, so a scale that changes inside a window mixes nothing.
        self.loss_scale = 1.0

    # ----------------------------------------------------------------------- forward / backward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SparseDeltaLinearFunction.apply(x, self.weight, self.bias, self.delta, self)

    def _sampling_pattern(self) -> SamplingPattern:
        # Rebuilt whenever delta_index changes: topology updates, load_state_dict, device moves.
        key = (self.delta_index.data_ptr(), self.delta_index._version)
        if key != self._pattern_key:
            self._pattern = SamplingPattern(self.delta_index, self.out_features, self.in_features)
            self._pattern_key = key
            self.pattern_builds += 1
        return self._pattern

    def _delta_gradient(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """δ gradient [k] from grad_output [T, out] and input [T, in]; feeds the window statistics."""
        if self._candidate_count > 0:
            return self._open_window(g, x)
        window = self._window
        if window is None:
            return sampled_weight_gradient(g, x, self._sampling_pattern())
        if window.pattern is None:  # the first step's later micro-batches, or a window just loaded
            window.pattern = self._window_pattern(window.candidates)
        values, row_sq, col_sq = sampled_gradient_and_square_sums(g, x, window.pattern)  # loss-scaled like g
        # Its own storage: a view returned as δ's gradient would keep all k + cg + cr entries alive
        # as δ.grad (autograd adopts a lone gradient) until the gradients are cleared.
        grad_delta = values[: self.delta_index.numel()].clone()
        unscale = 1.0 / self.loss_scale
        if window.step_sum is None:  # the step's first micro-batch
            window.step_sum = values.mul_(unscale) if unscale != 1.0 else values  # [k + cg + cr]
        else:
            window.step_sum.add_(values, alpha=unscale)
        window.step_row_sq.add_(row_sq, alpha=unscale * unscale)
        window.step_col_sq += col_sq
        return grad_delta

    def _window_pattern(self, candidates: Candidates) -> SamplingPattern:
        parts = (self.delta_index, candidates.grow_index, candidates.remove_index)
        return SamplingPattern(parts, self.out_features, self.in_features)

    def _open_window(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The window's first backward: one dense gradient to choose the candidates from."""
        grad = dense_weight_gradient(g, x)  # [out, in]: the one dense product of the window
        grad_delta = grad.view(-1)[self.delta_index]  # this rank's own gradient, before any reduction
        row_sq, col_sq = token_square_sums(g), token_square_sums(x)
        if self.loss_scale != 1.0:  # the statistics in the loss's own units; grad_delta stays scaled
            grad.div_(self.loss_scale)
            row_sq.div_(self.loss_scale**2)
        if self.stats_all_reduce is not None:  # every rank must pick the same candidates
            for tensor in (grad, row_sq, col_sq):
                self.stats_all_reduce(tensor)
        criteria = self.criteria
        candidates = select_candidates(
            grad, self.weight, self.delta_index, self.scope, self._candidate_count,
            criteria.regrow_pruned, criteria.growth, criteria.removal, row_sq, col_sq,
        )
        tracked = torch.cat([candidates.grow_index, candidates.remove_index])
        # The reduced parts count 1/world_size on each rank, so that the sums over ranks when the
        # step closes (and at the update) count them once; the δ part is still this rank's own.
        share = 1.0 / self.world_size
        step_sum = torch.cat([grad_delta / self.loss_scale, grad.view(-1)[tracked] * share])
        self._window = WindowStatistics(
            candidates,
            step_row_sq=row_sq * share,
            step_col_sq=col_sq * share,
            grad_sum=torch.zeros_like(step_sum),
            grad_sq_sum=step_sum.new_zeros(self.delta_index.numel() + candidates.grow_index.numel()),
            row_sq=torch.zeros_like(row_sq),
            col_sq=torch.zeros_like(col_sq),
            counters=torch.zeros(3, dtype=torch.float64, device=step_sum.device),
            step_sum=step_sum,
        )
        self._candidate_count = 0
        return grad_delta

    # ------------------------------------------------------------------------------ weights
    @torch.no_grad()
    def materialize(self) -> None:
        """Write W'[p] = base[p] + δ into the weight at the k delta positions (under FSDP2: in this rank's rows)."""
        values = (self.delta_base + whole(self.delta.detach())).to(self.weight.dtype)  # [k]
        if not is_sharded(self.weight):
            self.weight.view(-1)[self.delta_index] = values
            return
        start, end = row_range(self.weight)
        mine, offsets = own(self.delta_index, start * self.in_features, end * self.in_features)
        local(self.weight).view(-1)[offsets] = values[mine]

    @torch.no_grad()
    def support_mask(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """bool [out, in]: nonzero weights ∪ delta positions (transient; never stored).

        ``weight``: the layer's whole weight when the caller already holds it (else it is gathered
        under FSDP2, a collective).
        """
        support = (whole(self.weight) if weight is None else weight) != 0
        support.view(-1)[self.delta_index] = True
        return support

    def own_slots(self, slots: torch.Tensor) -> tuple[torch.Tensor | slice, torch.Tensor]:
        """Which delta ``slots`` [s] this rank's optimizer holds, and where in its chunk: (bool [s], offsets);
        unsharded, all of them at their own offsets (a full slice, which indexes without a copy)."""
        if not is_sharded(self.delta):
            return slice(None), slots
        return own(slots, *row_range(self.delta))

    @torch.no_grad()
    def group_support(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Support size per scope group (int64 [groups]): nonzero weights plus the delta positions that hold zero.

        Every update counts it on every layer, so for a layer or row scope it is counted without the
        dense mask (a third of an update's time on SmolLM2 went to building and summing masks).
        ``weight``: as for :meth:`support_mask`.
        """
        return self._group_support_and_zero_deltas(whole(self.weight) if weight is None else weight)[0]

    def _group_support_and_zero_deltas(self, weight: torch.Tensor) -> tuple[torch.Tensor, int]:
        """:meth:`group_support` of the whole ``weight``, and how many delta positions hold zero."""
        if self.scope.kind == "nm":
            zero_deltas = int((weight.view(-1)[self.delta_index] == 0).sum())
            return self.scope.group_support(self.support_mask(weight)), zero_deltas
        per_row, zero_deltas = _support_per_row(weight, self.delta_index)  # [out]
        return (per_row.sum().reshape(1) if self.scope.kind == "layer" else per_row), zero_deltas

    def support_size(self, weight: torch.Tensor | None = None) -> int:
        return int(self.group_support(weight).sum())

    def budget_violations(self, weight: torch.Tensor | None = None) -> int:
        """Number of scope groups whose support exceeds their budget (0 when the layer is valid).

        Counted from the dense mask, not by :meth:`group_support`, so that the check does not share
        the code of the decisions it checks.
        """
        support = self.support_mask(weight)
        over = self.scope.group_support(support) > self.scope.group_budget(self.support_budget, self.row_budget)
        return int(over.sum())

    # ------------------------------------------------------------------- checkpoint / resume
    # An open accumulation window is part of the training state: a checkpoint taken inside a
    # An open accumulation window is part of the training state (seft_trl.window). The state dict
    # carries it as extra entries. Under FSDP2 it does not: torch.distributed.checkpoint resolves
    # every entry to a module attribute and loads only the entries a fresh model has, so there the
    # window travels beside the model (SparsityEvolution.window_state; the trainer writes it into
    # each checkpoint).
    def window_state(self) -> dict[str, torch.Tensor]:
        """The open window's candidates and statistics by key (empty when no window is open)."""
        return {} if self._window is None else window_entries(self._window)

    def load_window_state(self, state: dict[str, torch.Tensor], where: str = "") -> None:
        """Restore the window saved by :meth:`window_state` (no window when ``state`` is empty)."""
        self._window = None
        if state:  # its pattern waits for the next backward, once the state dict has also loaded delta_index
            self._window = window_from_entries(state, self.delta_index.numel(), self.delta_index.device,
                                               self.delta_index.dtype, where)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not is_sharded(self.weight):
            destination.update({prefix + key: value for key, value in self.window_state().items()})

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected, errors):
        saved = {key: state_dict.pop(prefix + key) for key in WINDOW_KEYS if prefix + key in state_dict}
        state_dict.pop(prefix + "window_step_sum", None)  # zeros between steps, saved by earlier versions
        if not is_sharded(self.weight):
            self.load_window_state(saved, where=prefix.rstrip("."))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected, errors)

    # ----------------------------------------------------------------------------- topology
    def swap_count(self, fraction: float) -> int:
        """How many deltas an update at drop fraction ``fraction`` swaps (at most): the one rounding of it."""
        return round(fraction * self.delta.numel())

    def begin_window(self, n_swaps: int, candidate_factor: float) -> None:
        """Arm the next backward to pick candidates for an update that swaps ``n_swaps`` deltas."""
        self._window = None
        self._candidate_count = max(1, round(candidate_factor * n_swaps))
        # The window samples through its own pattern, and the update that ends it moves deltas:
        # holding the δ-only pattern meanwhile would only add to the window's peak memory.
        self._pattern = self._pattern_key = None

    def discard_window(self) -> None:
        """Forget the open window (its update was skipped) and any armed one."""
        self._window, self._candidate_count = None, 0

    @torch.no_grad()
    def close_step(self, skipped: bool = False) -> None:
        """End of an optimizer step: fold its statistics into the window's (or drop them if ``skipped``).

        Called after the optimizer has stepped and before the gradients are cleared, so ``δ.grad``
        is what the optimizer used; comparing it with this layer's own gradient gives the factor
        between the two scales that the moment seeds need.
        """
        window = self._window
        if window is None:
            return
        if not skipped:
            step_sum = window.step_sum
            if step_sum is None:  # no backward reached this layer in the step: it added nothing
                step_sum = torch.zeros_like(window.grad_sum)
            if self.stats_all_reduce is not None:
                self.stats_all_reduce(step_sum)
            fold_step(window, step_sum, None if self.delta.grad is None else whole(self.delta.grad))
        clear_step(window)
        if not window.settled:
            self._settle(window)

    def _settle(self, window: WindowStatistics) -> None:
        """Copy the window's tensors and build its sampling pattern anew, now that the backward is over.

        The window opens inside a backward, where the allocator places its tensors among the step's
        activations; held for the whole window, they keep that memory from serving the next steps'
        activations, and the heap grows around them; with the copies the window steps peak about the
        window's own size above the ordinary ones (benchmarks/results/engine_constants.md).
        """
        for name in WindowStatistics.TENSORS:
            setattr(window, name, getattr(window, name).clone())
        window.candidates = Candidates(window.candidates.grow_index.clone(), window.candidates.remove_index.clone())
        window.pattern = self._window_pattern(window.candidates)
        window.settled = True

    @torch.no_grad()
    def finalize_window(self) -> bool:
        """Sum the curvature factors over ranks; False when the statistics are not finite."""
        if self._window is None:
            return True
        if self.stats_all_reduce is not None:
            for tensor in (self._window.row_sq, self._window.col_sq):
                self.stats_all_reduce(tensor)
        window = self._window
        return all(bool(torch.isfinite(t).all()) for t in (window.grad_sum, window.grad_sq_sum, window.row_sq, window.col_sq))

    @torch.no_grad()
    def update_topology(
        self, n_swaps: int, rate_sum: float = math.inf, dense_values: DenseValues | None = None
    ) -> tuple[UpdateStats, torch.Tensor, torch.Tensor]:
        """Swap up to ``n_swaps`` deltas, decided on the window's statistics, and close the window.

        ``rate_sum``: the learning rates left in the run, summed (inf when unknown), which bounds how
        far a delta can still move (``gain_estimate="reachable"``). ``dense_values``: the dense
        parent's weight at flat positions of this layer; given, a revived weight starts there
        (:func:`~seft_trl.criteria.dense_revival`), else at zero.

        Returns the stats, the delta slots whose position changed, and for them the mean-square
        gradient at their new positions in the optimizer's scale (the second-moment seeds).
        """
        window = self._window
        self.discard_window()
        # The whole weight: the parameter itself, or under FSDP2 a gathered copy whose own rows are
        # written back below, so that every rank decides on the same layer.
        weight = whole(self.weight.detach())
        if window is None or n_swaps == 0 or window.steps == 0:
            return self._stats(0, 0, 0, 0, weight), self.delta_index.new_empty(0), self.delta_base.new_empty(0).float()
        plan, revival = self._plan(window, n_swaps, rate_sum, weight, dense_values)
        self._apply_plan(plan, weight, None if revival is None else revival.start[plan.grow_candidate])
        if is_sharded(self.weight):
            start, end = row_range(self.weight)
            local(self.weight).copy_(weight[start:end])
        k, steps, scale = self.delta_index.numel(), window.steps, window.optimizer_scale
        grown = k + plan.grow_candidate
        mean_sq = window.grad_sq_sum[grown] / steps
        if revival is not None:  # a weight that jumped sees the gradient where it landed
            mean_sq = mean_sq + revival.square_shift[plan.grow_candidate]
        mean_sq = mean_sq * (scale * scale)
        stats = self._stats(plan.grow_index.numel(), plan.revived, plan.remove_index.numel(), plan.refused, weight)
        return stats, plan.drop_slots, mean_sq

    def _plan(self, window: WindowStatistics, n_swaps: int, rate_sum: float, weight: torch.Tensor,
              dense_values: DenseValues | None) -> tuple[SwapPlan, DenseRevival | None]:
        criteria = self.criteria
        grow_index, remove_index = window.candidates.grow_index, window.candidates.remove_index
        k, cg = self.delta_index.numel(), grow_index.numel()
        positions = torch.cat([self.delta_index, grow_index, remove_index])
        steps = window.steps
        mean, mean_sq = window.grad_sum / steps, window.grad_sq_sum / steps  # [k + cg + cr], [k + cg]
        # Per-step curvature in the units of the summed per-rank losses (criteria module docstring).
        curvature = curvature_at(positions, window.row_sq, window.col_sq, 1.0 / (self.world_size * steps * steps))
        gain = criteria.gain(mean[: k + cg], mean_sq, steps, curvature[: k + cg], rate_sum)  # deltas and growth

        delta = whole(self.delta.detach())  # [k]
        forgone = gain[:k]  # a dropped delta stops training: it gives up its own predicted gain
        if criteria.drop_mode == "revert":  # and reverting its value changes the loss by -δ·g + ½δ²h
            forgone = forgone - delta * mean[:k] + 0.5 * delta * delta * curvature[:k]
        removal = slice(k + cg, None)
        group_support = self.group_support(weight)
        # A growth candidate is never a delta position, so it revives exactly where its weight is zero.
        grow_revives = weight.view(-1)[grow_index] == 0
        revival = None
        if dense_values is not None:
            growth = slice(k, k + cg)
            revival = dense_revival(grow_revives, dense_values, grow_index, mean[growth], mean_sq[growth], steps,
                                    curvature[growth], rate_sum, criteria.gain)
            gain[growth] = revival.gain.where(grow_revives, gain[growth])
        weight = weight.view(-1)[remove_index].float()
        mean_removal, curvature_removal = mean[removal], curvature[removal]
        remove_score = criteria.removal(weight, mean_removal, curvature_removal)
        allowed = capped_removals(remove_score, int(self.support_budget), criteria.revival_cap)
        if allowed is not None:
            remove_index, weight, remove_score = remove_index[allowed], weight[allowed], remove_score[allowed]
            mean_removal, curvature_removal = mean_removal[allowed], curvature_removal[allowed]
        group_budget = self.scope.group_budget(self.support_budget, self.row_budget)
        group_slack = (group_budget - group_support).clamp(min=0)
        grow_group = self.scope.group_of(grow_index)
        grow_column = grow_column_room = None
        if criteria.column_cap is not None:
            grow_column = grow_index % self.in_features
            per_column = torch.bincount(self.delta_index.long() % self.in_features, minlength=self.in_features)
            cap = math.ceil(criteria.column_cap * k / self.in_features)
            grow_column_room = (cap - per_column[grow_column]).clamp(min=0)
        plan = plan_swap(
            delta_magnitude=delta.abs(),
            drop_forgone=forgone,
            grow_index=grow_index,
            grow_score=criteria.growth(mean[k : k + cg]),
            grow_gain=gain[k : k + cg],
            grow_revives=grow_revives,
            grow_group=grow_group,
            grow_slack=group_slack[grow_group],
            layer_slack=max(0, int(self.support_budget) - int(group_support.sum())),
            remove_index=remove_index,
            remove_score=remove_score,
            remove_cost=taylor_removal_cost(weight, mean_removal, curvature_removal),
            remove_group=self.scope.group_of(remove_index),
            n_swaps=n_swaps,
            swap_test=criteria.swap_test,
            grow_column=grow_column,
            grow_column_room=grow_column_room,
        )
        return plan, revival

    def _apply_plan(self, plan: SwapPlan, weight: torch.Tensor, grow_start: torch.Tensor | None = None) -> None:
        """Carry out ``plan`` on the layer's whole ``weight`` [out, in], its buffers and this rank's deltas.

        ``grow_start`` [n]: where each grown position starts (its dense value, or 0) when it revives a
        pruned weight; None: at zero. The new delta's base is that start, so δ = 0 there as anywhere.
        """
        weight = weight.view(-1)
        slots = plan.drop_slots
        if self.criteria.drop_mode == "revert":
            weight[self.delta_index[slots]] = self.delta_base[slots]
        weight[plan.remove_index] = 0
        if grow_start is not None:
            revived = weight[plan.grow_index] == 0
            weight[plan.grow_index[revived]] = grow_start[revived].to(weight.dtype)
        self.delta_index[slots] = plan.grow_index.to(self.delta_index.dtype)
        self.delta_base[slots] = weight[plan.grow_index]
        local(self.delta.detach())[self.own_slots(slots)[1]] = 0.0

    def _stats(self, swapped: int, revived: int, removed: int, refused: int, weight: torch.Tensor) -> UpdateStats:
        # One count serves the budget check's support and the trainer's sparsity metric, which
        # would otherwise count every weight again (0.2 s an update on SmolLM2).
        group_support, zero_deltas = self._group_support_and_zero_deltas(weight)
        support = int(group_support.sum())
        return UpdateStats(swapped, swapped, revived, removed, refused, support, int(self.support_budget),
                           support - zero_deltas)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"deltas={self.delta.numel()}, scope={self.scope.kind}"
        )
