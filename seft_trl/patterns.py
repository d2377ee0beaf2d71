"""Sparsity patterns (unstructured, N:M) and the scopes in which a nonzero budget is enforced.

A scope partitions a layer's flat weight positions into groups, each with a budget:

* ``layer``: one group, budget = the layer's support size at injection;
* ``row``: one group per output row, budget = that row's support size at injection;
* ``N:M``: one group per M consecutive inputs of a row, budget N.

Everything here works on plain tensors so the topology code can be tested in isolation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Literal

import torch

_NM_SPEC = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class SparsityPattern:
    """Unstructured (``n = m = None``) or N:M (at most ``n`` nonzeros in every ``m`` consecutive inputs)."""

    n: int | None = None
    m: int | None = None

    @property
    def is_nm(self) -> bool:
        return self.m is not None

    @classmethod
    def parse(cls, spec: str) -> "SparsityPattern":
        if spec == "unstructured":
            return cls()
        match = _NM_SPEC.match(spec)
        if match is None:
            raise ValueError(f"Unknown sparsity pattern {spec!r}: use 'unstructured' or 'N:M' such as '2:4'.")
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise ValueError(f"N:M pattern {spec!r} needs 0 < N < M (for example 2:4 or 4:8).")
        return cls(n, m)

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"


def nm_group_counts(nonzero: torch.Tensor, m: int) -> torch.Tensor:
    """Nonzeros per group of ``m`` consecutive inputs. ``nonzero``: bool [out, in] -> int [out, in // m]."""
    out_features, in_features = nonzero.shape
    return nonzero.view(out_features, in_features // m, m).sum(dim=-1)


def satisfies(weight: torch.Tensor, pattern: SparsityPattern) -> bool:
    """True when ``weight`` [out, in] obeys ``pattern`` exactly (always true for unstructured)."""
    if not pattern.is_nm:
        return True
    if weight.shape[1] % pattern.m:
        return False
    return bool(nm_group_counts(weight != 0, pattern.m).max() <= pattern.n)


def detect_pattern(weights: Iterable[torch.Tensor]) -> SparsityPattern:
    """The N:M pattern (M = 4, then 8) that every weight obeys with N <= M/2, else unstructured.

    Detection is done over all target layers together: a model pruned 2:4 is 2:4 in every
    layer, while a tiny 70% unstructured layer could satisfy 2:4 by chance on its own.
    """
    weights = list(weights)
    for m in (4, 8):
        if any(w.shape[1] % m for w in weights):
            continue
        n = max(int(nm_group_counts(w != 0, m).max()) for w in weights)
        if 0 < n <= m // 2:
            return SparsityPattern(n, m)
    return SparsityPattern()


ScopeKind = Literal["layer", "row", "nm"]


@dataclass(frozen=True)
class Scope:
    """How a layer's flat positions are grouped for the budget; see the module docstring."""

    kind: ScopeKind
    in_features: int
    n: int | None = None
    m: int | None = None

    @classmethod
    def for_layer(cls, pattern: SparsityPattern, scope: str, in_features: int) -> "Scope":
        if pattern.is_nm:
            return cls("nm", in_features, pattern.n, pattern.m)
        return cls(scope, in_features)  # type: ignore[arg-type]

    def group_of(self, flat_index: torch.Tensor) -> torch.Tensor:
        """Group id (int64, whatever the positions' dtype) of each flat position [c] -> [c]."""
        flat_index = flat_index.long()
        if self.kind == "layer":
            return torch.zeros_like(flat_index)
        if self.kind == "row":
            return flat_index // self.in_features
        return flat_index // self.m  # groups are m consecutive inputs and in_features % m == 0

    def group_members(self, group: torch.Tensor) -> torch.Tensor:
        """All flat positions of N:M groups [g] -> [g, m]."""
        assert self.kind == "nm"
        return group.unsqueeze(1) * self.m + torch.arange(self.m, device=group.device)

    def group_support(self, support: torch.Tensor) -> torch.Tensor:
        """Support size per group from a bool support mask [out, in] -> [groups]."""
        if self.kind == "layer":
            return support.sum().reshape(1)
        if self.kind == "row":
            return support.sum(dim=1)
        return nm_group_counts(support, self.m).reshape(-1)

    def group_budget(self, layer_budget: torch.Tensor, row_budget: torch.Tensor | None) -> torch.Tensor:
        """Budget per group: [1] for a layer, [out] for rows, a broadcastable scalar N for N:M."""
        if self.kind == "layer":
            return layer_budget.reshape(1)
        if self.kind == "row":
            assert row_budget is not None
            return row_budget
        return torch.tensor([self.n], device=layer_budget.device)
