"""The memory projection counts what the code allocates: checked against real models and a real engine."""

from __future__ import annotations

import pytest
import torch

from seft_trl import SparsityEvolution, SparsityEvolutionConfig
from seft_trl.pruning import prune
from seft_trl.memory import (
    LLAMA2_7B, LLAMA2_70B, Method, ModelShape, Workload, per_device_bytes, training_memory, window_bytes,
)
from seft_trl.window import WindowStatistics
from seft_trl.testing import tiny_model

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def projection_linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    return [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(PROJECTIONS)]


def test_the_shape_of_a_model_is_its_configs():
    model = tiny_model("llama")
    shape = ModelShape.from_config(model.config)
    assert shape.projection_weights == sum(m.weight.numel() for m in projection_linears(model))
    assert shape.parameters == sum(p.numel() for p in model.parameters())


def test_llama2_7b_has_its_published_size():
    assert LLAMA2_7B.parameters == 6_738_415_616


@pytest.mark.parametrize("density", [0.02, 0.1])
def test_sparse_delta_state_is_what_the_engine_holds(density):
    model = tiny_model("llama")
    prune(model, method="magnitude", sparsity=0.5)
    shape = ModelShape.from_config(model.config)
    seft = SparsityEvolution(model, SparsityEvolutionConfig(density=density, target_modules=list(PROJECTIONS)))
    layers = list(seft.layers.values())
    deltas = sum(layer.delta.numel() for layer in layers)
    held = sum(layer.delta_index.nbytes + layer.delta_base.nbytes for layer in layers)
    estimate = training_memory(shape, Method("fixed_deltas", density=density), Workload(weight_bytes=4), "sgd")
    assert estimate.trainable == deltas
    assert estimate.method_state == held  # positions and base values, fp32 weights here
    assert estimate.trainable_state == sum(layer.delta.nbytes for layer in layers) * 2  # value + gradient


def test_a_lora_adapter_trains_rank_times_in_plus_out_per_projection():
    model = tiny_model("llama")
    shape = ModelShape.from_config(model.config)
    expected = sum(8 * (m.in_features + m.out_features) for m in projection_linears(model))
    assert training_memory(shape, Method("lora", rank=8)).trainable == expected


def test_masked_full_fine_tuning_pays_for_every_weight_and_eight_bit_state_is_a_quarter():
    full = training_memory(LLAMA2_7B, Method("masked_full", sparsity=0.5), optimizer="adamw")
    eight = training_memory(LLAMA2_7B, Method("masked_full", sparsity=0.5), optimizer="adamw_8bit")
    weights = LLAMA2_7B.projection_weights
    assert full.trainable == round(0.5 * weights)
    assert full.trainable_state == weights * (2 + 8) and eight.trainable_state == weights * (2 + 2)
    assert full.method_state == weights  # the bool mask


def test_sparse_deltas_grow_with_density_and_seft_adds_its_windows():
    work = Workload()
    small, large = (training_memory(LLAMA2_7B, Method("seft", density=d), work, "adamw_8bit") for d in (0.01, 0.1))
    fixed = training_memory(LLAMA2_7B, Method("fixed_deltas", density=0.01), work, "adamw_8bit")
    state = lambda e: e.trainable_state + e.method_state  # noqa: E731
    assert state(large) == pytest.approx(10 * state(small), rel=1e-3)
    assert small.total - fixed.total == pytest.approx(small.transient + small.window) and small.transient > 0
    assert small.weights == fixed.weights and small.activations == fixed.activations
    # 2.6 entries a delta at the first update with a sum and a step's sum each, 1.8 with a sum of squares,
    # 1.6 candidate positions: more than the deltas' own 16 bytes with 8-bit AdamW.
    assert small.window == pytest.approx(small.trainable * (2.6 * 8 + 1.8 * 4 + 1.6 * 4), rel=0.01)  # + row, column factors
    assert training_memory(LLAMA2_7B, Method("seft", density=0.01, drop_fraction=0.0), work).window == 0


def test_seft_window_defaults_are_the_engines():
    config, method = SparsityEvolutionConfig(), Method("seft", density=0.01)
    assert (method.drop_fraction, method.candidate_factor, method.window_groups) == (
        config.drop_fraction, config.candidate_factor, config.window_groups)
    turns = training_memory(LLAMA2_7B, Method("seft", density=0.01, window_groups=4))
    assert turns.window == pytest.approx(training_memory(LLAMA2_7B, method).window / 4)
    # Without revival the window tracks no removal candidate: 1.6 fewer entries a delta of 4 + 4 + 4 bytes.
    kept = training_memory(LLAMA2_7B, Method("seft", density=0.01, regrow_pruned=False))
    one = training_memory(LLAMA2_7B, method)
    assert one.window - kept.window == pytest.approx(one.trainable * 0.8 * 12, rel=0.01)


@pytest.mark.parametrize("grad_accumulation", [1, 2])
def test_window_bytes_are_what_every_open_window_holds(grad_accumulation):
    """Between steps and inside a step's backward, the live windows of a real engine are what
    ``window_bytes`` counts from their sizes, and never more than the projection's first-update bound."""
    model = tiny_model("llama")
    prune(model, method="magnitude", sparsity=0.5)
    config = SparsityEvolutionConfig(density=0.1, target_modules=list(PROJECTIONS), update_interval=4, accumulation_steps=3)
    seft = SparsityEvolution(model, config)
    optimizer = torch.optim.AdamW(seft.parameters(), lr=1e-3)
    seft.attach(optimizer, total_steps=100)
    layers = list(seft.layers.values())

    def live(in_step: bool) -> tuple[int, int]:
        held = counted = 0
        for layer in layers:
            window = layer._window
            tensors = [getattr(window, name) for name in WindowStatistics.TENSORS]
            tensors += [window.candidates.grow_index, window.candidates.remove_index]
            tensors += [window.step_sum] if in_step else []
            held += sum(t.nbytes for t in tensors)
            counted += window_bytes(layer.delta.numel(), window.candidates.grow_index.numel(),
                                    window.candidates.remove_index.numel(), layer.out_features, layer.in_features, in_step)
        return held, counted

    torch.manual_seed(0)
    peak = 0
    for step in range(3):  # the window opens at the second step and stays open through the third
        for _ in range(grad_accumulation):
            ids = torch.randint(0, model.config.vocab_size, (2, 16))
            model(input_ids=ids, labels=ids).loss.backward()
        if step >= 1:
            held, counted = live(in_step=True)
            assert held == counted
            peak = max(peak, held)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    held, counted = live(in_step=False)
    assert held == counted and all(layer._window.step_sum is None for layer in layers)
    shape = ModelShape.from_config(model.config)
    projected = training_memory(shape, Method("seft", density=0.1), Workload(weight_bytes=4), "sgd")
    assert counted < peak <= projected.window


def test_under_fsdp2_buffers_and_windows_stay_whole_on_every_rank():
    one = training_memory(LLAMA2_70B, Method("seft", density=0.01), Workload(), "adamw_8bit")
    eight = per_device_bytes(one, 8)
    whole = one.method_state + one.window + one.activations + one.logits + one.transient
    assert eight == pytest.approx((one.weights + one.trainable_state) / 8 + whole)


def test_checkpointing_keeps_one_layer_of_activations():
    with_ckpt = training_memory(LLAMA2_7B, Method("lora", rank=8), Workload(gradient_checkpointing=True))
    without = training_memory(LLAMA2_7B, Method("lora", rank=8), Workload(gradient_checkpointing=False))
    assert without.activations > 5 * with_ckpt.activations


@pytest.mark.parametrize(
    "method, optimizer, message",
    [
        (dict(kind="dora"), "adamw", "unknown method kind"),
        (dict(kind="seft", density=0.0), "adamw", "needs a density"),
        (dict(kind="lora", rank=0), "adamw", "needs a rank"),
        (dict(kind="lora", rank=8), "lion", "unknown optimizer"),
    ],
)
def test_bad_input_is_refused_with_what_is_allowed(method, optimizer, message):
    with pytest.raises(ValueError, match=message):
        training_memory(LLAMA2_7B, Method(**method), optimizer=optimizer)
