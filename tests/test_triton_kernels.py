"""The fused Triton δ-gradient kernel against dense autograd (on CPU through Triton's interpreter)."""

from __future__ import annotations

import pytest
import torch

from seft_trl.kernels import SamplingPattern, sampled_weight_gradient
from seft_trl.triton_kernels import BLOCK_K, BLOCK_T

OUT, IN = 24, 40


def positions(kind: str) -> torch.Tensor:
    """Flat positions of an OUT × IN weight, in unsorted (slot) order."""
    generator = torch.Generator().manual_seed(0)
    if kind == "scattered":  # not a multiple of the block: the last program is partly masked
        index = torch.randperm(OUT * IN, generator=generator)[: 2 * BLOCK_K + 13]
    elif kind == "full and empty rows":  # rows 3 and 17 complete, every other row empty
        index = torch.cat([torch.arange(3 * IN, 4 * IN), torch.arange(17 * IN, 18 * IN)])
        index = index[torch.randperm(index.numel(), generator=generator)]
    else:  # one position
        index = torch.tensor([OUT * IN - 1])
    return index.to(torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, BLOCK_T + 5, 3 * BLOCK_T])  # ragged and whole tiles
@pytest.mark.parametrize("kind", ["scattered", "full and empty rows", "single"])
def test_fused_kernel_matches_dense_autograd(dtype, tokens, kind):
    torch.manual_seed(tokens)
    x = torch.randn(tokens, IN, dtype=dtype, requires_grad=True)
    weight = torch.randn(OUT, IN, dtype=dtype, requires_grad=True)
    y = x @ weight.t()
    g = torch.randn_like(y)
    y.backward(g)
    index = positions(kind)
    pattern = SamplingPattern(index, OUT, IN, use_dense=False, use_triton=True)
    fused = sampled_weight_gradient(g, x.detach(), pattern)
    # The reference accumulates in fp32 from the same low-precision inputs, as the kernel does.
    reference = (g.float().t() @ x.detach().float()).view(-1)[index.long()]
    assert fused.dtype == torch.float32 and fused.shape == index.shape
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
    # Autograd's own weight gradient, rounded to the weight's dtype.
    torch.testing.assert_close(fused.to(dtype), weight.grad.view(-1)[index.long()], rtol=1e-2, atol=1e-2)


def test_fused_kernel_reads_strided_rows_without_a_copy_and_handles_no_tokens():
    x = torch.randn(10, 2 * IN)[:, :IN]  # rows of stride 2·IN
    g = torch.randn(10, OUT)
    index = positions("scattered")
    pattern = SamplingPattern(index, OUT, IN, use_dense=False, use_triton=True)
    reference = (g.t() @ x).view(-1)[index.long()]
    torch.testing.assert_close(sampled_weight_gradient(g, x, pattern), reference, rtol=1e-5, atol=1e-5)
    empty = sampled_weight_gradient(g[:0], x[:0], pattern)
    assert torch.equal(empty, torch.zeros(index.numel()))


def test_cuda_selects_the_fused_kernel_and_cpu_the_csr_one():
    index = positions("scattered")
    assert not SamplingPattern(index, OUT, IN, use_dense=False).use_triton
    if torch.cuda.is_available():
        assert SamplingPattern(index.cuda(), OUT, IN, use_dense=False).use_triton
