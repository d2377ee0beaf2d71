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
* torchao low-bit AdamW (``AdamW8bit``, ``AdamW4bit``): the moments are tensor subclasses with
  ``codes`` (one per byte, or two per byte in 4-bit: even elements in the high nibble), a per-block
  ``scale`` and a ``qmap``; the same code write applies. One exception: torchao's unsigned 4-bit
  map (``exp_avg_sq`` of ``AdamW4bit``) has no zero, so there the smallest value it can hold is
  written — the closest an exact reset can get without touching the neighbours.
"""

from __future__ import annotations

import torch

_TORCH_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)
_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")  # torch and torchao


def _is_bitsandbytes(optimizer_cls: type) -> bool:
    return any(cls.__module__.startswith("bitsandbytes.optim") for cls in optimizer_cls.__mro__)


def _is_torchao(optimizer_cls: type) -> bool:
    return any(cls.__module__.startswith("torchao.optim") for cls in optimizer_cls.__mro__)


def unwrap_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside wrappers such as accelerate's ``AcceleratedOptimizer``."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def check_optimizer_supported(optimizer) -> None:
    """Raise a clear error for an optimizer (instance or class) whose state cannot be reset exactly."""
    cls = optimizer if isinstance(optimizer, type) else type(unwrap_optimizer(optimizer))
    if issubclass(cls, _TORCH_OPTIMIZERS) or _is_bitsandbytes(cls) or _is_torchao(cls):
        return
    raise TypeError(
        f"SEFT cannot reset the state of optimizer {cls.__module__}.{cls.__qualname__} when delta positions "
        "change. Use torch.optim.AdamW/Adam/SGD, a bitsandbytes optimizer (for example "
        "bitsandbytes.optim.AdamW8bit) or torchao's AdamW8bit/AdamW4bit; in a Trainer: optim='adamw_torch', "
        "'adamw_8bit', 'paged_adamw_8bit', 'adamw_torch_8bit', 'adamw_torch_4bit', ..."
    )


def _zero_code(qmap: torch.Tensor, exact: bool = True) -> int:
    """Index of the map value 0 (or, when ``exact`` is False and there is none, of the smallest)."""
    zeros = torch.nonzero(qmap == 0)
    if zeros.numel() > 0:
        return int(zeros[0])
    if exact:
        raise RuntimeError("The quantization map has no exact zero; cannot reset 8-bit state exactly.")
    return int(qmap.abs().argmin())


def _reset_torchao_state(state: torch.Tensor, slots: torch.Tensor) -> None:
    """Write the zero code at ``slots`` of a torchao OptimState8bit / OptimState4bit."""
    codes, slots = state.codes.view(-1), slots.to(state.codes.device)
    if codes.numel() == state.numel():  # 8-bit: one code per byte
        codes[slots] = _zero_code(state.qmap)
        return
    code = _zero_code(state.qmap, exact=False)  # 4-bit: two codes per byte, even element high
    high, low = slots[slots % 2 == 0] // 2, slots[slots % 2 == 1] // 2
    codes[high] = (codes[high] & 0x0F) | (code << 4)
    codes[low] = (codes[low] & 0xF0) | code


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
    for key in _MOMENT_KEYS:
        buffer = state.get(key)
        if buffer is None:
            continue
        if hasattr(buffer, "codes") and hasattr(buffer, "qmap"):
            _reset_torchao_state(buffer, slots)
        else:
            buffer.view(-1)[slots.to(buffer.device)] = 0
