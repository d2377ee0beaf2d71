"""The sampled weight gradient on the CPU as one compiled Numba kernel: the δ gradient's CPU path.

``torch.sparse.sampled_addmm`` on the CPU first copies gᵀ [out, T] and xᵀ [in, T] into fresh
memory; on a 2-core machine those transposes cost more than the k·T multiply-adds themselves, and
make the sampled product slower than a LoRA layer's extra GEMMs. This kernel never writes a
transposed copy to memory: each thread takes its own range of tokens and walks it in tiles of
``TILE_TOKENS``, transposing the tile of g and of x into small thread-local buffers that stay in
cache, so every dot product runs over contiguous floats, and g and x are each read once.

Threads split the tokens, not the positions: each adds into its own partial sums, which are then
summed over threads in a fixed order. No thread waits for another, and the result depends on the
number of threads only, never on scheduling (ranks and resumed runs with the same thread count
agree bit for bit).

Numba compiles this with its bundled LLVM on first use (a few seconds, then cached on disk), so
nothing needs a compiler at install time. It is optional (the ``cpu`` extra); without it the CPU
takes ``torch.sparse.sampled_addmm``. A reduction that fast math may reassociate lives in its own
function, never in a parallel loop's body: that body is optimized differently as built in the
process and as loaded from the cache, and every process must round alike
(``tests/test_sampled_kernels.py``).

The sampled product's CSR layout of a set of positions is built here too, in one pass.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numba
import numpy as np
import torch

TILE_TOKENS = 64  # tokens per tile: a [in, 64] fp32 tile of a 1536-wide input is 384 KiB
BLOCK = 16  # transposes go block by block: 16 floats are one 64-byte cache line
# Columns of the x tile whose entries are taken in one sweep over the rows: a [4096, 64] fp32 block
# is 1 MiB and stays in a core's L2 while the rows read it at random columns, where a whole
# 11008-wide tile does not (timings: benchmarks/results/engine_constants.md).
COLUMN_BLOCK = 4096


@numba.njit(fastmath=True, cache=True, nogil=True)
def _transpose_into(src, start, width, tile):  # pragma: no cover - compiled by Numba
    """tile[f, t] = src[start + t, f] for t < width, in BLOCK × BLOCK blocks.

    Row by row, the writes would stride through every line of the tile for each token, and on
    widths whose stride aliases in the cache (1536 floats) every one of them misses; a block reads
    BLOCK lines of ``src`` and writes BLOCK lines of ``tile``, all of which stay in L1.
    """
    n_features = src.shape[1]
    for t0 in range(0, width, BLOCK):
        t1 = min(t0 + BLOCK, width)
        for f0 in range(0, n_features, BLOCK):
            for f in range(f0, min(f0 + BLOCK, n_features)):
                for t in range(t0, t1):
                    tile[f, t] = src[start + t, f]


@numba.njit(fastmath=True, cache=True, nogil=True)
def _add_token_squares(src, start, width, sums):  # pragma: no cover - compiled by Numba
    """sums[f] += Σ_t src[start + t, f]² for t < width: along src's contiguous rows, which the
    transpose has just brought into cache."""
    for t in range(start, start + width):
        row = src[t]
        for f in range(row.shape[0]):
            sums[f] += row[f] * row[f]


@numba.njit(fastmath=True, cache=True, nogil=True)
def _add_tile_dots(g_tile, x_tile, first, last, cols, sums):  # pragma: no cover - compiled by Numba
    """sums[e] += g_tile[r] · x_tile[cols[e]] over the tile's TILE_TOKENS columns, for e in
    [first[r], last[r]) of every row r.

    Its own function, not the parallel loop's body: the compiler vectorizes the dot products by
    reassociating them, and a parallel loop's body is optimized once as built in the process and
    again inside its library as loaded from Numba's cache, so the two rounded differently and the
    first process after an install disagreed with every later one in the last bits. Vectorized
    here, the body is the same in both.
    """
    for r in range(g_tile.shape[0]):
        g_row = g_tile[r]
        for e in range(first[r], last[r]):
            x_row = x_tile[cols[e]]
            dot = np.float32(0.0)
            for t in range(TILE_TOKENS):
                dot += g_row[t] * x_row[t]
            sums[e] += dot


@numba.njit(cache=True, nogil=True)
def _column_block_bounds(crow, cols, n_in):  # pragma: no cover - compiled by Numba
    """int64 [blocks + 1, out]: where each CSR row's entries reach each block of COLUMN_BLOCK columns
    (row r's entries in block b are bounds[b, r] to bounds[b + 1, r])."""
    n_out = crow.shape[0] - 1
    blocks = max(1, (n_in + COLUMN_BLOCK - 1) // COLUMN_BLOCK)
    bounds = np.empty((blocks + 1, n_out), np.int64)
    for r in range(n_out):
        e = crow[r]
        bounds[0, r] = e
        for b in range(1, blocks):
            while e < crow[r + 1] and cols[e] < b * COLUMN_BLOCK:
                e += 1
            bounds[b, r] = e
        bounds[blocks, r] = crow[r + 1]
    return bounds


@numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _sampled_gtx_add(g, x, crow, cols, slots, out, n_parts, row_sq, col_sq):  # pragma: no cover - compiled by Numba
    """out[slots[e]] += Σ_t g[t, r_e] · x[t, cols[e]] for the CSR pattern (crow, cols), rows r_e.

    Where ``row_sq`` [out] and ``col_sq`` [in] are not empty, also row_sq += Σ_t g[t, :]² and
    col_sq += Σ_t x[t, :]²: the window's curvature factors, from the token rows just transposed.
    """
    tokens, n_out = g.shape
    n_in = x.shape[1]
    k = cols.shape[0]
    squares = row_sq.shape[0] > 0
    partial = np.zeros((n_parts, k), np.float32)  # [threads, k]
    bounds = _column_block_bounds(crow, cols, n_in)  # [blocks + 1, out]
    row_partial = np.zeros((n_parts, n_out if squares else 0), np.float32)  # [threads, out]
    col_partial = np.zeros((n_parts, n_in if squares else 0), np.float32)  # [threads, in]
    for part in numba.prange(n_parts):
        begin, end = part * tokens // n_parts, (part + 1) * tokens // n_parts
        # [out, tile] and [in, tile]: this tile of g and of x, transposed. Every dot product runs
        # over all TILE_TOKENS columns, a length the compiler unrolls and vectorizes; the columns a
        # last, partial tile leaves are zero in both, so they add exact zeros.
        g_tile = np.zeros((n_out, TILE_TOKENS), np.float32)
        x_tile = np.zeros((n_in, TILE_TOKENS), np.float32)
        sums = partial[part]
        for start in range(begin, end, TILE_TOKENS):
            width = min(TILE_TOKENS, end - start)
            if width < TILE_TOKENS:
                g_tile[:, width:] = 0.0
                x_tile[:, width:] = 0.0
            _transpose_into(g, start, width, g_tile)
            _transpose_into(x, start, width, x_tile)
            if squares:
                _add_token_squares(g, start, width, row_partial[part])
                _add_token_squares(x, start, width, col_partial[part])
            for block in range(bounds.shape[0] - 1):
                _add_tile_dots(g_tile, x_tile, bounds[block], bounds[block + 1], cols, sums)
    for e in numba.prange(k):
        total = np.float32(0.0)
        for part in range(n_parts):
            total += partial[part, e]
        out[slots[e]] += total
    if squares:
        for part in range(n_parts):  # a fixed order, as for the entries
            row_sq += row_partial[part]
            col_sq += col_partial[part]


@numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _token_square_sums(src, n_parts, sums):  # pragma: no cover - compiled by Numba
    """sums += Σ_t src[t]²: each thread over its own token range, then the partials in a fixed order."""
    tokens = src.shape[0]
    partial = np.zeros((n_parts, src.shape[1]), np.float32)
    for part in numba.prange(n_parts):
        begin, end = part * tokens // n_parts, (part + 1) * tokens // n_parts
        _add_token_squares(src, begin, end - begin, partial[part])
    for part in range(n_parts):
        sums += partial[part]


def token_square_sums(t: torch.Tensor, token_chunk: int) -> torch.Tensor:
    """fp32 Σ over tokens of t² for a CPU [T, features] tensor, in one compiled pass over its rows
    (torch first writes the squares to memory); other dtypes are converted ``token_chunk`` tokens at a time."""
    sums = torch.zeros(t.shape[1], dtype=torch.float32)
    chunk = max(1, t.shape[0]) if t.dtype == torch.float32 else token_chunk
    with numba_threads() as threads:
        for start in range(0, t.shape[0], chunk):
            _token_square_sums(as_array(t[start : start + chunk].float().contiguous()), threads, sums.numpy())
    return sums


def scratch_bytes(out_features: int, in_features: int, k: int, threads: int, square_sums: bool = False) -> int:
    """Memory the kernel allocates outside torch's allocator (invisible to torch.profiler): per
    thread, its partial sums [k] (and [out + in] with square sums) and the transposed tiles
    [out + in, TILE_TOKENS], all fp32; once, the rows' column-block bounds (int64)."""
    blocks = max(1, -(-in_features // COLUMN_BLOCK))
    bounds = 8 * (blocks + 1) * out_features
    return 4 * threads * (k + (out_features + in_features) * (TILE_TOKENS + square_sums)) + bounds


@numba.njit(cache=True, nogil=True)
def _csr_layout(flat_index, n_in, crow, cols, order):  # pragma: no cover - compiled by Numba
    """order: the ascending order of ``flat_index``; cols: the sorted positions' columns; crow: the
    rows' starts. Two stable counting sorts, by column and then by row, leave the positions in
    (row, column) order, which is theirs."""
    by_column = np.empty(flat_index.shape[0], np.int64)
    column_next = np.zeros(n_in + 1, np.int64)
    for p in flat_index:
        column_next[p % n_in + 1] += 1
        crow[p // n_in + 1] += 1
    for c in range(n_in):
        column_next[c + 1] += column_next[c]
    for r in range(crow.shape[0] - 1):
        crow[r + 1] += crow[r]
    for i in range(flat_index.shape[0]):
        c = flat_index[i] % n_in
        by_column[column_next[c]] = i
        column_next[c] += 1
    row_next = crow[:-1].copy()
    for i in by_column:
        r = flat_index[i] // n_in
        order[row_next[r]], cols[row_next[r]] = i, flat_index[i] % n_in
        row_next[r] += 1


def csr_layout(flat_index: torch.Tensor, out_features: int, in_features: int) -> tuple[torch.Tensor, ...]:
    """(order, col_indices, crow_indices) of distinct flat positions [k] of an out × in CPU weight, in
    ``flat_index``'s dtype: what ``torch.sort`` and ``bincount`` give, in a fifth of the time (the
    pattern is rebuilt for every layer after each update and at each window start)."""
    order, cols = torch.empty_like(flat_index), torch.empty_like(flat_index)
    crow = torch.zeros(out_features + 1, dtype=flat_index.dtype)
    _csr_layout(as_array(flat_index.contiguous()), in_features, *(as_array(t) for t in (crow, cols, order)))
    return order, cols, crow


def as_array(tensor: torch.Tensor) -> np.ndarray:
    """A NumPy view of a CPU tensor for a kernel's input, which leaves the tensor's storage resizable.

    ``Tensor.numpy()`` marks the storage fixed-size for good, and FSDP2 frees a gathered parameter
    by resizing its storage to zero; DLPack shares the memory without that mark. The view must not
    outlive the call it is made for.
    """
    return np.from_dlpack(tensor.detach())


@contextmanager
def numba_threads() -> Iterator[int]:
    """Run Numba's parallel loops on as many threads as torch uses (a DDP process pinned to one
    thread stays on one); yields that count.

    Numba's first parallel launch starts its OpenMP pool with NUMBA_NUM_THREADS threads, which also
    sets the count torch reads (one OpenMP runtime): a process given one thread would run torch, and
    these kernels' later calls, on all cores from then on, and its results would depend on when
    that first launch happened (a resumed run would differ from an uninterrupted one). So torch's
    count is put back afterwards.
    """
    torch_threads = torch.get_num_threads()
    threads = max(1, min(torch_threads, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)
    try:
        yield threads
    finally:
        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)


def sampled_gtx(
    grad_output: torch.Tensor, x: torch.Tensor, crow: torch.Tensor, cols: torch.Tensor, slots: torch.Tensor,
    token_chunk: int, square_sums: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 [k] with ``out[slots[e]] = Σ_t grad_output[t, r_e] · x[t, cols[e]]`` (CSR rows r_e).

    grad_output [T, out] and x [T, in] on the CPU. fp32 inputs are read where they lie; other dtypes
    are converted to fp32 ``token_chunk`` tokens at a time, which bounds the copies. With
    ``square_sums`` also the fp32 Σ_t grad_output[t]² [out] and Σ_t x[t]² [in] (an accumulation
    window's curvature factors), summed over the token rows the product reads anyway.
    """
    out = torch.zeros(cols.numel(), dtype=torch.float32)
    row_sq = torch.zeros(grad_output.shape[1] if square_sums else 0, dtype=torch.float32)
    col_sq = torch.zeros(x.shape[1] if square_sums else 0, dtype=torch.float32)
    result = (out, row_sq, col_sq) if square_sums else out
    if x.shape[0] == 0 or (cols.numel() == 0 and not square_sums):
        return result
    arrays = crow.numpy(), cols.numpy(), slots.numpy(), out.numpy()
    chunk = x.shape[0] if grad_output.dtype == x.dtype == torch.float32 else token_chunk  # fp32: no copy
    with numba_threads() as threads:
        for start in range(0, x.shape[0], chunk):
            g = grad_output[start : start + chunk].detach().float().contiguous()
            x_part = x[start : start + chunk].detach().float().contiguous()
            _sampled_gtx_add(as_array(g), as_array(x_part), *arrays, threads, row_sq.numpy(), col_sq.numpy())
    return result
