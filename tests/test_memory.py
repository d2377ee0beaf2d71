"""The memory projection counts what the code allocates: checked against real models and a real engine."""

from __future__ import annotations

import pytest
import torch

from seft_trl import SparsityEvolution, SparsityEvolutionConfig
from seft_trl.pruning import prune
from seft_trl.memory import LLAMA2_7B, Method, ModelShape, Workload, training_memory
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


def test_sparse_deltas_grow_with_density_and_seft_adds_only_a_window_transient():
    work = Workload()
    small, large = (training_memory(LLAMA2_7B, Method("seft", density=d), work, "adamw_8bit") for d in (0.01, 0.1))
    fixed = training_memory(LLAMA2_7B, Method("fixed_deltas", density=0.01), work, "adamw_8bit")
    state = lambda e: e.trainable_state + e.method_state  # noqa: E731
    assert state(large) == pytest.approx(10 * state(small), rel=1e-3)
    assert small.total - fixed.total == pytest.approx(small.transient) and small.transient > 0
    assert small.weights == fixed.weights and small.activations == fixed.activations


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
