"""Weight-gradient kernels of the sparse-delta layer.

The gradient of a delta at flat position p = r * in + c is ``sum_t g[t, r] * x[t, c]``, an
entry of the dense weight gradient ``gᵀx`` [out, in]. Computing the dense matrix costs
``T·out·in`` multiply-adds and ``out·in`` floats of memory; sampling only the k entries
(an SDDMM) costs ``T·k`` but runs far below BLAS efficiency.

Each device has its sampled kernel: on CUDA one fused Triton kernel (:mod:`seft_trl.triton_kernels`:
no copies, g and x in their own dtype); on the CPU a compiled Numba kernel
(:mod:`seft_trl.numba_kernels`, the ``cpu`` extra: g and x transposed tile by tile in cache, never
into memory); ``torch.sparse.sampled_addmm`` over a CSR pattern wherever neither is installed.

``benchmarks/delta_grad_kernels.py`` measures them against the dense product (results in
``benchmarks/results/delta_grad_kernels.md``). One sampled entry costs more than one dense entry,
by a factor that depends on the kernel, the layer and the machine's BLAS; the cost rule samples
when ``k * SAMPLED_ENTRY_COST[kernel] < out * in`` and otherwise takes the dense product and
gathers. The constants come from those measurements: on the CPU both sample at SEFT's usual 1-3%
density, where sampling wins by several times, and Numba's leaves densities above 1/16 to the
dense product, which holds no sorted layout of the positions (at 10% the measured cases sampled
faster: the results file says by how much). On CUDA the dense product runs on the tensor cores and
a gather kernel cannot compete (``benchmarks/results/gpu.md``): the rule takes it there at every
density above 0.25%. The CPU paths work over token chunks where they convert dtypes, which
bounds the fp32 copies of g and x.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Sequence

import torch

# Cost of one sampled entry relative to one dense entry, per sampled kernel (measured; see the
# module docstring).
SAMPLED_ENTRY_COST = {"numba": 16, "sampled_addmm": 40, "triton": 400}
# Tokens per chunk: bounds the fp32 copies of g and x (chunk × (out + in) floats).
TOKEN_CHUNK = 1024
KERNELS = ("dense", *SAMPLED_ENTRY_COST)


def compiled_on_cpu(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` lies on the CPU with Numba installed, where the compiled kernels
    (:mod:`seft_trl.numba_kernels`, :mod:`seft_trl.numba_topology`) replace torch operations."""
    return tensor.device.type == "cpu" and importlib.util.find_spec("numba") is not None


def default_sampled_kernel(device: torch.device) -> str:
    """The fastest sampled kernel installed for ``device``: Triton on CUDA, Numba on the CPU."""
    if device.type == "cuda":
        return "triton" if importlib.util.find_spec("triton") is not None else "sampled_addmm"
    return "numba" if importlib.util.find_spec("numba") is not None else "sampled_addmm"


class SamplingPattern:
    """A set of flat positions [k] of an out × in weight, prepared for the sampled product.

    Positions may be in any order (delta slots are not sorted, so optimizer state never has to
    move); the sampled kernels work over the sorted positions and scatter results back.
    """

    def __init__(
        self, flat_index: torch.Tensor | Sequence[torch.Tensor], out_features: int, in_features: int,
        kernel: str | None = None,
    ) -> None:
        """``flat_index``: the positions [k], or several parts of them (an accumulation window's delta
        slots and candidates) that sample as their concatenation. ``kernel``: one of :data:`KERNELS`;
        None takes the device's sampled kernel, or "dense" (the dense product, then a gather) where the
        cost rule says that is cheaper. Benchmarks and tests force one to compare them."""
        if kernel is not None and kernel not in KERNELS:
            raise ValueError(f"kernel={kernel!r}: choose one of {', '.join(KERNELS)}, or None for the default.")
        parts = (flat_index,) if torch.is_tensor(flat_index) else tuple(flat_index)
        self.numel = sum(part.numel() for part in parts)
        self.out_features, self.in_features = out_features, in_features
        device = parts[0].device
        if kernel is None:
            kernel = default_sampled_kernel(device)
            if self.numel * SAMPLED_ENTRY_COST[kernel] >= out_features * in_features:
                kernel = "dense"
        if kernel == "numba" and device.type != "cpu":
            raise ValueError(f"kernel='numba' runs on the CPU, not on {device}: leave kernel=None.")
        self.kernel = kernel
        # The dense product gathers at the given parts, which their owners hold anyway: a window's
        # pattern of one concatenated copy would hold 4 more bytes per delta and candidate, in every
        # layer at once (a third of the window's memory). The sampled kernels keep only the sorted
        # layout below.
        self.parts = parts if kernel == "dense" else None
        if kernel == "dense" or self.numel == 0:
            return
        flat_index = parts[0] if len(parts) == 1 else torch.cat(parts)
        if kernel == "numba":
            from . import numba_kernels  # imports Numba: only where its kernel is used

            self.order, self.col_indices, self.crow_indices = numba_kernels.csr_layout(
                flat_index, out_features, in_features
            )
            return
        sorted_index, order = torch.sort(flat_index)
        self.order = order.to(flat_index.dtype)  # sort returns int64; int32 positions take int32 slots
        rows = sorted_index // in_features
        self.col_indices = sorted_index % in_features
        if kernel == "triton":
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
    """fp32 gᵀx: grad_output [T, out], x [T, in] -> [out, in], over token chunks.

    On CUDA, 16-bit inputs go to the tensor cores as they are, accumulating into fp32 output
    (``out_dtype``): no fp32 copies of g and x, and a GEMM an order of magnitude faster than fp32's.
    """
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and grad_output.dtype == x.dtype:
        return torch.mm(grad_output.t(), x, out_dtype=torch.float32)
    grad = torch.zeros(grad_output.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], TOKEN_CHUNK):
        g = grad_output[start : start + TOKEN_CHUNK].float()
        grad.addmm_(g.t(), x[start : start + TOKEN_CHUNK].float())
    return grad


def token_square_sums(t: torch.Tensor) -> torch.Tensor:
    """fp32 Σ over tokens of t²: [T, features] -> [features], over token chunks (the curvature factors)."""
    if compiled_on_cpu(t):
        from . import numba_kernels  # imports Numba: only where its kernel is used

        return numba_kernels.token_square_sums(t, TOKEN_CHUNK)
    total = torch.zeros(t.shape[1], dtype=torch.float32, device=t.device)
    for start in range(0, t.shape[0], TOKEN_CHUNK):
        chunk = t[start : start + TOKEN_CHUNK].float()
        total += (chunk * chunk).sum(0)
    return total


def sampled_gradient_and_square_sums(
    grad_output: torch.Tensor, x: torch.Tensor, pattern: SamplingPattern
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An accumulation window's backward: the sampled entries [k], Σ_t g² [out] and Σ_t x² [in], fp32.

    The Numba kernel sums the squares over the token rows it has just read for its tiles, at a
    fifth of the cost of two separate passes (benchmarks/results/engine_constants.md); the other kernels read g and x
    again.
    """
    if pattern.kernel == "numba" and pattern.numel > 0:
        from . import numba_kernels  # imports Numba: only where its kernel is used

        return numba_kernels.sampled_gtx(
            grad_output, x, pattern.crow_indices, pattern.col_indices, pattern.order, TOKEN_CHUNK, square_sums=True
        )
    return sampled_weight_gradient(grad_output, x, pattern), token_square_sums(grad_output), token_square_sums(x)


def sampled_weight_gradient(
    grad_output: torch.Tensor, x: torch.Tensor, pattern: SamplingPattern
) -> torch.Tensor:
    """fp32 entries of gᵀx at ``pattern``'s positions, in their given order: [T, out], [T, in] -> [k]."""
    k = pattern.numel
    if k == 0:
        return torch.zeros(0, dtype=torch.float32, device=x.device)
    if pattern.kernel == "dense":
        dense = dense_weight_gradient(grad_output, x).view(-1)
        return torch.cat([dense[part] for part in pattern.parts])
    if pattern.kernel == "triton":
        from .triton_kernels import sampled_gtx  # imports Triton: only where the fused kernel is used

        return sampled_gtx(grad_output, x, pattern.row_indices, pattern.col_indices, pattern.order)
    if pattern.kernel == "numba":
        from . import numba_kernels  # imports Numba: only where its kernel is used

        return numba_kernels.sampled_gtx(
            grad_output, x, pattern.crow_indices, pattern.col_indices, pattern.order, TOKEN_CHUNK
        )
    csr = pattern._csr(torch.zeros(k, dtype=torch.float32, device=x.device))
    for start in range(0, x.shape[0], TOKEN_CHUNK):
        g = grad_output[start : start + TOKEN_CHUNK].float()
        csr = torch.sparse.sampled_addmm(csr, g.t(), x[start : start + TOKEN_CHUNK].float())
    values = torch.empty_like(csr.values())
    values[pattern.order] = csr.values()
    return values
