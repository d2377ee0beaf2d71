"""Sparsity report: nonzeros, support and budget per layer, and whether the pattern holds."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .layer import SparseDeltaLinear
from .patterns import SparsityPattern, detect_pattern, satisfies
from .sharding import whole
from .targets import output_embedding_names


@dataclass
class LayerSparsity:
    name: str
    shape: tuple[int, int]
    numel: int
    nonzeros: int
    support: int  # nonzeros ∪ delta positions (= nonzeros for a plain nn.Linear)
    budget: int | None  # None for a plain nn.Linear
    within_budget: bool

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzeros / self.numel


@dataclass
class SparsityReport:
    layers: list[LayerSparsity]
    pattern: str
    pattern_holds: bool

    @property
    def numel(self) -> int:
        return sum(layer.numel for layer in self.layers)

    @property
    def nonzeros(self) -> int:
        return sum(layer.nonzeros for layer in self.layers)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzeros / self.numel

    @property
    def within_budget(self) -> bool:
        return all(layer.within_budget for layer in self.layers)

    def as_dict(self) -> dict:
        return {
            "layers": {
                layer.name: {**asdict(layer), "shape": list(layer.shape), "sparsity": layer.sparsity}
                for layer in self.layers
            },
            "total": {
                "numel": self.numel,
                "nonzeros": self.nonzeros,
                "sparsity": self.sparsity,
                "within_budget": self.within_budget,
            },
            "pattern": self.pattern,
            "pattern_holds": self.pattern_holds,
        }

    def table(self) -> str:
        width = max([len("layer")] + [len(layer.name) for layer in self.layers])
        lines = [f"{'layer':<{width}}  {'shape':>12}  {'nonzeros':>10}  {'support':>10}  {'budget':>10}  sparsity"]
        for layer in self.layers:
            budget = "-" if layer.budget is None else str(layer.budget)
            flag = "" if layer.within_budget else "  OVER BUDGET"
            shape = f"{layer.shape[0]}x{layer.shape[1]}"
            lines.append(
                f"{layer.name:<{width}}  {shape:>12}  {layer.nonzeros:>10}  {layer.support:>10}  {budget:>10}  "
                f"{layer.sparsity:8.2%}{flag}"
            )
        lines.append(
            f"{'total':<{width}}  {'':>12}  {self.nonzeros:>10}  {'':>10}  {'':>10}  {self.sparsity:8.2%}   "
            f"pattern {self.pattern}: {'holds' if self.pattern_holds else 'VIOLATED'}"
        )
        return "\n".join(lines)

    __str__ = table


@torch.no_grad()
def sparsity_report(model: nn.Module, pattern: str | None = None) -> SparsityReport:
    """Report on the SEFT layers of ``model`` or, in a plain model, on its linear layers except lm_head.

    ``pattern`` ('unstructured', '2:4', ...) is checked on every layer when given; otherwise the
    SEFT layers are checked against the budgets they enforce, and a plain model's pattern is detected.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, SparseDeltaLinear)}
    if not layers:
        excluded = output_embedding_names(model)
        layers = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in excluded}
    entries = []
    for name, module in layers.items():
        weight = whole(module.weight)  # gathered under FSDP2, one layer at a time
        nonzeros = int(torch.count_nonzero(weight))
        if isinstance(module, SparseDeltaLinear):
            support, budget = module.support_size(weight), int(module.support_budget)
            within = module.budget_violations(weight) == 0
        else:
            support, budget, within = nonzeros, None, True
        entries.append(LayerSparsity(name, tuple(weight.shape), weight.numel(), nonzeros, support, budget, within))

    if pattern is not None:
        expected = SparsityPattern.parse(pattern)
        holds = all(satisfies(whole(m.weight), expected) for m in layers.values())
    else:
        scopes = [m.scope for m in layers.values() if isinstance(m, SparseDeltaLinear)]
        if scopes and scopes[0].kind == "nm":
            expected, holds = SparsityPattern(scopes[0].n, scopes[0].m), all(e.within_budget for e in entries)
        else:
            expected = detect_pattern(whole(m.weight) for m in layers.values()) if layers else SparsityPattern()
            holds = True  # the detected pattern holds by construction
    return SparsityReport(entries, str(expected), holds)
