"""Every sampled δ-gradient kernel against dense autograd: the fused Triton kernel (on CPU through
Triton's interpreter), the Numba CPU kernel and torch's sampled_addmm."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import DEVICE
from seft_trl import numba_kernels
from seft_trl.kernels import TOKEN_CHUNK, SamplingPattern, sampled_gradient_and_square_sums, sampled_weight_gradient
from seft_trl.triton_kernels import BLOCK_K, BLOCK_T

OUT, IN = 24, 40
KERNELS = ["triton", "numba", "sampled_addmm"]
# Ragged and whole tiles of both compiled kernels, and more than one token chunk.
TOKENS = [1, BLOCK_T + 5, 3 * numba_kernels.TILE_TOKENS, TOKEN_CHUNK + numba_kernels.TILE_TOKENS + 3]


def positions(kind: str) -> torch.Tensor:
    """Flat positions of an OUT × IN weight, in unsorted (slot) order."""
    generator = torch.Generator().manual_seed(0)
    if kind == "scattered":  # not a multiple of Triton's block: its last program is partly masked
        index = torch.randperm(OUT * IN, generator=generator)[: 2 * BLOCK_K + 13]
    elif kind == "full and empty rows":  # rows 3 and 17 complete, every other row empty
        index = torch.cat([torch.arange(3 * IN, 4 * IN), torch.arange(17 * IN, 18 * IN)])
        index = index[torch.randperm(index.numel(), generator=generator)]
    else:  # one position
        index = torch.tensor([OUT * IN - 1])
    return index.to(torch.int32)


def device_of(kernel: str) -> torch.device:
    """Triton's kernel runs on the GPU when there is one (else on the CPU through its interpreter)."""
    return DEVICE if kernel == "triton" else torch.device("cpu")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("kind", ["scattered", "full and empty rows", "single"])
def test_sampled_kernel_matches_dense_autograd(kernel, dtype, tokens, kind):
    torch.manual_seed(tokens)
    device = device_of(kernel)
    x = torch.randn(tokens, IN, dtype=dtype, device=device, requires_grad=True)
    weight = torch.randn(OUT, IN, dtype=dtype, device=device, requires_grad=True)
    y = x @ weight.t()
    g = torch.randn_like(y)
    y.backward(g)
    index = positions(kind).to(device)
    pattern = SamplingPattern(index, OUT, IN, kernel=kernel)
    sampled = sampled_weight_gradient(g, x.detach(), pattern)
    # The reference accumulates in fp32 from the same low-precision inputs, as the kernels do.
    reference = (g.float().t() @ x.detach().float()).view(-1)[index.long()]
    assert sampled.dtype == torch.float32 and sampled.shape == index.shape
    torch.testing.assert_close(sampled, reference, rtol=1e-5, atol=1e-4)
    # Autograd's own weight gradient, rounded to the weight's dtype.
    torch.testing.assert_close(sampled.to(dtype), weight.grad.view(-1)[index.long()], rtol=1e-2, atol=2e-2)


@pytest.mark.parametrize("kernel", KERNELS)
def test_sampled_kernel_reads_strided_rows_and_handles_no_tokens(kernel):
    device = device_of(kernel)
    x = torch.randn(10, 2 * IN, device=device)[:, :IN]  # rows of stride 2·IN
    g = torch.randn(10, OUT, device=device)
    index = positions("scattered").to(device)
    pattern = SamplingPattern(index, OUT, IN, kernel=kernel)
    reference = (g.t() @ x).view(-1)[index.long()]
    torch.testing.assert_close(sampled_weight_gradient(g, x, pattern), reference, rtol=1e-5, atol=1e-5)
    empty = sampled_weight_gradient(g[:0], x[:0], pattern)
    assert torch.equal(empty, torch.zeros(index.numel(), device=device))


@pytest.mark.parametrize("kernel", [*KERNELS, "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [0, *TOKENS])
def test_window_backward_adds_the_square_sums_to_the_same_entries(kernel, dtype, tokens):
    # Numba sums g² and x² from its own token tiles (ragged, zero-padded, over chunks for bf16);
    # every kernel must give what two separate passes give.
    torch.manual_seed(tokens)
    device = device_of(kernel)
    g = torch.randn(tokens, OUT, dtype=dtype, device=device)
    x = torch.randn(tokens, IN, dtype=dtype, device=device)
    pattern = SamplingPattern(positions("full and empty rows").to(device), OUT, IN, kernel=kernel)
    values, row_sq, col_sq = sampled_gradient_and_square_sums(g, x, pattern)
    assert row_sq.shape == (OUT,) and col_sq.shape == (IN,) and row_sq.dtype == col_sq.dtype == torch.float32
    torch.testing.assert_close(values, sampled_weight_gradient(g, x, pattern), rtol=0, atol=0)
    torch.testing.assert_close(row_sq, g.float().pow(2).sum(0), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(col_sq, x.float().pow(2).sum(0), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("square_sums", [False, True])
def test_numba_kernel_sweeps_wide_layers_in_column_blocks(square_sums):
    # Wider than two column blocks: rows with entries in every block, at the blocks' edges, only in
    # the last block, and none at all must each take every entry exactly once.
    block, out_features = numba_kernels.COLUMN_BLOCK, 5
    in_features = 2 * block + 37
    columns_of_row = [
        torch.randperm(in_features, generator=torch.Generator().manual_seed(1))[:300],
        torch.tensor([block - 1, block, 2 * block - 1, 2 * block, in_features - 1]),
        torch.tensor([2 * block + 5, 2 * block + 36]),
        torch.tensor([], dtype=torch.int64),
        torch.tensor([0]),
    ]
    index = torch.cat([r * in_features + cols for r, cols in enumerate(columns_of_row)])
    index = index[torch.randperm(index.numel(), generator=torch.Generator().manual_seed(2))].to(torch.int32)
    g, x = torch.randn(70, out_features), torch.randn(70, in_features)
    pattern = SamplingPattern(index, out_features, in_features, kernel="numba")
    sampled = sampled_gradient_and_square_sums(g, x, pattern)[0] if square_sums else sampled_weight_gradient(g, x, pattern)
    torch.testing.assert_close(sampled, (g.t() @ x).view(-1)[index.long()], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype, shape, k", [
    *((dtype, (37, 61), k) for dtype in (torch.int32, torch.int64) for k in (0, 1, 300, 2257)),
    (torch.int64, (65536, 65536), 3),  # positions past 2³¹, which only int64 holds
])
def test_compiled_csr_layout_equals_torchs_sort_and_bincount(dtype, shape, k):
    out_features, in_features = shape  # 37 x 61 with 300 positions leaves rows empty; 2257 fills every entry
    if out_features * in_features > 2**31:
        flat = torch.tensor([2**32 - 1, 5, 2**31 + 7], dtype=dtype)
    else:
        generator = torch.Generator().manual_seed(k)
        flat = torch.randperm(out_features * in_features, generator=generator)[:k].to(dtype)
    order, cols, crow = numba_kernels.csr_layout(flat, out_features, in_features)
    sorted_index, expected_order = torch.sort(flat)
    per_row = torch.bincount(sorted_index // in_features, minlength=out_features).cumsum(0)
    assert order.dtype == cols.dtype == crow.dtype == dtype
    assert torch.equal(order, expected_order.to(dtype))
    assert torch.equal(cols, sorted_index % in_features)
    assert torch.equal(crow, torch.cat([torch.zeros(1, dtype=torch.int64), per_row]).to(dtype))


def test_numba_kernel_is_deterministic_and_follows_torch_thread_count():
    torch.manual_seed(0)
    g, x = torch.randn(700, OUT), torch.randn(700, IN)
    pattern = SamplingPattern(positions("scattered"), OUT, IN, kernel="numba")
    threads = torch.get_num_threads()
    try:
        results = {}
        for count in (1, 2):
            torch.set_num_threads(count)
            results[count] = sampled_gradient_and_square_sums(g, x, pattern)
            again = sampled_gradient_and_square_sums(g, x, pattern)
            assert all(map(torch.equal, again, results[count]))  # same threads: same bits
            assert numba_kernels.numba.get_num_threads() == min(count, numba_kernels.numba.config.NUMBA_NUM_THREADS)
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(results[1], results[2]):
        torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-5)


def test_numba_first_launch_leaves_a_one_thread_process_on_one_thread():
    # Numba's OpenMP pool starts with every core and also sets the count torch reads; a process given one
    # thread (OMP_NUM_THREADS=1, as accelerate gives each CPU rank) must keep it, and the kernel's bits with it.
    script = """
import torch
from seft_trl.kernels import SamplingPattern, sampled_weight_gradient
assert torch.get_num_threads() == 1
torch.manual_seed(0)
g, x = torch.randn(700, 24), torch.randn(700, 40)
pattern = SamplingPattern(torch.randperm(24 * 40)[:50], 24, 40, kernel="numba")
first = sampled_weight_gradient(g, x, pattern)
assert torch.get_num_threads() == 1, torch.get_num_threads()
assert torch.equal(sampled_weight_gradient(g, x, pattern), first)
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_numba_kernel_built_here_and_loaded_from_the_cache_agree_bit_for_bit(tmp_path):
    # A parallel kernel built in the process runs its loop as built for the parallel runtime; loaded
    # from Numba's on-disk cache it runs the loop as optimized with the rest of its library. With
    # reassociating (fast) math the two rounded the dot products differently, so the first process
    # after an install disagreed with every later one (the demo's first run with its second).
    script = """
import sys, torch
from seft_trl.kernels import SamplingPattern, sampled_gradient_and_square_sums, sampled_weight_gradient, token_square_sums
from seft_trl.numba_kernels import _sampled_gtx_add
generator = torch.Generator().manual_seed(0)
g, x = torch.randn(300, 96, generator=generator), torch.randn(300, 80, generator=generator)
pattern = SamplingPattern(torch.randperm(96 * 80, generator=generator)[:500].to(torch.int32), 96, 80, kernel="numba")
torch.save([sampled_weight_gradient(g, x, pattern), *sampled_gradient_and_square_sums(g, x, pattern),
            token_square_sums(g), token_square_sums(x)], sys.argv[1])
print("compiled" if _sampled_gtx_add.stats.cache_misses else "loaded")
"""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache")}
    builds = {}
    for run in ("first", "second"):
        done = subprocess.run([sys.executable, "-c", script, str(tmp_path / run)], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        builds[done.stdout.split()[-1]] = torch.load(tmp_path / run)
    assert set(builds) == {"compiled", "loaded"}
    assert all(map(torch.equal, builds["compiled"], builds["loaded"]))


def test_each_device_selects_its_own_kernel_and_refuses_a_foreign_one():
    index = positions("single")  # sparse enough for the cost rule to sample
    assert SamplingPattern(index, OUT, IN).kernel == "numba"  # numba is in the dev extra
    with pytest.raises(ValueError, match="choose one of"):
        SamplingPattern(index, OUT, IN, kernel="cusparse")
    if torch.cuda.is_available():
        assert SamplingPattern(index.cuda(), OUT, IN).kernel == "triton"
        with pytest.raises(ValueError, match="runs on the CPU"):
            SamplingPattern(index.cuda(), OUT, IN, kernel="numba")
