"""Weight-gradient kernels of the sparse-delta layer.

The gradient of a delta at flat position p = r * in + c is ``sum_t g[t, r] * x[t, c]``, an
entry of the dense weight gradient ``gᵀx`` [out, in]. Computing the dense matrix costs
``T·out·in`` multiply-adds and ``out·in`` floats of memory; sampling only the k entries
(an SDDMM) costs ``T·k`` but runs far below BLAS efficiency. ``benchmarks/delta_grad_kernels.py``
measures the ways to do it on this kind of machine (2 cores, x86_64, torch 2.13 CPU, 2048 tokens;
results in ``benchmarks/results/delta_grad_kernels.md``): at 1% density the sampled product
(``torch.sparse.sampled_addmm`` over a CSR pattern) costs 0.12–0.53× the frozen layer's forward and
input backward, dense-then-gather 0.5–0.6×, a gather-multiply over token chunks 0.9–1.7×.

One sampled entry costs 16–170× a dense one (median 24; relatively more on small layers, where the
transposed copies of g and x that ``sampled_addmm`` makes dominate), so the cost rule below samples
when ``k * SAMPLED_ENTRY_COST < out * in`` (density under 2.5%) and otherwise takes the dense product
and gathers; it picked the faster path in 14 of 15 measured cases. The sampled path works over
chunks of tokens, which bounds the fp32 copies of g and x. On CUDA the sampled path is one fused
Triton kernel instead (:mod:`seft_trl.triton_kernels`: no copies, g and x in their own dtype); the
cost rule's constant is the CPU's until the GPU check measures CUDA's.
"""

from __future__ import annotations

import importlib.util
import warnings

import torch

# Cost of one sampled entry relative to one dense entry (measured; see the module docstring).
SAMPLED_ENTRY_COST = 40
# Tokens per chunk: bounds the fp32 copies of g and x (chunk × (out + in) floats).
TOKEN_CHUNK = 1024


class SamplingPattern:
    """A set of flat positions [k] of an out × in weight, prepared for the sampled product.

    Positions may be in any order (delta slots are not sorted, so optimizer state never has to
    move); the CSR structure is built over the sorted positions and results are scattered back.
    """

    def __init__(
        self, flat_index: torch.Tensor, out_features: int, in_features: int, use_dense: bool | None = None,
        use_triton: bool | None = None,
    ) -> None:
        """``use_dense``: None applies the cost rule; True or False forces a path (benchmarks compare both).

        ``use_triton``: the fused kernel of :mod:`seft_trl.triton_kernels` for the sampled path;
        None takes it on CUDA whenever Triton is installed (it ships with PyTorch's CUDA wheels).
        """
        self.flat_index = flat_index
        self.out_features, self.in_features = out_features, in_features
        if use_dense is None:
            use_dense = flat_index.numel() * SAMPLED_ENTRY_COST >= out_features * in_features
        self.use_dense = use_dense
        if use_triton is None:
            use_triton = flat_index.is_cuda and importlib.util.find_spec("triton") is not None
        self.use_triton = use_triton and not use_dense
        if self.use_dense or flat_index.numel() == 0:
            return
        sorted_index, self.order = torch.sort(flat_index)
        rows = sorted_index // in_features
        self.col_indices = sorted_index % in_features
        if self.use_triton:
            self.row_indices = rows
            return
        crow = torch.zeros(out_features + 1, dtype=flat_index.dtype, device=flat_index.device)  # CSR: one index dtype
        crow[1:] = torch.bincount(rows, minlength=out_features).cumsum(0)
        self.crow_indices = crow

    def _csr(self, values: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            return torch.sparse_csr_tensor(
                self.crow_indices,
                self.col_indices,
                values,
                (self.out_features, self.in_features),
                check_invariants=False,
            )


def dense_weight_gradient(grad_output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """fp32 gᵀx: grad_output [T, out], x [T, in] -> [out, in], over token chunks."""
    grad = torch.zeros(grad_output.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], TOKEN_CHUNK):
        g = grad_output[start : start + TOKEN_CHUNK].float()
        grad.addmm_(g.t(), x[start : start + TOKEN_CHUNK].float())
    return grad


def token_square_sums(t: torch.Tensor) -> torch.Tensor:
    """fp32 Σ over tokens of t²: [T, features] -> [features], over token chunks (the curvature factors)."""
    total = torch.zeros(t.shape[1], dtype=torch.float32, device=t.device)
    for start in range(0, t.shape[0], TOKEN_CHUNK):
        chunk = t[start : start + TOKEN_CHUNK].float()
        total += (chunk * chunk).sum(0)
    return total


def sampled_weight_gradient(
    grad_output: torch.Tensor, x: torch.Tensor, pattern: SamplingPattern
) -> torch.Tensor:
    """fp32 entries of gᵀx at ``pattern``'s positions, in their given order: [T, out], [T, in] -> [k]."""
    k = pattern.flat_index.numel()
    if k == 0:
        return torch.zeros(0, dtype=torch.float32, device=x.device)
    if pattern.use_dense:
        return dense_weight_gradient(grad_output, x).view(-1)[pattern.flat_index]
    if pattern.use_triton:
        from .triton_kernels import sampled_gtx  # imports Triton: only where the fused kernel is used

        return sampled_gtx(grad_output, x, pattern.row_indices, pattern.col_indices, pattern.order)
    csr = pattern._csr(torch.zeros(k, dtype=torch.float32, device=x.device))
    for start in range(0, x.shape[0], TOKEN_CHUNK):
        g = grad_output[start : start + TOKEN_CHUNK].float()
        csr = torch.sparse.sampled_addmm(csr, g.t(), x[start : start + TOKEN_CHUNK].float())
    values = torch.empty_like(csr.values())
    values[pattern.order] = csr.values()
    return values
