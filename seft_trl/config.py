"""Configuration of the SEFT engine: which layers get deltas and how their topology evolves."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .criteria import GAIN_ESTIMATES, GROWTH_CRITERIA, REMOVAL_CRITERIA, SWAP_TESTS, check_criteria

DropSchedule = Literal["cosine", "linear", "constant"]


@dataclass
class SparsityEvolutionConfig:
    """Options of sparsity-evolution fine-tuning, independent of any trainer.

    Defaults, and why:

    * ``density=0.01``: 1% of each layer's weights are trainable deltas. On LLaMA
      projections that is within a few percent of LoRA r=8's trainable count, the
      comparison point of the paper.
    * ``update_interval=20``, ``accumulation_steps=5``: SpIEL's cadence. The paper
      used 10 on short commonsense runs and 60 on C4; 20 gives a new delta enough
      steps to grow before it is judged by ``|δ|``, and keeps the cost of the
      dense-gradient window (one layer at a time, once per window) small.
    * ``drop_fraction=0.2`` with a cosine decay ending at ``update_end=0.8`` of the
      run: large swaps while the loss moves fast, none in the last fifth so the
      final topology gets trained (RigL's and SpIEL's practice).
    * ``candidate_factor=4``: growth and removal candidates are chosen from the
      window's first dense gradient, then ranked by the gradient accumulated over
      the whole window; 4× the number of swaps leaves room for that re-ranking while
      keeping the statistics O(swaps) per layer.
    * ``removal_criterion="taylor"``, ``swap_test="taylor"``: a revival removes the
      weight whose predicted loss increase ``½w²h`` (+ ``−wg`` where positive) is lowest, and a swap happens
      only where the grown delta's predicted gain exceeds that cost plus what the
      dropped delta would still have gained (:mod:`seft_trl.criteria`). Ranking alone
      (``|w·g|``, no test) revived weights that Wanda kept for good reason: in our
      short benchmark SEFT lost to not evolving at all, most at 2:4.
    * ``gain_estimate="newton"``: the paper is silent on the gain. The Newton gain credits a
      position with the loss drop of its Newton step, which at pruned positions of quiet columns
      is far beyond any weight; ``"reachable"`` bounds the step by how far Adam can move the delta
      in the rest of the run. In the long benchmark it was no better on validation and kept most
      revivals (``benchmarks/results/engine_experiments.md``), so it is an option, not the default.
    * ``regrow_pruned=None``: revival in unstructured models, growth inside the pattern
      in N:M ones (the paper's N:M variant). At 2:4 the weight that pays for a revival
      is one of the two survivors of its group: in the short benchmark revival cost 14%
      test perplexity at 2:4 (88.2 vs 77.4) and bought 3% at 70% (151.4 vs 155.9).
    * ``seed_moments=True``: a moved slot starts with a second moment fitted to its
      window's mean-square gradient instead of zero, which the global bias correction
      would turn into steps of several times the learning rate; its first moment starts
      at zero, so it ramps up (:mod:`seft_trl.optim_state`).
    * ``dense_revival=None``: with the dense parent at hand (the distillation teacher), a revived
      weight starts where pruning took it from instead of at zero, so it need not climb back at a
      delta's learning rate; on whenever a parent is given.
    * ``column_cap=None``: growth by |grad| puts about half of the grown deltas into the 5% of
      input columns with the largest activations, and training them there cost more held-out loss
      than not training them (a probe at 6e-3; a cap of 2 removed the loss). Off until the long
      benchmark has judged it over whole runs (``benchmarks/results/engine_experiments.md``).
    * ``revival_cap=None``: each revival removes a weight the model kept, priced alone by the swap
      test; at large densities an update removes so many at once that the sum misleads. At 25% of
      each layer SEFT revived 8.3 M weights at zero in 32 steps, removing 16% of the surviving weights,
      and ended worse than the pruned model (``benchmarks/results/quality_notes.md``). A cap bounds
      what one update may remove; off until the budget benchmark has chosen its value.
    """

    density: float | None = field(
        default=0.01,
        metadata={"help": "Fraction of each target layer's weights that carry a trainable delta."},
    )
    num_deltas: int | None = field(
        default=None,
        metadata={
            "help": "Total number of deltas over all target layers, split in proportion to layer size. "
            "Overrides `density` when set."
        },
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Module names (a name matches itself and any module whose dotted name ends with it) or one "
            "regular expression matched against the full name. Default: every nn.Linear except the output "
            "embedding (lm_head). Embeddings and lm_head are never targets."
        },
    )
    update_interval: int = field(
        default=20, metadata={"help": "Optimizer steps between topology updates (the paper's k)."}
    )
    accumulation_steps: int = field(
        default=5,
        metadata={"help": "Optimizer steps before each update whose gradients are accumulated as statistics."},
    )
    drop_fraction: float = field(
        default=0.2, metadata={"help": "Fraction of deltas swapped at the first update; decays by `drop_schedule`."}
    )
    drop_schedule: DropSchedule = field(
        default="cosine", metadata={"help": "Decay of the drop fraction: cosine, linear or constant."}
    )
    update_end: float = field(
        default=0.8, metadata={"help": "Fraction of the total optimizer steps after which the topology is frozen."}
    )
    regrow_pruned: bool | None = field(
        default=None,
        metadata={
            "help": "Let growth revive pruned weights (paid for by removing the least sensitive weights). "
            "Default: in unstructured models only; N:M models grow inside their pattern."
        },
    )
    growth_criterion: str = field(
        default="gradient",
        metadata={"help": f"How growth candidates rank: {', '.join(GROWTH_CRITERIA)} (largest accumulated |grad|)."},
    )
    removal_criterion: str = field(
        default="taylor",
        metadata={
            "help": f"Which weights are removed to pay for revived ones: {', '.join(REMOVAL_CRITERIA)} "
            "(lowest ½w²h + max(0, −w·grad), |w·grad| or |w|)."
        },
    )
    swap_test: str = field(
        default="taylor",
        metadata={
            "help": f"Which ranked swaps are carried out: {', '.join(SWAP_TESTS)} (taylor: only where the predicted "
            "gain exceeds the predicted cost; none: all of them)."
        },
    )
    gain_estimate: str = field(
        default="newton",
        metadata={
            "help": f"How the swap test predicts a grown delta's gain: {', '.join(GAIN_ESTIMATES)} (newton: the loss "
            "drop of its Newton step; reachable: of the best step Adam can take in the rest of the run)."
        },
    )
    seed_moments: bool = field(
        default=True,
        metadata={
            "help": "Seed the Adam second moment of a moved delta from its window statistics (else zero it, which "
            "the global bias correction turns into oversized steps); the first moment starts at zero."
        },
    )
    sparsity_scope: Literal["layer", "row"] = field(
        default="layer",
        metadata={
            "help": "Where the nonzero budget is enforced for unstructured sparsity: per layer, or per output row "
            "(as Wanda prunes). N:M patterns are always enforced per group."
        },
    )
    sparsity_pattern: str = field(
        default="auto",
        metadata={"help": "'auto' (detect N:M exactly from the weights, else unstructured), 'unstructured' or 'N:M'."},
    )
    drop_mode: Literal["freeze", "revert"] = field(
        default="freeze",
        metadata={"help": "A dropped delta keeps its learned value in the weight (freeze) or reverts to the base."},
    )
    window_groups: int = field(
        default=1,
        metadata={
            "help": "Layers take turns at topology updates in this many groups, their accumulation windows and "
            "updates spread evenly over update_interval, so that only 1/window_groups of the layers hold a window "
            "at once: at large densities the windows' gradient statistics outweigh the deltas' own state "
            "(benchmarks/results/memory.md). 1: every layer updates at the same step, as in the paper. Needs "
            "accumulation_steps x window_groups <= update_interval."
        },
    )
    candidate_factor: float = field(
        default=4.0,
        metadata={"help": "Candidates tracked per layer for growth and removal, as a multiple of the swaps."},
    )
    column_cap: float | None = field(
        default=None,
        metadata={
            "help": "Most deltas an input column may hold after growth, as a multiple of the layer's mean deltas "
            "per column (None: no cap). Growth by |grad| piles deltas into the few input columns of largest "
            "activations; a cap of 2 keeps it near the spread of the initial random placement."
        },
    )
    revival_cap: float | None = field(
        default=None,
        metadata={
            "help": "Most surviving weights one topology update may remove from a layer to pay for revived ones, as "
            "a fraction of the layer's starting nonzeros (None: no cap; 0: revive only into unused budget). The "
            "cheapest removals are kept, so the revivals of largest gradient are the ones paid for."
        },
    )
    dense_revival: bool | None = field(
        default=None,
        metadata={
            "help": "Start a revived pruned weight at its value in the dense parent (the model before pruning) instead "
            "of at zero; the swap test prices that jump with its local model. Needs the parent (the trainer's "
            "teacher). Default: on whenever a parent is given."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the initial delta positions."})

    def revives_pruned(self, nm_pattern: bool) -> bool:
        """Whether growth may revive pruned weights in a model of this kind (``regrow_pruned`` resolved)."""
        return not nm_pattern if self.regrow_pruned is None else self.regrow_pruned

    def __post_init__(self) -> None:
        if self.num_deltas is None and self.density is None:
            raise ValueError("Set `density` (fraction of each layer's weights) or `num_deltas` (a total).")
        if self.num_deltas is not None and self.num_deltas < 1:
            raise ValueError(f"num_deltas must be a positive integer, got {self.num_deltas}.")
        if self.num_deltas is None and not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must lie in (0, 1], got {self.density}; 0.01 means 1% of each layer.")
        if self.update_interval < 1:
            raise ValueError(f"update_interval must be >= 1, got {self.update_interval}.")
        if not 1 <= self.accumulation_steps <= self.update_interval:
            raise ValueError(
                f"accumulation_steps must lie in [1, update_interval={self.update_interval}], "
                f"got {self.accumulation_steps}."
            )
        if self.window_groups < 1:
            raise ValueError(f"window_groups must be >= 1, got {self.window_groups}; 1 updates every layer at once.")
        if self.accumulation_steps * self.window_groups > self.update_interval:
            raise ValueError(
                f"window_groups={self.window_groups} needs accumulation_steps x window_groups <= update_interval "
                f"({self.accumulation_steps} x {self.window_groups} > {self.update_interval}), so "
                "that the groups' windows do not overlap: raise update_interval or lower accumulation_steps or "
                "window_groups."
            )
        if not 0.0 <= self.drop_fraction <= 1.0:
            raise ValueError(f"drop_fraction must lie in [0, 1], got {self.drop_fraction}.")
        if self.drop_schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"drop_schedule must be cosine, linear or constant, got {self.drop_schedule!r}.")
        if not 0.0 <= self.update_end <= 1.0:
            raise ValueError(f"update_end must lie in [0, 1], got {self.update_end}.")
        check_criteria(self.growth_criterion, self.removal_criterion, self.swap_test, self.gain_estimate)
        if self.sparsity_scope not in ("layer", "row"):
            raise ValueError(f"sparsity_scope must be layer or row, got {self.sparsity_scope!r}.")
        if self.drop_mode not in ("freeze", "revert"):
            raise ValueError(f"drop_mode must be freeze or revert, got {self.drop_mode!r}.")
        if self.candidate_factor < 1.0:
            raise ValueError(f"candidate_factor must be >= 1, got {self.candidate_factor}.")
        if self.column_cap is not None and self.column_cap < 1.0:
            raise ValueError(
                f"column_cap must be None (no cap) or >= 1 (a multiple of the mean deltas per column), "
                f"got {self.column_cap}."
            )
        if self.revival_cap is not None and not 0.0 <= self.revival_cap <= 1.0:
            raise ValueError(
                f"revival_cap must be None (no cap) or lie in [0, 1] (a fraction of each layer's starting nonzeros), "
                f"got {self.revival_cap}."
            )
        if self.sparsity_pattern != "auto":
            from .patterns import SparsityPattern

            SparsityPattern.parse(self.sparsity_pattern)  # raises with a clear message
