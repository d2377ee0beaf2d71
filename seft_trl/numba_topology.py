"""The topology's work on the CPU as compiled Numba passes: candidate ranking, support counts, orders and plans.

Choosing an accumulation window's candidates ranks every weight of a layer twice: growth by |g|
outside the deltas, removal by a criterion of (w, g, curvature) over the support. In torch each
ranking is a chain of whole-layer operations (the score, masks, a scatter of the exclusions,
a threshold pass, nonzero, topk); on SmolLM2 they took 1.5x as long as the dense gradient they rank.
Here one compiled call samples the scores for a threshold, then computes each row's scores into a
small buffer, counts the entries beyond the threshold and writes them out in a second pass (no
layer-sized temporary), and takes the exact top-c among them; a layer-scope window that revives
ranks growth and removal in the same call and the same passes.

The scores are the registry's (:mod:`seft_trl.criteria`) computed in the same fp32 operations in
the same order, so they equal the torch path's bit for bit; a criterion without a kernel here
takes the torch path.

An update is many small steps per layer: in torch about a hundred operations of a few microseconds
of dispatch each, on a few thousand entries. Compiled here: the support count (read on the weight's
bits in place, 4x torch's compare-and-sum, with the delta positions that hold zero in the same
call), the stable orders (a radix sort on the scores' bits, a tenth of torch's stable sort at
15,000 entries) and the whole swap plan of a layer-scope layer.

The passes sort and select with their own radix code, not Numba's ``np.argsort`` or
``np.partition``: those are built in factories that give several variants one symbol name, and a
cached pass holding one bound to another variant's code in a process that had compiled it
(``tests/test_numba_cache.py``)."""

from __future__ import annotations

import numba
import numpy as np
import torch

from .numba_kernels import as_array, numba_threads

GROWTH, TAYLOR, SENSITIVITY, MAGNITUDE = 0, 1, 2, 3
# Criterion name (growth or removal registry) -> score kernel.
SCORE_KINDS = {"gradient": GROWTH, "taylor": TAYLOR, "sensitivity": SENSITIVITY, "magnitude": MAGNITUDE}
BLOCKS_PER_THREAD = 4  # row blocks per thread: balances rows of unequal survivor counts


@numba.njit(inline="always")
def _score(kind, w, g, h):  # pragma: no cover - compiled by Numba
    """The criterion's score of one weight: as :mod:`seft_trl.criteria` computes it, in fp32."""
    if kind == GROWTH:
        return abs(g)
    if kind == TAYLOR:
        first_order = -w * g
        if first_order <= 0:  # relu; a NaN passes, as through torch.relu
            first_order = np.float32(0.0)
        return np.float32(0.5) * w * w * h + first_order
    if kind == SENSITIVITY:
        return abs(w * g)
    return abs(w)


@numba.njit(cache=True, nogil=True)
def _sample(kinds, grad, weight, row_sq, col_sq, excluded, skip_zero, stride, out):  # pragma: no cover
    """Scores of criterion i's eligible entries among every ``stride``-th (flat order) into ``out[i]``;
    returns their counts [criteria]."""
    n_out, n_in = grad.shape
    counts = np.zeros(kinds.shape[0], np.int64)
    for flat in range(0, n_out * n_in, stride):
        r, c = flat // n_in, flat % n_in
        w = weight[r, c]
        if excluded[r, c] != 0:
            continue
        for i in range(kinds.shape[0]):
            if skip_zero[i] and w == 0:
                continue
            h = row_sq[r] * col_sq[c] if kinds[i] == TAYLOR else np.float32(0.0)
            out[i, counts[i]] = _score(kinds[i], w, grad[r, c], h)
            counts[i] += 1
    return counts


@numba.njit(inline="always")
def _row_scores(kind, grad, weight, row_sq, col_sq, excluded, skip_zero, r, scores):  # pragma: no cover
    """scores[c] = the score of entry (r, c), NaN where it is not eligible (NaN passes no comparison).
    One branch-free loop, which the compiler vectorizes."""
    row_h = row_sq[r] if kind == TAYLOR else np.float32(0.0)
    for c in range(grad.shape[1]):
        w = weight[r, c]
        h = row_h * col_sq[c] if kind == TAYLOR else np.float32(0.0)
        score = _score(kind, w, grad[r, c], h)
        if excluded[r, c] != 0 or (skip_zero and w == 0):
            score = np.float32(np.nan)
        scores[c] = score


@numba.njit(parallel=True, cache=True, nogil=True)
def _beyond(kinds, grad, weight, row_sq, col_sq, excluded, thresholds, largest, skip_zero, block_rows,
            offsets, index_out, score_out, write):  # pragma: no cover - compiled by Numba
    """For each criterion i, the eligible entries of each row block whose score passes ``thresholds[i]``
    (≥ where ``largest[i]``, else ≤), in row-major order.

    Without ``write``, counts them into ``offsets[i, b + 1]``; with it, writes them into
    ``index_out`` and ``score_out`` from ``offsets[i, b]`` on (the counts' running sums, criterion
    after criterion). A block's rows are scored for one criterion after the other while they are
    in the core's cache, and the passing entries are kept without a branch.
    """
    n_out, n_in = grad.shape
    for block in numba.prange(offsets.shape[1] - 1):
        scores = np.empty(n_in, np.float32)
        passing = np.empty(n_in, np.int64)
        for i in range(kinds.shape[0]):
            threshold, best_high = thresholds[i], largest[i]
            at = offsets[i, block] if write else 0
            for r in range(block * block_rows, min(n_out, (block + 1) * block_rows)):
                _row_scores(kinds[i], grad, weight, row_sq, col_sq, excluded, skip_zero[i], r, scores)
                if not write:
                    for c in range(n_in):
                        at += (scores[c] >= threshold) if best_high else (scores[c] <= threshold)
                    continue
                m = 0
                for c in range(n_in):  # every column is written, the passing ones kept
                    passing[m] = c
                    m += (scores[c] >= threshold) if best_high else (scores[c] <= threshold)
                for j in range(m):
                    index_out[at + j] = r * n_in + passing[j]
                    score_out[at + j] = scores[passing[j]]
                at += m
            if not write:
                offsets[i, block + 1] = at


@numba.njit(cache=True, nogil=True)
def _collect(kinds, grad, weight, row_sq, col_sq, excluded, thresholds, largest, skip_zero,
             block_rows):  # pragma: no cover - compiled by Numba
    """Each criterion's eligible entries whose score passes its threshold, in one pair of arrays: flat
    positions (int64, ascending per criterion) and fp32 scores, criterion i's from ``starts[i]`` to
    ``starts[i + 1]``."""
    n_blocks = -(-grad.shape[0] // block_rows)
    offsets = np.zeros((kinds.shape[0], n_blocks + 1), np.int64)
    arguments = (kinds, grad, weight, row_sq, col_sq, excluded, thresholds, largest, skip_zero, block_rows, offsets)
    _beyond(*arguments, np.empty(0, np.int64), np.empty(0, np.float32), False)  # count, then write at the running sums
    starts = np.zeros(kinds.shape[0] + 1, np.int64)
    for i in range(kinds.shape[0]):
        offsets[i, 0] = starts[i]
        for block in range(n_blocks):
            offsets[i, block + 1] += offsets[i, block]
        starts[i + 1] = offsets[i, n_blocks]
    index, score = np.empty(starts[-1], np.int64), np.empty(starts[-1], np.float32)
    _beyond(*arguments, index, score, True)
    return index, score, starts


@numba.njit(cache=True, nogil=True)
def _sampled_threshold(sample, rank, largest):  # pragma: no cover - compiled by Numba
    """The sample's ``rank``-th best score (NaN ranks above every number, as in torch.topk), or ∓inf
    (every entry passes) when the sample holds no more than ``rank`` scores."""
    if rank >= sample.shape[0]:
        return np.float32(-np.inf if largest else np.inf)
    keys = _order_keys(sample, largest)  # ascending: best first
    return sample[np.argmax(keys == _radix_select(keys, rank - 1))]


@numba.njit(cache=True, nogil=True)
def _extreme(kind, grad, weight, row_sq, col_sq, excluded, skip_zero, count, largest, stride, rank,
             block_rows):  # pragma: no cover - compiled by Numba
    """The ``count`` best finite eligible entries (see :meth:`ScoredLayer.extreme`), and the thresholds tried."""
    kinds, best_high, skips = np.array([kind]), np.array([largest]), np.array([skip_zero])
    sample = np.empty((1, -(-grad.size // stride)), np.float32)
    m = _sample(kinds, grad, weight, row_sq, col_sq, excluded, skips, stride, sample)[0]
    thresholds = np.array([_sampled_threshold(sample[0, :m], rank, largest)])
    first = thresholds[0]
    index, score, _ = _collect(kinds, grad, weight, row_sq, col_sq, excluded, thresholds, best_high, skips, block_rows)
    everything = np.float32(-np.inf if largest else np.inf)
    if index.shape[0] < count and thresholds[0] != everything:
        thresholds[0] = everything
        index, score, _ = _collect(kinds, grad, weight, row_sq, col_sq, excluded, thresholds, best_high, skips,
                                   block_rows)
    return _best_finite(index, score, count, largest), first, thresholds[0]


@numba.njit(cache=True, nogil=True)
def _without(index, score, taken):  # pragma: no cover - compiled by Numba
    """The entries of ``index`` (ascending) and their scores whose position is not in ``taken`` (ascending)."""
    kept_index, kept_score = np.empty_like(index), np.empty_like(score)
    m, j = 0, 0
    for i in range(index.shape[0]):
        while j < taken.shape[0] and taken[j] < index[i]:
            j += 1
        if j < taken.shape[0] and taken[j] == index[i]:
            continue
        kept_index[m], kept_score[m] = index[i], score[i]
        m += 1
    return kept_index[:m], kept_score[:m]


@numba.njit(cache=True, nogil=True)
def _candidates(growth_kind, removal_kind, grad, weight, row_sq, col_sq, excluded, n_grow, stride, rank,
                block_rows):  # pragma: no cover - compiled by Numba
    """A layer-scope window's growth and removal candidates (see :func:`choose_candidates`) from one
    sample and one collecting pass of both criteria; and the thresholds tried, growth's first and
    last, then removal's."""
    kinds = np.array([growth_kind, removal_kind])
    largest, skips = np.array([True, False]), np.array([False, True])  # removal: among nonzero weights only
    sample = np.empty((2, -(-grad.size // stride)), np.float32)
    m = _sample(kinds, grad, weight, row_sq, col_sq, excluded, skips, stride, sample)
    thresholds = np.array([_sampled_threshold(sample[0, :m[0]], rank, True),
                           _sampled_threshold(sample[1, :m[1]], rank, False)])
    tried = np.empty(4, np.float32)
    tried[0], tried[2] = thresholds[0], thresholds[1]
    index, score, starts = _collect(kinds, grad, weight, row_sq, col_sq, excluded, thresholds, largest, skips,
                                    block_rows)
    grow_index, grow_score = index[starts[0] : starts[1]], score[starts[0] : starts[1]]
    if grow_index.shape[0] < n_grow and thresholds[0] != -np.inf:
        thresholds[0] = -np.inf
        grow_index, grow_score, _ = _collect(kinds[:1], grad, weight, row_sq, col_sq, excluded, thresholds[:1],
                                             largest[:1], skips[:1], block_rows)
    grow = _best_finite(grow_index, grow_score, n_grow, True)
    flat_weight = weight.reshape(-1)
    revivals = 0
    for p in grow:
        revivals += flat_weight[p] == 0
    remove = np.empty(0, np.int64)
    if revivals > 0:  # paid for by the lowest removal scores outside the deltas and the growth candidates
        remove_index, remove_score = _without(index[starts[1] :], score[starts[1] :], grow)
        if remove_index.shape[0] < revivals and thresholds[1] != np.inf:
            thresholds[1] = np.inf
            every_index, every_score, _ = _collect(kinds[1:], grad, weight, row_sq, col_sq, excluded, thresholds[1:],
                                                   largest[1:], skips[1:], block_rows)
            remove_index, remove_score = _without(every_index, every_score, grow)
        remove = _best_finite(remove_index, remove_score, revivals, False)
    tried[1], tried[3] = thresholds[0], thresholds[1]
    return grow, remove, tried


@numba.njit(cache=True, nogil=True)
def _best_finite(index, score, count, largest):  # pragma: no cover - compiled by Numba
    """The positions of the ``count`` best scores (of equal scores, the lower positions), finite ones only,
    in ``index``'s order; one pass that writes them out (masks and boolean indexing took 3x as long)."""
    n = index.shape[0]
    cut = n > count
    bound, ties = np.uint32(0), 0
    keys = np.empty(0, np.uint32)
    if cut:
        keys = _order_keys(score, largest)  # ascending: best first
        bound = _radix_select(keys, count - 1)
        ties = count
        for key in keys:
            ties -= key < bound  # what is left of count for the scores equal to bound
    out = np.empty(min(n, count), np.int64)
    m = 0
    for i in range(n):
        if cut:
            if keys[i] > bound:
                continue
            if keys[i] == bound:
                if ties == 0:
                    continue
                ties -= 1
        if np.isfinite(score[i]):
            out[m] = index[i]
            m += 1
    return out[:m]


class ScoredLayer:
    """One layer's entries under one criterion, ready for the compiled passes.

    grad [out, in] fp32 and weight [out, in] on the CPU; row_sq [out] and col_sq [in] fp32, the
    curvature factors (read by "taylor" only). ``criterion`` names a key of :data:`SCORE_KINDS`:
    "gradient" scores |g|, the removal criteria score (w, g, row_sq[r]·col_sq[c]). Eligible: where
    ``excluded`` (bool [out, in]) is False and, with ``skip_zero``, the weight is nonzero.
    """

    def __init__(self, criterion: str, grad: torch.Tensor, weight: torch.Tensor, row_sq: torch.Tensor,
                 col_sq: torch.Tensor, excluded: torch.Tensor, skip_zero: bool) -> None:
        self.kind = SCORE_KINDS[criterion]
        self.shape = grad.shape
        self.arrays = tuple(
            as_array(t.float().contiguous()) for t in (grad, weight, row_sq, col_sq)
        ) + (as_array(excluded.contiguous().view(torch.uint8)),)
        self.skip_zero = skip_zero

    def extreme(self, count: int, largest: bool, stride: int, rank: int) -> tuple[torch.Tensor, tuple[float, float]]:
        """Flat positions (int64, ascending) of the ``count`` largest (or smallest) finite eligible scores.

        Every ``stride``-th entry (flat order) is sampled and its ``rank``-th best score is the
        threshold; the entries beyond it are collected and the exact top ``count`` taken among them
        (of equal scores, the lower positions). When fewer than ``count`` pass, every eligible
        entry is collected instead. One compiled call; also returns the first and the last
        threshold (±inf: every entry).
        """
        with numba_threads() as threads:
            index, first, last = _extreme(self.kind, *self.arrays, self.skip_zero, count, largest, stride, rank,
                                          self.block_rows(threads))
        return torch.from_numpy(index), (float(first), float(last))

    def beyond(self, threshold: float, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The eligible entries whose score is at or beyond ``threshold`` (≥ where ``largest``, else ≤;
        a NaN score never is): (flat positions int64 ascending, fp32 scores)."""
        with numba_threads() as threads:
            index, score, _ = _collect(np.array([self.kind]), *self.arrays, np.array([threshold], np.float32),
                                       np.array([largest]), np.array([self.skip_zero]), self.block_rows(threads))
        return torch.from_numpy(index), torch.from_numpy(score)

    def block_rows(self, threads: int) -> int:
        """Rows per block of the parallel passes: ``BLOCKS_PER_THREAD`` blocks for each thread."""
        return -(-self.shape[0] // max(1, min(self.shape[0], threads * BLOCKS_PER_THREAD)))


def choose_candidates(growth: str, removal: str, grad: torch.Tensor, weight: torch.Tensor, row_sq: torch.Tensor,
                      col_sq: torch.Tensor, excluded: torch.Tensor, n_grow: int, stride: int,
                      rank: int) -> tuple[torch.Tensor, torch.Tensor, tuple[float, ...]]:
    """A layer-scope window's candidates where growth may revive pruned weights, in one compiled call.

    Growth: the ``n_grow`` largest finite ``growth`` scores outside ``excluded`` (the deltas).
    Removal: as many of the smallest finite ``removal`` scores among the other nonzero weights, the
    growth candidates excluded, as growth candidates revive a zero weight. Each criterion's
    threshold is the ``rank``-th best of every ``stride``-th entry, ``rank`` sized for ``n_grow``
    (which also bounds the revivals); both are collected in one pass over the layer, and a
    criterion whose threshold lets too few through is collected again with every eligible entry.
    Chooses as :meth:`ScoredLayer.extreme` twice, growth then removal, would, without the torch work
    between the two (marking the growth candidates excluded, finding the revivals), which is faster
    (benchmarks/results/engine_constants.md). Returns flat positions (int64,
    ascending) and the thresholds tried (growth's first and last, removal's first and last; ∓inf:
    every entry).
    """
    layer = ScoredLayer(growth, grad, weight, row_sq, col_sq, excluded, False)
    with numba_threads() as threads:
        grow, remove, tried = _candidates(layer.kind, SCORE_KINDS[removal], *layer.arrays, n_grow, stride, rank,
                                          layer.block_rows(threads))
    return torch.from_numpy(grow), torch.from_numpy(remove), tuple(float(t) for t in tried)


@numba.njit(parallel=True, cache=True, nogil=True)
def _support_per_row(bits, magnitude_mask, delta_index, counts):  # pragma: no cover - compiled by Numba
    """counts[r] = the support of row r; returns how many delta positions hold zero."""
    for r in numba.prange(bits.shape[0]):
        n = 0
        for c in range(bits.shape[1]):
            n += (bits[r, c] & magnitude_mask) != 0
        counts[r] = n
    flat, zero_deltas = bits.reshape(-1), 0
    for p in delta_index:
        if flat[p] & magnitude_mask == 0:  # rare: the division stays off the common path
            counts[p // bits.shape[1]] += 1
            zero_deltas += 1
    return zero_deltas


def support_per_row(weight: torch.Tensor, delta_index: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The support (nonzero weights ∪ ``delta_index``) of each row of a float [out, in] CPU tensor, int64
    [out], and how many of the delta positions hold zero.

    Counted on the bits: an entry is zero when all but its sign bit are (so -0.0 is zero; a NaN
    counts, as it does for ``weight != 0``). Works for every float dtype of 16 or 32 bits.
    """
    width = weight.element_size() * 8
    if width not in (16, 32):
        raise ValueError(f"support_per_row takes 16- or 32-bit floats, not {weight.dtype}.")
    bits = weight.detach().contiguous().view(torch.int16 if width == 16 else torch.int32)
    counts = np.zeros(weight.shape[0], np.int64)
    with numba_threads():
        zero_deltas = _support_per_row(as_array(bits), (1 << (width - 1)) - 1, as_array(delta_index), counts)
    return torch.from_numpy(counts), int(zero_deltas)


@numba.njit(cache=True, nogil=True)
def _radix_argsort(keys):  # pragma: no cover - compiled by Numba
    """Stable ascending order of uint32 ``keys``: four passes over 8-bit digits, least significant first."""
    n = keys.shape[0]
    order, spare = np.arange(n), np.empty(n, np.int64)
    key, spare_key = keys.copy(), np.empty(n, np.uint32)
    for shift in range(0, 32, 8):
        starts = np.zeros(257, np.int64)
        for i in range(n):
            starts[((key[i] >> shift) & 255) + 1] += 1
        for digit in range(256):
            starts[digit + 1] += starts[digit]
        for i in range(n):
            digit = (key[i] >> shift) & 255
            spare[starts[digit]], spare_key[starts[digit]] = order[i], key[i]
            starts[digit] += 1
        order, spare, key, spare_key = spare, order, spare_key, key
    return order


@numba.njit(cache=True, nogil=True)
def _radix_select(keys, k):  # pragma: no cover - compiled by Numba
    """The ``k``-th smallest (from 0) of uint32 ``keys``: one histogram pass per 8-bit digit, most significant first."""
    prefix, mask = np.uint32(0), np.uint32(0)
    for shift in range(24, -8, -8):
        counts = np.zeros(256, np.int64)
        for key in keys:
            if key & mask == prefix:
                counts[(key >> shift) & 255] += 1
        digit = 0
        while k >= counts[digit]:
            k -= counts[digit]
            digit += 1
        prefix |= np.uint32(digit) << np.uint32(shift)
        mask |= np.uint32(255) << np.uint32(shift)
    return prefix


@numba.njit(cache=True, nogil=True)
def _order_keys(values, descending):  # pragma: no cover - compiled by Numba
    """uint32 keys that order fp32 ``values`` as torch's sort does: -0.0 equals 0.0, every NaN is the largest.
    Descending keys are the complements, so equal keys still keep their index order."""
    sign, full = np.uint32(1 << 31), np.uint32(0xFFFFFFFF)
    bits = values.view(np.uint32)
    keys = np.empty(values.shape[0], np.uint32)
    for i in range(values.shape[0]):
        b = bits[i]
        if values[i] != values[i]:
            key = full
        elif b == sign:  # -0.0
            key = sign
        elif b & sign:  # negatives flipped, below every positive
            key = full ^ b
        else:
            key = b | sign
        keys[i] = full ^ key if descending else key
    return keys


def stable_argsort(values: torch.Tensor, descending: bool = False) -> torch.Tensor:
    """``torch.sort(values, descending=descending, stable=True).indices`` of a CPU fp32 vector, by radix."""
    return torch.from_numpy(_radix_argsort(_order_keys(as_array(values.contiguous()), descending)))


@numba.njit(cache=True, nogil=True)
def _plan_single_group(grow_score, grow_gain, grow_revives, free_slack, remove_score, remove_cost, n_swaps,
                       swap_test, column, column_room, delta_magnitude, drop_forgone):  # pragma: no cover
    """:func:`seft_trl.topology.plan_swap` for candidates that all share one scope group, in one pass each.

    Returns (drop slots, growth candidates, removal candidates paying for them or -1), aligned and
    ordered by slot, and the number of pairs the swap test refused.
    """
    order = _radix_argsort(_order_keys(grow_score, True))
    by_removal_rank = _radix_argsort(_order_keys(remove_score, False))
    # Payments in priority order: the first ``free_slack`` revivals fill unused budget, the next take
    # removal candidates from the lowest score up, and once those run out no revival is feasible.
    candidate = np.empty(order.shape[0], np.int64)
    payment = np.empty(order.shape[0], np.int64)
    n, revivals, removals = 0, 0, 0
    for c in order:
        pay = -1
        if grow_revives[c]:
            revivals += 1
            if revivals > free_slack:
                if removals == by_removal_rank.shape[0]:
                    continue
                pay = by_removal_rank[removals]
                removals += 1
        candidate[n], payment[n] = c, pay
        n += 1
    candidate, payment = candidate[:n], payment[:n]
    benefit = np.empty(n, np.float32)
    if swap_test:  # ranked by net benefit: the gain less the cost of the weight removed to pay
        for j in range(n):
            cost = remove_cost[payment[j]] if payment[j] >= 0 else np.float32(0.0)
            benefit[j] = grow_gain[candidate[j]] - cost
        ranked = _radix_argsort(_order_keys(benefit, True))
    else:  # already in growth-score order
        ranked = np.arange(n)
    if column.shape[0] > 0:  # a column takes candidates, in ranked order, up to its room
        seen = np.zeros(column.max() + 1, np.int64)
        kept = 0
        for j in ranked:
            col = column[candidate[j]]
            if seen[col] < column_room[candidate[j]]:
                ranked[kept] = j
                kept += 1
            seen[col] += 1
        ranked = ranked[:kept]
    ranked = ranked[:n_swaps]
    drop = _radix_argsort(_order_keys(delta_magnitude, False))[: ranked.shape[0]]  # the smallest |δ|, ties by slot
    accepted = np.empty(ranked.shape[0], np.int64)
    n_accepted = 0
    for p in range(ranked.shape[0]):
        if not swap_test or benefit[ranked[p]] > drop_forgone[drop[p]]:
            accepted[n_accepted] = p
            n_accepted += 1
    accepted = accepted[:n_accepted]
    by_slot = accepted[_radix_argsort(drop[accepted].astype(np.uint32))]  # slots are distinct and < 2³²
    chosen = ranked[by_slot]
    return drop[by_slot], candidate[chosen], payment[chosen], ranked.shape[0] - n_accepted


def plan_single_group(grow_score: torch.Tensor, grow_gain: torch.Tensor, grow_revives: torch.Tensor, free_slack: int,
                      remove_score: torch.Tensor, remove_cost: torch.Tensor, n_swaps: int, swap_test: bool,
                      grow_column: torch.Tensor | None, grow_column_room: torch.Tensor | None,
                      delta_magnitude: torch.Tensor, drop_forgone: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The planner's decisions for one scope group, compiled (see :func:`seft_trl.topology.plan_swap`).

    fp32 vectors per growth candidate [cg], removal candidate [cr] and delta slot [k]; ``free_slack``:
    how many revivals unused budget pays for; ``swap_test``: keep only pairs whose benefit exceeds
    the dropped delta's forgone gain (the "taylor" test). Returns int64 (drop slots, growth
    candidates, their removal candidates or -1) ordered by slot, and the pairs the test refused.
    """
    empty = np.empty(0, np.int64)
    column = empty if grow_column is None else as_array(grow_column.long().contiguous())
    room = empty if grow_column_room is None else as_array(grow_column_room.long().contiguous())
    vectors = [as_array(t.contiguous()) for t in (grow_score, grow_gain, grow_revives, remove_score, remove_cost,
                                                  delta_magnitude, drop_forgone)]
    slots, candidates, payments, refused = _plan_single_group(
        *vectors[:3], free_slack, *vectors[3:5], n_swaps, swap_test, column, room, *vectors[5:]
    )
    return torch.from_numpy(slots), torch.from_numpy(candidates), torch.from_numpy(payments), int(refused)
