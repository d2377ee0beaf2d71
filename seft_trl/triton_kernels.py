"""The sampled weight gradient as one fused Triton kernel: the δ gradient's path on CUDA.

On CUDA, ``torch.sparse.sampled_addmm`` (cuSPARSE SDDMM) takes fp32 only, so the portable path
copies every 1024-token chunk of g and x to fp32, transposes g, and launches once per chunk. This
kernel reads g [T, out] and x [T, in] where they lie, in their own dtype (fp32, bf16 or fp16),
accumulates in fp32 and writes each entry straight to its delta slot: one launch per backward, no
copies, no atomics (so the result does not depend on scheduling).

Each program takes ``BLOCK_K`` consecutive positions of the sorted pattern and walks the tokens in
tiles of ``BLOCK_T``. Sorted positions mostly share a row, so the g loads of a tile hit a few
columns of g, and the x loads of one row's sorted columns lie close together.

Triton compiles this for CUDA only; ``TRITON_INTERPRET=1`` (set before this module is imported)
runs it on CPU tensors, which is how the test suite checks it without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_K = 64  # positions per program
BLOCK_T = 32  # tokens per tile


@triton.jit
def _sampled_gtx_kernel(
    g_ptr, x_ptr, rows_ptr, cols_ptr, slots_ptr, out_ptr, tokens, k, g_row_stride, x_row_stride,
    BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
):
    offsets = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)  # [BLOCK_K] into the sorted positions
    valid = offsets < k
    rows = tl.load(rows_ptr + offsets, mask=valid, other=0).to(tl.int64)
    cols = tl.load(cols_ptr + offsets, mask=valid, other=0).to(tl.int64)
    total = tl.zeros([BLOCK_K], dtype=tl.float32)
    for start in range(0, tokens, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T).to(tl.int64)  # [BLOCK_T]
        mask = (t < tokens)[:, None] & valid[None, :]  # [BLOCK_T, BLOCK_K]
        g = tl.load(g_ptr + t[:, None] * g_row_stride + rows[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + t[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        total += tl.sum(g * x, axis=0)
    slots = tl.load(slots_ptr + offsets, mask=valid, other=0)
    tl.store(out_ptr + slots, total, mask=valid)


def sampled_gtx(grad_output: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                slots: torch.Tensor) -> torch.Tensor:
    """fp32 [k] with ``out[slots[i]] = Σ_t grad_output[t, rows[i]] · x[t, cols[i]]``.

    grad_output [T, out] and x [T, in] in any float dtype; rows, cols, slots [k] (positions sorted
    for locality, ``slots`` the permutation back to the caller's order).
    """
    k = rows.numel()
    out = torch.empty(k, dtype=torch.float32, device=x.device)
    if k == 0:
        return out
    grad_output = grad_output if grad_output.stride(1) == 1 else grad_output.contiguous()
    x = x if x.stride(1) == 1 else x.contiguous()
    _sampled_gtx_kernel[(triton.cdiv(k, BLOCK_K),)](
        grad_output, x, rows, cols, slots, out, x.shape[0], k, grad_output.stride(0), x.stride(0),
        BLOCK_K=BLOCK_K, BLOCK_T=BLOCK_T,
    )
    return out
