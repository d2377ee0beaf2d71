"""Optimizer-state surgery for delta slots whose position changed: seed or reset, neighbours untouched.

A slot that moves to a new weight position must not inherit the moments of the old one. Zeroing
them is not enough for Adam: the bias correction is global (one step count per tensor), so a slot
zeroed at step t0 is corrected as if it had t0 steps of history and, fed a steady gradient, steps
2.5–6× too far for about a hundred steps once t0 is past a few hundred: its second moment is
corrected as if long established while holding only a few gradients. :func:`seed_optimizer_slots`
gives the slot the second moment it would hold after t steps of the window's mean-square gradient
at its new position, ``v = (1 − β2^t)·mean_sq``, so the step's scale fits from the first step, and
starts its first moment at zero, so its direction is earned: the step ramps up over ~10 steps
(half of an established slot's after 7) and never exceeds it. Seeding the first moment from the
window's mean as well was measured worse: growth selects positions for a large window gradient,
so that mean is inflated. Two steps after one update of Wanda-50% SmolLM2 (400k moved slots),
validation perplexity was 57.0 with both moments seeded, 51.3 with the first at zero, 50.9 with
both zeroed and 51.6 without evolution. What each optimizer gets:

============================================  ===========================================================
optimizer                                     moved slot
============================================  ===========================================================
torch Adam / AdamW (for-loop, foreach, fused)  seeded ``exp_avg_sq`` (and ``max_exp_avg_sq``), zero ``exp_avg``
bitsandbytes Adam/AdamW 32-bit and paged       seeded ``state2``, zero ``state1``
bitsandbytes Adam/AdamW 8-bit and paged        seeded: the nearest code in the block's existing scale
bitsandbytes AdEMAMix (32-bit, 8-bit, paged)   seeded ``state2``; both EMAs of ``state1`` (fast, slow) zero
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

from .sharding import local

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
    """Write the nearest codes in each block's existing scale.

    A paged optimizer's codes are managed memory that torch sees as a CPU tensor while its scales
    stay on the GPU: the codes are computed beside the scales and written through the host, after
    the GPU has finished with the buffer (bitsandbytes itself syncs after a paged step).
    """
    slots, values = slots.to(absmax.device), values.to(absmax.device, torch.float32)
    block_scale = absmax.view(-1)[slots // _BNB_BLOCK]
    new = _nearest_codes(qmap.to(absmax.device), _normalize(values, block_scale)).to(torch.uint8)
    if codes.device != absmax.device:
        if absmax.is_cuda:
            torch.cuda.synchronize(absmax.device)
        slots, new = slots.to(codes.device), new.to(codes.device)
    codes.view(-1)[slots] = new


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
    buffer = local(buffer)  # under FSDP2, state of this rank's chunk of the slots (slots are chunk offsets)
    if buffer.dtype == torch.uint8:  # bitsandbytes codes: computed beside their block scales
        _write_bnb_codes(buffer, qmap, absmax, slots, values)
        return
    device = buffer.codes.device if hasattr(buffer, "codes") else buffer.device
    slots, values = slots.to(device), values.to(device, torch.float32)
    if hasattr(buffer, "codes") and hasattr(buffer, "qmap"):
        _write_torchao_codes(buffer, slots, values)
    else:
        buffer.view(-1)[slots] = values.to(buffer.dtype)


def _is_adam(optimizer: torch.optim.Optimizer) -> bool:
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return True
    if _is_bitsandbytes(type(optimizer)):  # AdEMAMix corrects its second moment as Adam does
        return getattr(optimizer, "optimizer_name", None) in ("adam", "ademamix")
    return _is_torchao(type(optimizer)) and "Adam" in type(optimizer).__name__


def _step_and_beta2(optimizer: torch.optim.Optimizer, param: torch.nn.Parameter) -> tuple[float, float]:
    group = next(group for group in optimizer.param_groups if any(p is param for p in group["params"]))
    return float(optimizer.state[param]["step"]), float(group["betas"][1])


def _moment_buffers(optimizer: torch.optim.Optimizer, state: dict, param: torch.Tensor) -> list[tuple[str, torch.Tensor, dict]]:
    """(role, buffer, quantization kwargs) of every per-element state; role: first or second moment."""
    if _is_bitsandbytes(type(optimizer)):
        found = []
        for key, role, suffix in (("state1", "first", "1"), ("state2", "second", "2")):
            buffer, qmap, absmax = state.get(key), state.get("qmap" + suffix), state.get("absmax" + suffix)
            if buffer is None:
                continue
            if buffer.dim() == param.dim() + 1:  # AdEMAMix: its fast and slow EMAs are the rows of state1
                found.extend((role, buffer[row], {"qmap": qmap, "absmax": None if absmax is None else absmax[row]})
                             for row in range(buffer.shape[0]))
            else:
                found.append((role, buffer, {"qmap": qmap, "absmax": absmax}))
        return found
    roles = {"exp_avg": "first", "exp_avg_sq": "second", "max_exp_avg_sq": "second", "momentum_buffer": "first"}
    return [(roles[key], state[key], {}) for key in _MOMENT_KEYS if state.get(key) is not None]


@torch.no_grad()
def seed_optimizer_slots(optimizer, param: torch.nn.Parameter, slots: torch.Tensor, mean_sq: torch.Tensor) -> None:
    """Give ``param[slots]`` a second moment fitted to ``mean_sq`` and a zero first moment (module docstring).

    ``mean_sq`` [s] is the mean-square gradient at the new positions, in the optimizer's gradient
    scale. Optimizers without Adam's bias correction get zero state; no state yet: nothing to write.
    """
    inner = unwrap_optimizer(optimizer)
    if not _is_adam(inner):
        reset_optimizer_slots(inner, param, slots)
        return
    check_optimizer_supported(inner)
    state = inner.state.get(param)
    if not state or slots.numel() == 0:
        return
    step, beta2 = _step_and_beta2(inner, param)
    seeds = {"first": torch.zeros_like(mean_sq), "second": (1.0 - beta2**step) * mean_sq}
    for role, buffer, quantization in _moment_buffers(inner, state, param):
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
    for _, buffer, quantization in _moment_buffers(inner, state, param):
        _write(buffer, slots, zeros, **quantization)
