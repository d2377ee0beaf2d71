"""Which weights to prune, given a score per weight: per layer, per output row, or per N:M group.

Every function returns a bool mask [out, in] that is True where the weight is pruned, and removes
an exact count of weights (ties are broken by index, never by a threshold that could take more).
"""

from __future__ import annotations

import torch

from ..patterns import SparsityPattern


def kept_count(total: int, sparsity: float) -> int:
    """Weights kept out of ``total``: round((1 - sparsity) · total), the one rounding rule of every method."""
    return round((1.0 - sparsity) * total)


def lowest_in_layer(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the lowest-scoring weights of the whole layer. ``score`` [out, in] -> mask [out, in]."""
    n_pruned = score.numel() - kept_count(score.numel(), sparsity)
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    mask[torch.topk(score.reshape(-1), n_pruned, largest=False).indices] = True
    return mask.view_as(score)


def lowest_per_row(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the same number of lowest-scoring weights in every output row. [out, in] -> [out, in]."""
    n_pruned = score.shape[1] - kept_count(score.shape[1], sparsity)
    mask = torch.zeros_like(score, dtype=torch.bool)
    return mask.scatter_(1, torch.topk(score, n_pruned, dim=1, largest=False).indices, True)


def lowest_per_group(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores in each group of ``m`` consecutive inputs of a row. [out, in] -> [out, in].

    ``in`` must be a multiple of ``m`` (checked by the caller before any weight changes).
    """
    out_features, in_features = score.shape
    groups = score.reshape(out_features, in_features // m, m)  # [out, in/m, m]
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, torch.topk(groups, m - n, dim=2, largest=False).indices, True)
    return mask.view(out_features, in_features)


def select_pruned(score: torch.Tensor, sparsity: float, pattern: SparsityPattern, granularity: str) -> torch.Tensor:
    """The pruning mask for ``pattern``; ``granularity`` ('layer' or 'row') only applies to unstructured."""
    if pattern.is_nm:
        return lowest_per_group(score, pattern.n, pattern.m)
    if granularity == "row":
        return lowest_per_row(score, sparsity)
    return lowest_in_layer(score, sparsity)


def wanda_score(weight: torch.Tensor, input_sq_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| · ‖X_j‖₂ (Wanda). ``weight`` [out, in], ``input_sq_norms`` [in] = Σ_tokens x_j² -> [out, in].

    Scores are only compared within a row or group, so the token count (a common factor) is irrelevant.
    """
    return weight.abs().to(input_sq_norms.dtype) * input_sq_norms.sqrt().unsqueeze(0)


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    """|W_ij|. [out, in] -> [out, in]."""
    return weight.abs()
