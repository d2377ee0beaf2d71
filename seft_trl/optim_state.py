"""Optimizer-state surgery for delta slots whose position changed: seed or reset, neighbours untouched.

A slot that moves to a new weight position must not inherit the moments of the old one. Zeroing
them is not enough for Adam: the bias correction is global (one step count per tensor), so a slot
zeroed at step t0 is corrected as if it had t0 steps of history and, fed a steady gradient, steps
2.5–6× too far for about a hundred steps once t0 is past a few hundred. :func:`seed_optimizer_slots`
instead writes the state the slot would have after t steps of gradients with the window's mean and
mean square at its new position, ``m = (1 − β1^t)·mean`` and ``v = (1 − β2^t)·mean_sq``, so its
bias-corrected moments are those statistics from its first step on. What each optimizer gets:

============================================  ===========================================================
optimizer                                     moved slot
============================================  ===========================================================
torch Adam / AdamW (for-loop, foreach, fused)  seeded ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq``)
bitsandbytes Adam/AdamW 32-bit and paged       seeded ``state1`` / ``state2``
bitsandbytes Adam/AdamW 8-bit and paged        seeded: the nearest code in the block's existing scale
torchao AdamW8bit / AdamW4bit / AdamWFp8      seeded: the nearest code in the block's existing scale
torch SGD, other bitsandbytes optimizers       zero state (no bias correction to fit)
============================================  ===========================================================

Quantized state (bitsandbytes 8-bit ``state1``/``state2`` codes into ``qmap1``/``qmap2`` scaled per
256-element block by ``absmax``; torchao's ``codes``/``scale``/``qmap`` subclasses) is written code
by code, never requantized, so every other slot of the block keeps its exact value; a seed beyond
the block's scale saturates at it. :func:`reset_optimizer_slots` writes zero the same way, exactly
where the map holds a zero (torchao's unsigned 4-bit map has none: there the smallest value).
"""

from __future__ import annotations

import torch

_TORCH_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)
_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")  # torch and torchao
_BNB_BLOCK = 256  # elements per absmax entry of bitsandbytes' blockwise 8-bit state


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
    """Raise a clear error for an optimizer (instance or class) whose state cannot be written slot by slot."""
    cls = optimizer if isinstance(optimizer, type) else type(unwrap_optimizer(optimizer))
    if issubclass(cls, _TORCH_OPTIMIZERS) or _is_bitsandbytes(cls) or _is_torchao(cls):
        return
    raise TypeError(
        f"SEFT cannot reset the state of optimizer {cls.__module__}.{cls.__qualname__} when delta positions "
        "change. Use torch.optim.AdamW/Adam/SGD, a bitsandbytes optimizer (for example "
        "bitsandbytes.optim.AdamW8bit) or torchao's AdamW8bit/AdamW4bit; in a Trainer: optim='adamw_torch', "
        "'adamw_8bit', 'paged_adamw_8bit', 'adamw_torch_8bit', 'adamw_torch_4bit', ..."
    )


def _nearest_codes(qmap: torch.Tensor, normalized: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value of a sorted quantization map for each entry [s] -> int64 [s]."""
    upper = torch.searchsorted(qmap, normalized.contiguous()).clamp(1, qmap.numel() - 1)
    lower = upper - 1
    take_upper = (qmap[upper] - normalized).abs() < (normalized - qmap[lower]).abs()
    return torch.where(take_upper, upper, lower)


def _normalize(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """values / their block's scale; a block of scale 0 holds only zeros, whatever code is written."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.where(scale > 0, values / safe, torch.zeros_like(values)).clamp(-1.0, 1.0)


def _write_bnb_codes(codes: torch.Tensor, qmap: torch.Tensor, absmax: torch.Tensor, slots, values) -> None:
    block_scale = absmax.view(-1)[slots // _BNB_BLOCK]
    codes.view(-1)[slots] = _nearest_codes(qmap, _normalize(values, block_scale)).to(torch.uint8)


def _write_torchao_codes(state: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
    """Write at ``slots`` of a torchao OptimState8bit / OptimState4bit (two 4-bit codes per byte, even high)."""
    codes, scale = state.codes.view(-1), state.scale.view(-1)
    block_size = state.numel() // scale.numel()
    new = _nearest_codes(state.qmap, _normalize(values, scale[slots // block_size])).to(torch.uint8)
    if codes.numel() == state.numel():
        codes[slots] = new
        return
    even = slots % 2 == 0
    high, low = slots[even] // 2, slots[~even] // 2
    codes[high] = (codes[high] & 0x0F) | (new[even] << 4)
    codes[low] = (codes[low] & 0xF0) | new[~even]


def _write(buffer: torch.Tensor, slots: torch.Tensor, values: torch.Tensor, qmap=None, absmax=None) -> None:
    """Write float ``values`` [s] at ``slots`` of one state buffer, whatever its storage."""
    slots = slots.to(buffer.device if not hasattr(buffer, "codes") else buffer.codes.device)
    values = values.to(slots.device, torch.float32)
    if hasattr(buffer, "codes") and hasattr(buffer, "qmap"):
        _write_torchao_codes(buffer, slots, values)
    elif buffer.dtype == torch.uint8:
        _write_bnb_codes(buffer, qmap, absmax, slots, values)
    else:
        buffer.view(-1)[slots] = values.to(buffer.dtype)


def _is_adam(optimizer: torch.optim.Optimizer) -> bool:
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return True
    if _is_bitsandbytes(type(optimizer)):
        return getattr(optimizer, "optimizer_name", None) == "adam"
    return _is_torchao(type(optimizer)) and "Adam" in type(optimizer).__name__


def _step_and_betas(optimizer: torch.optim.Optimizer, param: torch.nn.Parameter) -> tuple[float, float, float]:
    group = next(group for group in optimizer.param_groups if any(p is param for p in group["params"]))
    beta1, beta2 = group["betas"][:2]
    return float(optimizer.state[param]["step"]), float(beta1), float(beta2)


def _moment_buffers(optimizer: torch.optim.Optimizer, state: dict) -> list[tuple[str, torch.Tensor, dict]]:
    """(role, buffer, quantization kwargs) of every per-element state; role: first, second or momentum."""
    if _is_bitsandbytes(type(optimizer)):
        found = []
        for key, role, suffix in (("state1", "first", "1"), ("state2", "second", "2")):
            if state.get(key) is not None:
                found.append((role, state[key], {"qmap": state.get("qmap" + suffix), "absmax": state.get("absmax" + suffix)}))
        return found
    roles = {"exp_avg": "first", "exp_avg_sq": "second", "max_exp_avg_sq": "second", "momentum_buffer": "first"}
    return [(roles[key], state[key], {}) for key in _MOMENT_KEYS if state.get(key) is not None]


@torch.no_grad()
def seed_optimizer_slots(
    optimizer, param: torch.nn.Parameter, slots: torch.Tensor, mean: torch.Tensor, mean_sq: torch.Tensor
) -> None:
    """Give ``param[slots]`` the Adam state of a slot that always saw gradients of ``mean`` / ``mean_sq``.

    ``mean`` and ``mean_sq`` [s] are in the optimizer's gradient scale. Optimizers without Adam's
    bias correction get zero state (see the module docstring); no state yet means nothing to write.
    """
    inner = unwrap_optimizer(optimizer)
    if not _is_adam(inner):
        reset_optimizer_slots(inner, param, slots)
        return
    check_optimizer_supported(inner)
    state = inner.state.get(param)
    if not state or slots.numel() == 0:
        return
    step, beta1, beta2 = _step_and_betas(inner, param)
    seeds = {"first": (1.0 - beta1**step) * mean, "second": (1.0 - beta2**step) * mean_sq}
    for role, buffer, quantization in _moment_buffers(inner, state):
        _write(buffer, slots, seeds[role], **quantization)


@torch.no_grad()
def reset_optimizer_slots(optimizer, param: torch.nn.Parameter, slots: torch.Tensor) -> None:
    """Set the optimizer state of ``param[slots]`` to zero; leave every other entry untouched."""
    inner = unwrap_optimizer(optimizer)
    check_optimizer_supported(inner)
    state = inner.state.get(param)
    if not state or slots.numel() == 0:
        return  # no state yet: nothing to reset
    zeros = torch.zeros(slots.numel())
    for _, buffer, quantization in _moment_buffers(inner, state):
        _write(buffer, slots, zeros, **quantization)
