"""Optimizer-state surgery: reset the state of delta slots whose position changed.

A slot that moves to a new weight position must not inherit the moments of the old one.
Its state is set to exactly zero and every other slot stays bit-identical:

* torch Adam / AdamW (any implementation: for-loop, foreach, fused): ``exp_avg``,
  ``exp_avg_sq`` and ``max_exp_avg_sq``; SGD: ``momentum_buffer``;
* bitsandbytes optimizers with 32-bit state: ``state1`` / ``state2`` set to 0;
* bitsandbytes 8-bit optimizers: ``state1`` / ``state2`` are uint8 codes into the quantization
  maps ``qmap1`` / ``qmap2``, scaled per block by ``absmax``. Writing the code whose map value
  is 0 gives exactly 0 without touching the block scale, so the neighbours in the block keep
  their values; dequantizing and requantizing the block would perturb them.
"""

from __future__ import annotations

import torch

_TORCH_STATE_KEYS = {
    torch.optim.Adam: ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    torch.optim.AdamW: ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    torch.optim.SGD: ("momentum_buffer",),
}


def _is_bitsandbytes(optimizer_cls: type) -> bool:
    return any(cls.__module__.startswith("bitsandbytes.optim") for cls in optimizer_cls.__mro__)


def _torch_state_keys(optimizer_cls: type) -> tuple[str, ...] | None:
    for cls, keys in _TORCH_STATE_KEYS.items():
        if issubclass(optimizer_cls, cls):
            return keys
    return None


def unwrap_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside wrappers such as accelerate's ``AcceleratedOptimizer``."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def check_optimizer_supported(optimizer) -> None:
    """Raise a clear error for an optimizer (instance or class) whose state cannot be reset exactly."""
    cls = optimizer if isinstance(optimizer, type) else type(unwrap_optimizer(optimizer))
    if _torch_state_keys(cls) is not None or _is_bitsandbytes(cls):
        return
    raise TypeError(
        f"SEFT cannot reset the state of optimizer {cls.__module__}.{cls.__qualname__} when delta positions "
        "change. Use torch.optim.AdamW/Adam/SGD or a bitsandbytes optimizer (for example "
        "bitsandbytes.optim.AdamW8bit; in a Trainer: optim='adamw_torch', 'adamw_8bit', 'paged_adamw_8bit', ...)."
    )


def _zero_code(qmap: torch.Tensor) -> int:
    zeros = torch.nonzero(qmap == 0)
    if zeros.numel() == 0:
        raise RuntimeError("bitsandbytes quantization map has no exact zero; cannot reset 8-bit state exactly.")
    return int(zeros[0])


@torch.no_grad()
def reset_optimizer_slots(optimizer, param: torch.nn.Parameter, slots: torch.Tensor) -> None:
    """Set the optimizer state of ``param[slots]`` to exactly zero; leave every other entry untouched."""
    inner = unwrap_optimizer(optimizer)
    check_optimizer_supported(inner)
    state = inner.state.get(param)
    if not state or slots.numel() == 0:
        return  # no state yet: nothing to reset
    if _is_bitsandbytes(type(inner)):
        for key, qmap_key in (("state1", "qmap1"), ("state2", "qmap2")):
            buffer = state.get(key)
            if buffer is None:
                continue
            value = _zero_code(state[qmap_key]) if buffer.dtype == torch.uint8 else 0
            buffer.view(-1)[slots.to(buffer.device)] = value
        return
    for key in _torch_state_keys(type(inner)):
        buffer = state.get(key)
        if buffer is not None:
            buffer.view(-1)[slots.to(buffer.device)] = 0
