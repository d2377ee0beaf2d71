"""Optimizer-state reset: moved slots get exactly zero state, every other slot stays bit-identical."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from conftest import DEVICE, prune_linears, random_batch, tiny_model
from seft_trl import SparsityEvolution, SparsityEvolutionConfig, reset_optimizer_slots
from seft_trl.optim_state import seed_optimizer_slots

SLOTS = torch.tensor([0, 3, 257, 511, 999])  # across several 256-wide quantization blocks


def stepped(optimizer_cls, steps=3, **kwargs):
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(1000))
    optimizer = optimizer_cls([param], lr=1e-2, **kwargs)
    for _ in range(steps):
        param.grad = torch.randn(1000)
        optimizer.step()
    return param, optimizer


def state_tensors(optimizer, param):
    return {k: v.clone() for k, v in optimizer.state[param].items() if torch.is_tensor(v) and v.numel() > 1}


@pytest.mark.parametrize(
    "optimizer_cls,kwargs",
    [
        (torch.optim.AdamW, {}),
        (torch.optim.AdamW, {"foreach": False, "amsgrad": True}),
        (torch.optim.Adam, {"fused": True}),
        (torch.optim.SGD, {"momentum": 0.9}),
        (bnb.optim.AdamW8bit, {"min_8bit_size": 1}),
        (bnb.optim.AdamW, {}),  # 32-bit bitsandbytes state
        (bnb.optim.PagedAdamW8bit, {"min_8bit_size": 1}),
    ],
)
def test_reset_is_exact_and_leaves_other_slots_bit_identical(optimizer_cls, kwargs):
    param, optimizer = stepped(optimizer_cls, **kwargs)
    before = state_tensors(optimizer, param)
    reset_optimizer_slots(optimizer, param, SLOTS)
    after = state_tensors(optimizer, param)
    others = torch.ones(1000, dtype=torch.bool)
    others[SLOTS] = False
    moment_keys = [k for k in after if after[k].numel() == 1000]
    assert moment_keys, "no per-element state found"
    for key in after:
        if after[key].numel() != 1000:  # absmax per block, quantization maps: untouched
            assert torch.equal(after[key], before[key]), key
            continue
        assert torch.equal(after[key][others], before[key][others]), key
        if after[key].dtype == torch.uint8:  # 8-bit codes: the value they decode to must be exactly 0
            qmap = optimizer.state[param]["qmap1" if key == "state1" else "qmap2"]
            assert (qmap[after[key][SLOTS].long()] == 0).all(), key
        else:
            assert (after[key][SLOTS] == 0).all(), key
    if kwargs.get("min_8bit_size") == 1:
        assert after["state1"].dtype == torch.uint8  # really the 8-bit path


def decoded_bnb_state(state: dict, key: str) -> torch.Tensor:
    """A bitsandbytes state buffer as the floats it holds ([2, n] for AdEMAMix's state1)."""
    values = state[key]
    if values.dtype != torch.uint8:
        return values.clone()
    suffix = key[-1]
    scale = state["absmax" + suffix].repeat_interleave(256, dim=-1)[..., : values.shape[-1]]
    return state["qmap" + suffix][values.long()] * scale


def test_ademamix_moved_slots_get_both_emas_zero_and_a_seeded_second_moment():
    # 8-bit only: bitsandbytes 0.50.2's CPU kernel of 32-bit AdEMAMix fails on its own first step.
    param, optimizer = stepped(bnb.optim.AdEMAMix8bit, min_8bit_size=1)
    state = optimizer.state[param]
    before = {key: decoded_bnb_state(state, key) for key in ("state1", "state2")}
    seed_optimizer_slots(optimizer, param, SLOTS, torch.full((SLOTS.numel(),), 0.25))
    after = {key: decoded_bnb_state(state, key) for key in ("state1", "state2")}
    assert after["state1"].shape == (2, 1000)  # the fast and the slow EMA
    others = torch.ones(1000, dtype=torch.bool)
    others[SLOTS] = False
    for key in after:
        assert torch.equal(after[key][..., others], before[key][..., others]), key
    assert (after["state1"][:, SLOTS] == 0).all()
    assert (after["state2"][SLOTS] > 0).all()


@pytest.mark.parametrize("optimizer_cls", [bnb.optim.AdamW8bit, bnb.optim.PagedAdamW8bit])
def test_large_8bit_state_on_the_device_changes_only_the_moved_slots(optimizer_cls):
    # 2¹⁷ elements, 512 quantization blocks; on CUDA the paged optimizer's state is managed memory.
    n = 2**17
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(n, device=DEVICE))
    optimizer = optimizer_cls([param], lr=1e-2, min_8bit_size=1)
    for _ in range(3):
        param.grad = torch.randn(n, device=DEVICE)
        optimizer.step()
    state = optimizer.state[param]
    assert state["state1"].dtype == torch.uint8
    slots = torch.randperm(n, device=DEVICE)[:5000]
    others = torch.ones(n, dtype=torch.bool, device=DEVICE)
    others[slots] = False
    before = {key: decoded_bnb_state(state, key) for key in ("state1", "state2")}
    reset_optimizer_slots(optimizer, param, slots)
    reset = {key: decoded_bnb_state(state, key) for key in ("state1", "state2")}
    seed_optimizer_slots(optimizer, param, slots, torch.full((slots.numel(),), 0.25, device=DEVICE))
    seeded = {key: decoded_bnb_state(state, key) for key in ("state1", "state2")}
    for key in before:
        assert torch.equal(reset[key][others], before[key][others]) and torch.equal(seeded[key][others], before[key][others])
        assert (reset[key][slots] == 0).all()
    assert (seeded["state1"][slots] == 0).all() and (seeded["state2"][slots] > 0).all()


def test_unsupported_optimizer_is_named():
    param, optimizer = stepped(torch.optim.Adagrad)
    with pytest.raises(TypeError, match="torch.optim.adagrad.Adagrad"):
        reset_optimizer_slots(optimizer, param, SLOTS)


@pytest.mark.parametrize("seed_moments", [True, False])
@pytest.mark.parametrize("optimizer_name", ["adamw", "adamw8bit"])
def test_topology_update_writes_only_the_moved_slots(optimizer_name, seed_moments):
    model = prune_linears(tiny_model("llama"))
    config = SparsityEvolutionConfig(
        density=0.05, update_interval=3, accumulation_steps=2, drop_schedule="constant", seed_moments=seed_moments,
        swap_test="none",  # every ranked pair moves, so every layer has moved slots to check
    )
    seft = SparsityEvolution(model, config)
    if optimizer_name == "adamw":
        optimizer = torch.optim.AdamW(seft.parameters(), lr=1e-2)
    else:
        optimizer = bnb.optim.AdamW8bit(seft.parameters(), lr=1e-2, min_8bit_size=1)
    layers = list(seft.layers.values())
    snapshots = {}

    def remember(*_):  # registered first, so it runs after the optimizer step and before SEFT's update
        snapshots.clear()
        for layer in layers:
            snapshots[layer] = (layer.delta_index.clone(), state_tensors(optimizer, layer.delta))

    optimizer.register_step_post_hook(remember)
    seft.attach(optimizer, total_steps=10)
    for _ in range(3):
        ids = random_batch()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert seft.last_update and sum(s.grown for s in seft.last_update.values()) > 0
    for layer in layers:
        index_before, state_before = snapshots[layer]
        moved = layer.delta_index != index_before
        assert moved.any()
        state_after = state_tensors(optimizer, layer.delta)
        for key, value in state_after.items():
            if value.numel() != layer.delta.numel():
                assert torch.equal(value, state_before[key])
                continue
            assert torch.equal(value[~moved], state_before[key][~moved])
            if value.dtype == torch.uint8:
                qmap = optimizer.state[layer.delta]["qmap1" if key == "state1" else "qmap2"]
                value = qmap[value.long()]
            if seed_moments and key in ("exp_avg_sq", "state2"):  # seeded from a nonzero window gradient
                assert (value[moved] > 0).any()
            else:  # the first moment of a moved slot, and every moment without seeding, starts at zero
                assert (value[moved] == 0).all()
        assert (layer.delta[moved] == 0).all()


def steady_steps_after_a_move(optimizer_cls, seed: bool, move_at: int = 1000, **kwargs) -> torch.Tensor:
    """|Δθ| per step of a slot moved at ``move_at`` over those of an established slot, both fed one steady gradient.

    Slots 0..511 are established and always see gradient g; slot 512..1023 see another gradient
    before the move (their old position) and g after it, whose window mean square is g². Returns
    the ratio moved/established for 40 steps after the move [40].
    """
    param = torch.nn.Parameter(torch.zeros(1024))
    optimizer = optimizer_cls([param], lr=1e-3, weight_decay=0.0, **kwargs)
    g = torch.full((1024,), 2e-3)
    before = g.clone()
    before[512:] = -7e-3
    for _ in range(move_at):
        param.grad = before.clone()
        optimizer.step()
    moved = torch.arange(512, 1024)
    if seed:
        seed_optimizer_slots(optimizer, param, moved, g[moved] ** 2)
    else:
        reset_optimizer_slots(optimizer, param, moved)
    ratios = []
    for _ in range(40):
        start = param.detach().clone()
        param.grad = g.clone()
        optimizer.step()
        step = (param.detach() - start).abs()
        ratios.append(step[512:].mean() / step[:512].mean())
    return torch.stack(ratios)


@pytest.mark.parametrize(
    "optimizer_cls,kwargs",
    [(torch.optim.AdamW, {}), (bnb.optim.AdamW8bit, {"min_8bit_size": 1}), (bnb.optim.AdamW, {})],
)
def test_a_seeded_slot_steps_like_an_established_one_after_a_late_move(optimizer_cls, kwargs):
    ratios = steady_steps_after_a_move(optimizer_cls, seed=True, **kwargs)
    assert ratios.max() <= 1.5, ratios
    assert ratios[:20].max() >= 0.5, ratios
    # Zeroed moments under the global bias correction: the oversized steps this fixes.
    assert steady_steps_after_a_move(optimizer_cls, seed=False, **kwargs).max() > 2.0


def test_optimizers_without_bias_correction_get_zero_state():
    param, optimizer = stepped(torch.optim.SGD, momentum=0.9)
    seed_optimizer_slots(optimizer, param, SLOTS, torch.ones(SLOTS.numel()))
    assert (optimizer.state[param]["momentum_buffer"][SLOTS] == 0).all()


TORCHAO_SLOTS = torch.tensor([0, 1, 2, 255, 256, 4097, 8191])


def torchao_stepped(bits: int, steps: int):
    """A torchao low-bit AdamW after ``steps`` steps, its state dequantized, and the untouched-slot mask."""
    from torchao.optim import AdamW4bit, AdamW8bit

    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(8192))  # torchao quantizes tensors of >= 4096 elements
    optimizer = (AdamW8bit if bits == 8 else AdamW4bit)([param], lr=1e-2)
    for _ in range(steps):
        param.grad = torch.randn(8192)
        optimizer.step()
    state = optimizer.state[param]
    assert state["exp_avg"].codes.numel() == 8192 * bits // 8  # really the low-bit path
    before = {key: state[key].dequantize().clone() for key in ("exp_avg", "exp_avg_sq")}
    others = torch.ones(8192, dtype=torch.bool)
    others[TORCHAO_SLOTS] = False
    return param, optimizer, before, others


@pytest.mark.parametrize("bits", [8, 4])
def test_torchao_low_bit_state_reset(bits):
    param, optimizer, before, others = torchao_stepped(bits, steps=2)
    state, slots = optimizer.state[param], TORCHAO_SLOTS
    reset_optimizer_slots(optimizer, param, slots)
    for key, old in before.items():
        new = state[key].dequantize()
        assert torch.equal(new[others], old[others]), key
        if bits == 8 or key == "exp_avg":
            assert (new[slots] == 0).all(), key
        else:  # the unsigned 4-bit map has no zero: the smallest value it can hold
            smallest = state[key].qmap.min() * state[key].scale.repeat_interleave(state[key].block_size)
            assert torch.equal(new[slots], smallest[slots])


@pytest.mark.parametrize("bits", [8, 4])
def test_torchao_low_bit_seed_writes_the_nearest_code_and_nothing_else(bits):
    param, optimizer, before, others = torchao_stepped(bits, steps=3)
    state, slots = optimizer.state[param], TORCHAO_SLOTS
    mean = before["exp_avg"][slots].flip(0)  # values the blocks can represent
    seed_optimizer_slots(optimizer, param, slots, mean * mean)
    step = float(state["step"])
    for key, target in (("exp_avg", torch.zeros_like(mean)), ("exp_avg_sq", (1 - 0.999**step) * mean * mean)):
        new = state[key].dequantize()
        assert torch.equal(new[others], before[key][others]), key
        block = state[key].scale.repeat_interleave(state[key].block_size)[slots]
        representable = state[key].qmap.view(1, -1) * block.view(-1, 1)  # [s, codes]
        nearest = representable.gather(1, (representable - target.view(-1, 1)).abs().argmin(1, keepdim=True))
        torch.testing.assert_close(new[slots], nearest.view(-1).clamp(min=-block, max=block))
