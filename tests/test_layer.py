"""Numerics of the sparse-delta layer against a dense autograd reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import DEVICE
from seft_trl.kernels import (
    SAMPLED_ENTRY_COST,
    SamplingPattern,
    default_sampled_kernel,
    dense_weight_gradient,
    sampled_weight_gradient,
)
from seft_trl.layer import SparseDeltaLinear
from seft_trl.patterns import Scope


def make_layer(out_features=48, in_features=80, density=0.05, dtype=torch.float32, bias=True, seed=0, device="cpu"):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias).to(device, dtype)
    with torch.no_grad():
        linear.weight[torch.rand_like(linear.weight, dtype=torch.float32) < 0.5] = 0
    nonzero = torch.nonzero(linear.weight.view(-1)).squeeze(1)
    k = int(density * linear.weight.numel())
    index = nonzero[torch.randperm(nonzero.numel())[:k]]
    layer = SparseDeltaLinear(linear, index, Scope("layer", in_features))
    with torch.no_grad():
        layer.delta.normal_(0, 0.05)
    layer.materialize()
    return layer


def dense_reference(layer: SparseDeltaLinear, x: torch.Tensor, g: torch.Tensor):
    """Forward/backward of F.linear with W' as an ordinary trainable dense weight."""
    w = layer.weight.detach().clone()
    w.view(-1)[layer.delta_index] = (layer.delta_base + layer.delta.detach()).to(w.dtype)
    w.requires_grad_(True)
    x = x.detach().clone().requires_grad_(True)
    y = F.linear(x, w, layer.bias)
    y.backward(g)
    return y, x.grad, w.grad.float().view(-1)[layer.delta_index]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("density", [0.01, 0.05, 0.5])  # 0.5 takes the dense-then-gather path
def test_forward_and_gradients_match_dense_reference(dtype, density):
    # On a GPU (make gpu-check) the sampled cases run the fused Triton kernel, on the CPU the CSR one.
    layer = make_layer(density=density, dtype=dtype, device=DEVICE)
    x = torch.randn(3, 7, 80, dtype=dtype, device=DEVICE, requires_grad=True)
    g = torch.randn(3, 7, 48, dtype=dtype, device=DEVICE)
    y_ref, gx_ref, gd_ref = dense_reference(layer, x, g)

    y = layer(x)
    y.backward(g)

    assert y.dtype == dtype and layer.delta.grad.dtype == torch.float32
    assert torch.equal(y, y_ref)  # same F.linear on the same weight
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(x.grad, gx_ref, **tol)
    # The δ gradient is accumulated in fp32 from the bf16 inputs, so compare with an fp32 product.
    exact = (g.float().reshape(-1, 48).t() @ x.detach().float().reshape(-1, 80)).view(-1)[layer.delta_index]
    torch.testing.assert_close(layer.delta.grad, exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.delta.grad, gd_ref, **tol)
    if density == 0.01:
        assert layer._pattern.kernel == default_sampled_kernel(DEVICE)


def test_weight_holds_effective_values_and_bias_untouched():
    layer = make_layer()
    bias_before = layer.bias.detach().clone()
    with torch.no_grad():
        layer.delta.add_(1.0)
    layer.materialize()
    expected = (layer.delta_base + layer.delta.detach()).to(layer.weight.dtype)
    assert torch.equal(layer.weight.view(-1)[layer.delta_index], expected)
    assert torch.equal(layer.bias, bias_before)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad


@pytest.mark.parametrize("kernel", [None, "sampled_addmm", "dense"])
@pytest.mark.parametrize("k", [0, 5, 400])
def test_sampled_kernel_matches_dense_product_in_any_slot_order(k, kernel):
    torch.manual_seed(1)
    g, x = torch.randn(2500, 30), torch.randn(2500, 70)  # > one token chunk
    index = torch.randperm(30 * 70)[:k]  # unsorted on purpose: slots keep their order
    pattern = SamplingPattern(index, 30, 70, kernel=kernel)
    if kernel is None:
        sampled = default_sampled_kernel(index.device)
        assert pattern.kernel == ("dense" if k * SAMPLED_ENTRY_COST[sampled] >= 30 * 70 else sampled)
    got = sampled_weight_gradient(g, x, pattern)
    torch.testing.assert_close(got, dense_weight_gradient(g, x).view(-1)[index], rtol=1e-4, atol=1e-3)


def test_window_start_backward_gives_same_delta_gradient_and_tracks_candidates():
    layer = make_layer(density=0.02)
    x = torch.randn(64, 80)
    g = torch.randn(64, 48)
    layer(x).backward(g)
    ordinary = layer.delta.grad.clone()
    layer.delta.grad = None
    layer.begin_window(10, 4.0)
    layer(x).backward(g)
    torch.testing.assert_close(layer.delta.grad, ordinary, rtol=1e-5, atol=1e-5)
    window = layer._window
    assert window is not None and window.candidates.grow_index.numel() == 40
    dense = dense_weight_gradient(g, x).view(-1)
    tracked = torch.cat([layer.delta_index, window.candidates.grow_index, window.candidates.remove_index])
    torch.testing.assert_close(window.step_sum, dense[tracked])
    # A second backward in the window accumulates at the same positions without a new selection.
    layer(x).backward(g)
    torch.testing.assert_close(window.step_sum, 2 * dense[tracked], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(window.step_col_sq, 2 * (x * x).sum(0), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(window.step_row_sq, 2 * (g * g).sum(0), rtol=1e-5, atol=1e-4)
    # Closing the step moves it into the window's totals, with its square.
    layer.close_step()
    assert window.steps == 1 and window.step_sum is None  # no per-step buffer held between steps
    torch.testing.assert_close(window.grad_sum, 2 * dense[tracked], rtol=1e-4, atol=1e-4)
    squared = tracked[: layer.delta.numel() + window.candidates.grow_index.numel()]  # deltas and growth candidates
    torch.testing.assert_close(window.grad_sq_sum, (2 * dense[squared]) ** 2, rtol=1e-4, atol=1e-3)
    # A skipped step (fp16 overflow) leaves no trace.
    layer(x).backward(g)
    layer.close_step(skipped=True)
    assert window.steps == 1
    torch.testing.assert_close(window.grad_sum, 2 * dense[tracked], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel", ["dense", "numba"])
def test_a_window_holds_only_its_statistics_and_candidates(kernel, monkeypatch):
    """Between steps a window keeps two fp32 sums per entry and the candidates' positions: no per-step
    buffer, no concatenated copy of the positions for the dense product, and δ's gradient never keeps
    the window's k + cg + cr entries alive (autograd adopts a lone gradient as ``δ.grad``)."""
    if kernel == "numba":
        pytest.importorskip("numba")
    import seft_trl.kernels as kernels

    monkeypatch.setitem(kernels.SAMPLED_ENTRY_COST, "numba", 10**9 if kernel == "dense" else 1)
    layer = make_layer(density=0.05)
    x, g = torch.randn(64, 80), torch.randn(64, 48)
    layer.begin_window(10, 4.0)
    for _ in range(2):  # the window's opening step, then one through its pattern
        layer.delta.grad = None
        layer(x).backward(g)
        layer.close_step()
        assert layer.delta.grad.untyped_storage().nbytes() == layer.delta.grad.nbytes
    window = layer._window
    assert window.pattern.kernel == kernel and window.step_sum is None
    entries = layer.delta.numel() + window.candidates.grow_index.numel() + window.candidates.remove_index.numel()
    assert window.grad_sum.numel() == entries
    assert window.grad_sq_sum.numel() == layer.delta.numel() + window.candidates.grow_index.numel()
    if kernel == "dense":  # the parts are the layer's own positions and candidates, not a copy
        assert [p.data_ptr() for p in window.pattern.parts] == [
            t.data_ptr() for t in (layer.delta_index, window.candidates.grow_index, window.candidates.remove_index)]


def test_a_window_saved_by_an_earlier_version_loads():
    """Checkpoints written before the windows were trimmed carry a zeroed step sum and squares over the
    removal candidates too: they load, and the window goes on as if saved now."""
    layer = make_layer(density=0.05)
    x, g = torch.randn(64, 80), torch.randn(64, 48)
    layer.begin_window(10, 4.0)
    layer(x).backward(g)
    layer.close_step()
    state = layer.state_dict()
    legacy = dict(state)
    entries = state["window_grad_sum"].numel()
    legacy["window_step_sum"] = torch.zeros(entries)
    legacy["window_grad_sq_sum"] = torch.cat([state["window_grad_sq_sum"], torch.rand(entries - state["window_grad_sq_sum"].numel())])
    fresh = make_layer(density=0.05)
    fresh.load_state_dict(legacy, strict=True)
    for key, value in state.items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_autocast_bf16_over_fp32_weights():
    layer = make_layer()
    x = torch.randn(5, 80, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(layer.delta.grad).all()


def test_first_layer_without_input_grad_still_trains_delta():
    layer = make_layer(bias=False)
    layer(torch.randn(4, 80)).sum().backward()
    assert layer.delta.grad is not None and layer.delta.grad.abs().sum() > 0


def test_closing_a_step_learns_the_optimizers_gradient_scale():
    layer = make_layer(density=0.02)
    x, g = torch.randn(64, 80), torch.randn(64, 48)
    layer.begin_window(4, 4.0)
    for _ in range(2):
        layer(x).backward(g)
        layer.delta.grad.mul_(0.25)  # what gradient clipping (or averaging over 4 ranks) does
        layer.close_step()
        layer.delta.grad = None
    assert layer._window.optimizer_scale == pytest.approx(0.25, rel=1e-5)


def one_revival_layer(kept_weight: float) -> SparseDeltaLinear:
    """1 × 4 weight [1, 0, kept, 0] with its delta at position 0, budget 2.

    The inputs make position 1 (pruned) the only gradient worth growing, with predicted gain
    m²/2h = 0.5, and position 2 the only weight that can pay for it, at cost ½w²h = 8·w².
    """
    linear = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 0.0, kept_weight, 0.0]]))
    return SparseDeltaLinear(linear, torch.tensor([0]), Scope("layer", 4))


@pytest.mark.parametrize("kept_weight,revives", [(1.0, False), (0.1, True)])
def test_swap_test_revives_only_where_the_gain_exceeds_the_cost(kept_weight, revives):
    layer = one_revival_layer(kept_weight)
    x = torch.zeros(8, 4)
    x[:, 1] = 1.0  # in step with the output gradient: a steady gradient at the pruned position 1
    x[:, 2] = torch.tensor([1.0, -1.0] * 4)  # uncorrelated with it: position 2's gradient is 0
    g = torch.full((8, 1), 0.5)
    layer.begin_window(1, 1.0)
    for _ in range(2):
        layer(x).backward(g)
        layer.close_step()
    assert layer._window.candidates.grow_index.tolist() == [1]
    assert layer._window.candidates.remove_index.tolist() == [2]
    assert layer.finalize_window()
    stats, moved, _ = layer.update_topology(1)
    assert stats.support <= stats.budget == 2
    if revives:
        assert stats.revived == stats.removed == 1 and layer.delta_index.tolist() == [1]
        assert layer.weight[0, 2] == 0 and moved.tolist() == [0]
    else:
        assert stats.revived == stats.removed == 0 and stats.refused == 1 and layer.delta_index.tolist() == [0]
        assert layer.weight[0, 2] == kept_weight and moved.numel() == 0


@pytest.mark.parametrize("density", [0.01, 0.05])  # sampled and dense paths
def test_after_a_topology_update_the_delta_gradient_is_taken_at_the_new_positions(density):
    layer = make_layer(out_features=96, in_features=160, density=density)
    torch.manual_seed(2)
    layer.begin_window(layer.swap_count(0.5), 4.0)
    for _ in range(3):
        x, g = torch.randn(32, 160), torch.randn(32, 96)
        layer(x).backward(g)
        layer.close_step()
        layer.delta.grad = None
    before = layer.delta_index.clone()
    assert layer.finalize_window()
    stats, _, _ = layer.update_topology(layer.swap_count(0.5))
    assert stats.grown > 0 and not torch.equal(layer.delta_index, before)  # some slots moved

    x, g = torch.randn(32, 160), torch.randn(32, 96)
    _, _, reference = dense_reference(layer, x, g)  # the gradient of W' at the slots' current positions
    layer(x).backward(g)
    torch.testing.assert_close(layer.delta.grad, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scope", [Scope("layer", 80), Scope("row", 80), Scope("nm", 80, 2, 4)])
def test_group_support_counts_what_the_dense_mask_counts(scope):
    """The updates count the support per group without the mask; the count must be the mask's,
    also where deltas sit on zero weights (revived positions, or deltas whose W' passed through 0)."""
    torch.manual_seed(5)
    linear = nn.Linear(80, 48, bias=False)
    with torch.no_grad():
        linear.weight.view(48, 20, 4)[..., 2:] = 0  # 2:4, so every scope holds
    index = torch.randperm(48 * 80)[:200]  # on zeros and nonzeros alike
    layer = SparseDeltaLinear(linear, index, scope)
    with torch.no_grad():
        layer.weight.view(-1)[index[:30]] = 0  # deltas whose effective weight is exactly 0
        layer.weight.view(-1)[torch.randperm(48 * 80)[:100]] = 0  # and more pruned weights
    assert int((layer.weight.view(-1)[layer.delta_index] == 0).sum()) >= 30
    expected = scope.group_support(layer.support_mask())
    assert torch.equal(layer.group_support(), expected)
    assert layer.support_size() == int(layer.support_mask().sum())
