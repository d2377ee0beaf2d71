"""SparseGPT (Frantar & Alistarh, 2023): prune a layer column by column and fold each removed weight's
error into the weights not yet visited (optimal brain surgeon), using the inverse Hessian of the
layer's reconstruction loss ‖WX − ŴX‖², H = 2XXᵀ / n (accumulated by the caller).
"""

from __future__ import annotations

import torch

from ..patterns import SparsityPattern
from .masks import lowest_in_layer, lowest_per_group

BLOCK_SIZE = 128  # columns per block: the mask is chosen per block, updates are applied lazily per block
DAMPENING = 0.01  # λ added to H's diagonal, as a fraction of its mean diagonal


def inverse_hessian_factor(hessian: torch.Tensor, dampening: float = DAMPENING) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹ = UᵀU. [in, in] -> [in, in].

    Why U: once columns < i are fixed, row i of U divided by U_ii is the OBS update that removing
    column i applies to the columns after it (the GPTQ identity), so one factorization serves all columns.
    """
    damped = hessian.clone()
    damped.diagonal().add_(dampening * hessian.diagonal().mean())
    lower, info = torch.linalg.cholesky_ex(damped)
    if info != 0:
        raise ValueError(
            "SparseGPT: the layer's input Hessian is not positive definite even after dampening (non-finite "
            "activations?). Check the calibration data and the model's dtype (float32 or bfloat16 avoid fp16 overflow)."
        )
    identity = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    inverse = torch.cholesky_solve(identity, lower)  # torch.cholesky_inverse is ~20x slower on CPU
    return torch.linalg.cholesky(inverse, upper=True)


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    pattern: SparsityPattern,
    block_size: int = BLOCK_SIZE,
    dampening: float = DAMPENING,
) -> torch.Tensor:
    """The pruned and reconstructed weight [out, in] in ``hessian``'s dtype, exact zeros where pruned.

    ``weight`` [out, in]; ``hessian`` [in, in], fp32 or wider. Unstructured: every block of
    ``block_size`` columns keeps exactly round((1 - sparsity) · out · block) weights (all rows together),
    those whose removal would cost most, by the OBS error w² / [H⁻¹]_jj² (adaptive mask selection).
    N:M: the ``n`` costliest weights of each group are kept, chosen when the group's first column is
    reached, so the choice sees the updates made so far.
    """
    w = weight.to(hessian.dtype, copy=True)
    hessian = hessian.clone()
    dead = hessian.diagonal() == 0  # inputs that are always zero: their weights never matter
    hessian.diagonal()[dead] = 1.0
    w[:, dead] = 0.0
    factor = inverse_hessian_factor(hessian, dampening)
    step = max(pattern.m, block_size - block_size % pattern.m) if pattern.is_nm else block_size
    for start in range(0, w.shape[1], step):
        end = min(start + step, w.shape[1])
        errors = _prune_block(w[:, start:end], factor[start:end, start:end], sparsity, pattern)
        w[:, end:] -= errors @ factor[start:end, end:]  # lazy update of the columns after the block
    return w


def _prune_block(block: torch.Tensor, factor: torch.Tensor, sparsity: float, pattern: SparsityPattern) -> torch.Tensor:
    """Prune ``block`` [out, b] in place, updating its later columns; returns the scaled errors [out, b].

    ``factor`` [b, b] is the block's diagonal block of U.
    """
    diag = factor.diagonal()  # [b]
    errors = torch.zeros_like(block)
    if pattern.is_nm:
        mask = torch.zeros_like(block, dtype=torch.bool)
    else:
        mask = lowest_in_layer(block.pow(2) / diag.pow(2), sparsity)
    for i in range(block.shape[1]):
        if pattern.is_nm and i % pattern.m == 0:
            group = slice(i, i + pattern.m)
            mask[:, group] = lowest_per_group(block[:, group].pow(2) / diag[group].pow(2), pattern.n, pattern.m)
        column = block[:, i]
        pruned = column.masked_fill(mask[:, i], 0.0)
        error = (column - pruned) / diag[i]  # [out]
        block[:, i + 1 :].addr_(error, factor[i, i + 1 :], alpha=-1.0)  # rank-1 OBS update of the later columns
        block[:, i] = pruned
        errors[:, i] = error
    return errors
