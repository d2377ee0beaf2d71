"""The fine-tuning methods the quality benchmark compares SEFT against, each as a small adapter.

An :class:`Adapter` is what a plain training loop needs from a method: the trainable tensors, a hook
to run after every optimizer step, and ``finish`` which returns the model with plain ``nn.Linear``
layers holding the merged weights (what a user would save). The loop, data, schedule and evaluation
are shared by every method, so only the parametrisation differs.

Baselines (the 7 projections of each decoder layer are the targets of every method):

* ``lora``: peft's LoRA, merged: the update B·A is dense, so the merged model loses its sparsity;
* ``masked_lora`` (SQFT's SparsePEFT): W + (B·A) ⊙ M, the mask M applied in training and merge;
* ``spp`` (SPP-style): W ⊙ (1 + B·A), a learned low-rank scaling of each weight, so zeros stay zero;
* ``masked_full``: every surviving weight trainable, the gradient and the weight masked by M.

SEFT and fixed-support sparse deltas (``drop_fraction=0``: SEFT without evolution) use the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from seft_trl import SparsityEvolution, SparsityEvolutionConfig
from seft_trl.patterns import satisfies

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Adapter:
    """What the shared training loop needs from a fine-tuning method."""

    parameters: list[nn.Parameter]
    finish: Callable[[], nn.Module]
    after_step: Callable[[], None] = lambda: None
    # (optimizer, total steps, steps already done: > 0 when a run resumes from a checkpoint)
    attach: Callable[[torch.optim.Optimizer, int, int], None] = lambda optimizer, steps, done: None
    notes: dict[str, float] = field(default_factory=dict)


def projection_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The q/k/v/o/gate/up/down nn.Linear modules of ``model``, by name."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in PROJECTIONS
    }


def lora_trainable_count(model: nn.Module, rank: int) -> int:
    """Trainable parameters of LoRA with ``rank`` on the 7 projections: Σ r · (in + out)."""
    return sum(rank * (linear.in_features + linear.out_features) for linear in projection_linears(model).values())


class LowRankLinear(nn.Module):
    """A frozen (pruned) linear plus a low-rank factor pair B·A that either adds or scales.

    ``mode="masked_add"``: W' = W + s · (B·A) ⊙ M  (SQFT's SparsePEFT, s = alpha / r);
    ``mode="scale"``:      W' = W ⊙ (1 + B·A)      (SPP-style: pruned weights stay exactly zero).
    A starts like peft's LoRA A (Kaiming-uniform), B at zero, so training starts from W.
    The dense W' [out, in] is formed every forward: simple, and it is what these methods cost.
    """

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, mode: str) -> None:
        super().__init__()
        self.base, self.mode, self.scaling = linear, mode, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, linear.in_features, device=linear.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(linear.out_features, rank, device=linear.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        # The scaling keeps zeros zero by itself; only the additive update needs the mask.
        self.register_buffer("mask", linear.weight.detach() != 0 if mode == "masked_add" else None, persistent=False)

    def merged_weight(self) -> torch.Tensor:
        low_rank = self.lora_B @ self.lora_A  # [out, in]
        weight = self.base.weight
        if self.mode == "masked_add":
            return weight + self.scaling * low_rank * self.mask
        return weight * (1 + low_rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.merged_weight().to(x.dtype), self.base.bias)


def low_rank_adapter(model: nn.Module, rank: int, alpha: float, mode: str) -> Adapter:
    """Wrap every projection in a :class:`LowRankLinear`; ``finish`` writes W' back into plain linears."""
    model.requires_grad_(False)
    wrappers = {}
    for name, linear in projection_linears(model).items():
        wrappers[name] = LowRankLinear(linear, rank, alpha, mode)
        model.set_submodule(name, wrappers[name])

    @torch.no_grad()
    def finish() -> nn.Module:
        for name, wrapper in wrappers.items():
            wrapper.base.weight.copy_(wrapper.merged_weight())
            model.set_submodule(name, wrapper.base)
        return model

    parameters = [p for wrapper in wrappers.values() for p in (wrapper.lora_A, wrapper.lora_B)]
    return Adapter(parameters, finish)


def peft_lora_adapter(model: nn.Module, rank: int, alpha: float) -> Adapter:
    """peft's LoRA on the 7 projections; ``finish`` merges and unloads it (a dense model)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=PROJECTIONS, bias="none")
    peft_model = get_peft_model(model, config)
    parameters = [p for p in peft_model.parameters() if p.requires_grad]
    return Adapter(parameters, lambda: peft_model.merge_and_unload())


def masked_full_adapter(model: nn.Module) -> Adapter:
    """Every projection weight trainable; gradients and weights multiplied by the pruning mask."""
    model.requires_grad_(False)
    linears = list(projection_linears(model).values())
    masks = [linear.weight.detach() != 0 for linear in linears]
    hooks = []
    for linear, mask in zip(linears, masks):
        linear.weight.requires_grad_(True)
        hooks.append(linear.weight.register_hook(lambda grad, mask=mask: grad * mask))

    @torch.no_grad()
    def after_step() -> None:  # AdamW's decoupled decay or rounding must not revive a pruned weight
        for linear, mask in zip(linears, masks):
            linear.weight.mul_(mask)

    def finish() -> nn.Module:
        for linear, hook in zip(linears, hooks):
            linear.weight.requires_grad_(False)
            hook.remove()
        return model

    return Adapter([linear.weight for linear in linears], finish, after_step=after_step)


class NonzeroBudgetError(RuntimeError):
    """SEFT left a layer with more nonzeros than pruning did, or broke the N:M pattern."""


class NonzeroGuard:
    """Checks that SEFT keeps every target layer within the nonzeros it held right after pruning.

    The engine enforces its own budget (support = nonzeros ∪ delta positions); this is the benchmark's
    independent check of the claim that matters to a user: the repaired model is as sparse as the
    pruned one. Nonzeros are counted after every optimizer step, since the weight is rewritten at every
    step; the N:M pattern only at topology updates and at the end, since only updates move the
    support. ``max_growth`` is the largest (nonzeros - nonzeros after pruning) seen in any layer.
    """

    def __init__(self, seft: SparsityEvolution) -> None:
        self.seft = seft
        self.start = {name: self._nonzeros(layer) for name, layer in seft.layers.items()}
        self.max_growth: int | None = None  # over the steps checked so far

    @staticmethod
    def _nonzeros(layer: nn.Module) -> int:
        return int(torch.count_nonzero(layer.weight))

    def after_step(self) -> None:
        for name, layer in self.seft.layers.items():
            growth = self._nonzeros(layer) - self.start[name]
            self.max_growth = growth if self.max_growth is None else max(self.max_growth, growth)
            if growth > 0:
                raise NonzeroBudgetError(
                    f"Step {self.seft.step_count}: layer {name!r} holds {self.start[name] + growth:,} nonzeros, "
                    f"{growth:,} more than the {self.start[name]:,} it held after pruning."
                )
        if self.seft.last_update:
            self.check_pattern()

    def check_pattern(self) -> None:
        pattern = self.seft.pattern
        if not pattern.is_nm:
            return
        for name, layer in self.seft.layers.items():
            if not satisfies(layer.weight, pattern):
                raise NonzeroBudgetError(f"Step {self.seft.step_count}: layer {name!r} no longer holds {pattern}.")


def seft_adapter(model: nn.Module, config: SparsityEvolutionConfig, parent: nn.Module | None = None) -> Adapter:
    """SEFT through the engine (``drop_fraction=0`` gives fixed-support sparse deltas); ``parent``: the dense
    model, where revived weights start (dense-value revival)."""
    return engine_adapter(SparsityEvolution(model, config, parent=parent))


def engine_adapter(seft: SparsityEvolution) -> Adapter:
    """An engine already injected into its model, as an adapter of the shared loop.

    ``notes["revived"]`` counts the pruned weights revived over the run (as many were removed),
    ``notes["swapped"]`` all the deltas moved and ``notes["refused"]`` the ranked swaps the swap test
    turned down, so a run's log says how much evolution did and how much the test held back;
    ``notes["nonzero_growth"]`` is the :class:`NonzeroGuard`'s maximum growth over the steps (<= 0
    when the budget held); a violation raises :class:`NonzeroBudgetError` at once.
    """
    guard = NonzeroGuard(seft)
    notes = {"revived": 0.0, "swapped": 0.0, "refused": 0.0}

    def after_step() -> None:  # the engine's optimizer hook has just run this step's update, if any
        for stats in seft.last_update.values():
            notes["revived"] += stats.revived
            notes["swapped"] += stats.grown
            notes["refused"] += stats.refused
        guard.after_step()
        # Set after the first step; a resumed run's notes hold the steps before the checkpoint.
        notes["nonzero_growth"] = float(max(guard.max_growth, notes.get("nonzero_growth", -math.inf)))

    def finish() -> nn.Module:
        guard.check_pattern()
        return seft.merge()

    return Adapter(
        list(seft.parameters()),
        finish,
        after_step=after_step,
        attach=lambda optimizer, steps, done: seft.attach(optimizer, total_steps=steps, start_step=done),
        notes=notes,
    )
