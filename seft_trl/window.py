"""One layer's accumulation window: the candidates of its next topology update and the gradient
statistics gathered for them over the window's steps.

Plain data and the functions over it: a closed step folded into the window's totals, and the window
as checkpoint entries and back. The layer (:mod:`seft_trl.layer`) opens a window in a backward, adds
each micro-batch's sampled gradient into the step's sums, and decides its update on the totals.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels import SamplingPattern
from .topology import Candidates


@dataclass
class WindowStatistics:
    """Candidates of one accumulation window and the gradient statistics gathered over it.

    Gradient entries run over ``cat(delta slots [k], grow candidates [cg], remove candidates
    [cr])``. Within an optimizer step the micro-batches add into ``step_sum``, ``step_row_sq`` and
    ``step_col_sq``; closing the step sums them over ranks and adds them, and the step's square,
    into the window's totals, so the totals count whole steps: a skipped step leaves no trace.
    ``step_sum`` exists only from the step's first backward to its close: every layer holds a
    window at once, and a kept zeroed buffer would add a third to the window's memory.
    ``optimizer_dot`` and ``raw_sq`` relate this layer's gradient scale to the optimizer's (loss
    scaling, clipping, averaging over ranks): Σ_s ⟨δ.grad, raw δ gradient⟩ and Σ_s ‖raw‖².
    """

    candidates: Candidates
    step_row_sq: torch.Tensor  # fp32 [out]: Σ_t g[t, r]² of this step
    step_col_sq: torch.Tensor  # fp32 [in]: Σ_t x[t, c]² of this step
    grad_sum: torch.Tensor  # fp32 [k + cg + cr]: Σ over closed steps of the step's gradient
    grad_sq_sum: torch.Tensor  # fp32 [k + cg]: Σ over closed steps of its square (removal prices use the mean only)
    row_sq: torch.Tensor  # fp32 [out]
    col_sq: torch.Tensor  # fp32 [in]
    counters: torch.Tensor  # fp64 [3]: closed steps, optimizer_dot, raw_sq
    step_sum: torch.Tensor | None = None  # fp32 [k + cg + cr] of the open step; None between steps
    # Over cat(delta_index, grow_index, remove_index): one sampled product serves the δ gradient
    # and the statistics (delta positions do not change inside a window). Built on first use.
    pattern: SamplingPattern | None = None
    settled: bool = False  # copied out of the backward that opened the window (SparseDeltaLinear.close_step)

    TENSORS = ("step_row_sq", "step_col_sq", "grad_sum", "grad_sq_sum", "row_sq", "col_sq", "counters")

    @property
    def steps(self) -> int:
        return int(self.counters[0])

    @property
    def optimizer_scale(self) -> float:
        """Least-squares factor from this layer's raw gradient to the optimizer's (1 when unknown)."""
        dot, raw_sq = float(self.counters[1]), float(self.counters[2])
        return dot / raw_sq if raw_sq > 0 else 1.0


# An open window is part of the training state: a checkpoint taken inside one must resume with the
# same candidates and statistics. Its tensors change size from window to window, so they are saved
# as extra entries under these keys, not as buffers.
WINDOW_KEYS = ("window_grow_index", "window_remove_index", *("window_" + name for name in WindowStatistics.TENSORS))


@torch.no_grad()
def fold_step(window: WindowStatistics, step_sum: torch.Tensor, used_delta_grad: torch.Tensor | None) -> None:
    """Add one closed optimizer step into the window's totals.

    ``step_sum``: the step's gradient over cat(deltas, grow, remove) in the loss's units, summed over
    ranks; ``used_delta_grad``: the δ gradient the optimizer stepped with (None when it had none),
    whose agreement with the raw one gives the window's :attr:`~WindowStatistics.optimizer_scale`.
    """
    if used_delta_grad is not None:
        # fp64 copies: a reduction over a slice can depend on its memory alignment, which would
        # make a resumed run differ from an uninterrupted one in the last bits.
        raw, used = step_sum[: used_delta_grad.numel()].double(), used_delta_grad.double()
        window.counters[1] += (used * raw).sum()  # stays on the device: no sync per step
        window.counters[2] += (raw * raw).sum()
    window.grad_sum += step_sum
    squared = step_sum[: window.grad_sq_sum.numel()]
    window.grad_sq_sum.addcmul_(squared, squared)
    window.row_sq += window.step_row_sq
    window.col_sq += window.step_col_sq
    window.counters[0] += 1


def clear_step(window: WindowStatistics) -> None:
    """Forget the open step's sums (after folding them, or when the step was skipped)."""
    window.step_sum = None
    for tensor in (window.step_row_sq, window.step_col_sq):
        tensor.zero_()


def window_entries(window: WindowStatistics) -> dict[str, torch.Tensor]:
    """The window as checkpoint entries by :data:`WINDOW_KEYS` (copies)."""
    state = {"window_grow_index": window.candidates.grow_index, "window_remove_index": window.candidates.remove_index}
    state.update({"window_" + name: getattr(window, name) for name in WindowStatistics.TENSORS})
    return {key: value.clone() for key, value in state.items()}


def window_from_entries(state: dict[str, torch.Tensor], deltas: int, device: torch.device, index_dtype: torch.dtype,
                        where: str = "") -> WindowStatistics:
    """The window saved by :func:`window_entries`, on ``device`` with positions in ``index_dtype``.

    ``deltas``: the layer's delta count. Loaded outside any backward, the window is already settled;
    its sampling pattern is built at the next backward.
    """
    missing = [key for key in WINDOW_KEYS if key not in state]
    if missing:
        raise ValueError(
            f"{where}: the checkpoint's open topology window lacks {', '.join(missing)} (written by an older "
            "seft_trl). Resume from a checkpoint taken outside an accumulation window, or with that version."
        )
    candidates = Candidates(*(state[key].to(device, index_dtype) for key in ("window_grow_index", "window_remove_index")))
    # A loader may cast floating-point entries to the model's dtype: restore the window's own.
    tensors = {
        name: state["window_" + name].to(device, torch.float64 if name == "counters" else torch.float32)
        for name in WindowStatistics.TENSORS
    }
    # Earlier versions summed squares over the removal candidates too, which no decision reads.
    tensors["grad_sq_sum"] = tensors["grad_sq_sum"][: deltas + candidates.grow_index.numel()].clone()
    return WindowStatistics(candidates, **tensors, settled=True)
