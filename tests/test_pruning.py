"""One-shot pruning: exact sparsity per method and pattern, Wanda against a direct reference, SparseGPT's
reconstruction against magnitude and Wanda, the sequential path on tiny LLaMA / Mistral / Qwen2 models,
calibration data, errors before any change, atomic saves and the CLI round trip."""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from conftest import VOCAB, random_batch, tiny_model
from seft_trl.prune import main
from seft_trl.pruning import (
    calibration_windows,
    capture_layer_inputs,
    decoder_and_layers,
    kept_count,
    lowest_in_layer,
    lowest_per_group,
    lowest_per_row,
    magnitude_score,
    prune,
    select_pruned,
    sparsegpt_prune,
    wanda_score,
)
from seft_trl.patterns import SparsityPattern
from seft_trl.pruning.sequential import run_layer
from seft_trl.testing import byte_tokenizer

TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!\n"
    "How vexingly quick daft zebras jump; sphinx of black quartz, judge my vow. "
) * 6


def tiny_qwen2(seed: int = 0) -> nn.Module:
    """Two layers, the second one sliding-window: each layer gets its own attention mask."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, use_sliding_window=True, sliding_window=8,
        max_window_layers=1,
    )
    assert config.layer_types == ["full_attention", "sliding_attention"]
    return Qwen2ForCausalLM(config).eval()


def target_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: m.weight for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "lm_head"}


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------ masks


def test_masks_prune_exact_counts_of_the_lowest_scores():
    score = torch.rand(12, 40, generator=torch.Generator().manual_seed(0))
    layer = lowest_in_layer(score, 0.3)
    assert int(layer.sum()) == score.numel() - kept_count(score.numel(), 0.3)
    assert score[layer].max() < score[~layer].min()

    row = lowest_per_row(score, 0.6)
    assert (row.sum(dim=1) == 40 - kept_count(40, 0.6)).all()
    assert (torch.where(row, score, -1.0).amax(dim=1) < torch.where(row, 2.0, score).amin(dim=1)).all()

    group = lowest_per_group(score, 3, 8).view(12, 5, 8)
    grouped = score.view(12, 5, 8)
    assert (group.sum(dim=-1) == 5).all()
    assert (torch.where(group, grouped, -1.0).amax(-1) < torch.where(group, 2.0, grouped).amin(-1)).all()


def test_wanda_score_weighs_magnitudes_by_input_norms():
    weight = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    sq_norms = torch.tensor([100.0, 1.0, 1.0, 1.0])  # input 0 is 10x larger than the others
    unstructured = SparsityPattern()
    wanda = select_pruned(wanda_score(weight, sq_norms), 0.5, unstructured, "row")
    magnitude = select_pruned(magnitude_score(weight), 0.5, unstructured, "row")
    assert wanda.tolist() == [[False, True, True, False]]  # scores 10, 2, 3, 4
    assert magnitude.tolist() == [[True, True, False, False]]


# ---------------------------------------------------------------------------------------- exact sparsity


def assert_exact(model: nn.Module, method: str, sparsity: float, pattern: str, granularity: str | None) -> None:
    for name, weight in target_weights(model).items():
        nonzero = weight != 0
        if pattern != "unstructured":
            n, m = map(int, pattern.split(":"))
            assert (nonzero.view(weight.shape[0], -1, m).sum(-1) == n).all(), name
        elif method == "magnitude" and granularity == "layer":
            assert int(nonzero.sum()) == kept_count(weight.numel(), sparsity), name
        elif method == "sparsegpt":  # exact per block of 128 columns, all rows together
            for block in nonzero.split(128, dim=1):
                assert int(block.sum()) == kept_count(block.numel(), sparsity), name
        else:  # wanda, magnitude per row
            assert (nonzero.sum(dim=1) == kept_count(weight.shape[1], sparsity)).all(), name


@pytest.mark.parametrize(
    "method, pattern, granularity",
    [
        ("magnitude", "unstructured", "layer"),
        ("magnitude", "unstructured", "row"),
        ("magnitude", "2:4", None),
        ("wanda", "unstructured", None),
        ("wanda", "2:4", None),
        ("wanda", "4:8", None),
        ("sparsegpt", "unstructured", None),
        ("sparsegpt", "2:4", None),
        ("sparsegpt", "4:8", None),
    ],
)
def test_each_method_prunes_exactly_what_it_promises(method, pattern, granularity):
    model = tiny_model("llama")
    sparsity = 0.6 if pattern == "unstructured" else None  # 0.6: kept counts need rounding
    report = prune(model, method, sparsity, pattern, calibration=random_batch(4, 32, seed=1), granularity=granularity)
    expected = sparsity if sparsity is not None else 0.5
    assert_exact(model, method, expected, pattern, granularity or "layer")
    assert report.pattern_holds and report.pattern == pattern
    assert report.sparsity == pytest.approx(expected, abs=0.01)


# ---------------------------------------------------------------------------------- Wanda: direct reference


@torch.no_grad()
def reference_wanda(model: nn.Module, ids: torch.Tensor, sparsity: float) -> None:
    """Wanda written out directly: layer by layer, record every linear's inputs with the model as pruned so
    far, score |W|·‖X_j‖ and zero the lowest scores of each row."""
    for layer in model.model.layers:
        linears = {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
        inputs: dict[str, list[torch.Tensor]] = {name: [] for name in linears}
        hooks = [
            m.register_forward_hook(lambda _m, args, _o, name=name: inputs[name].append(args[0].flatten(0, -2)))
            for name, m in linears.items()
        ]
        for row in ids:
            model(input_ids=row.unsqueeze(0))
        for hook in hooks:
            hook.remove()
        for name, linear in linears.items():
            norms = torch.cat(inputs[name]).norm(dim=0)  # ‖X_j‖₂ [in]
            score = linear.weight.abs() * norms
            n_pruned = linear.in_features - round((1 - sparsity) * linear.in_features)
            for r in range(linear.out_features):
                linear.weight[r, score[r].argsort()[:n_pruned]] = 0.0


def test_wanda_equals_a_direct_reference_computation_layer_by_layer():
    ids = random_batch(3, 40, seed=2)
    ours, reference = tiny_model("llama", dtype=torch.float64), tiny_model("llama", dtype=torch.float64)
    prune(ours, "wanda", 0.5, calibration=ids)
    reference_wanda(reference, ids, 0.5)
    for (name, weight), ref in zip(target_weights(ours).items(), target_weights(reference).values()):
        assert torch.equal(weight != 0, ref != 0), name  # the same mask: layer 1 saw layer 0 pruned
        assert torch.equal(weight, ref), name  # and kept weights untouched


# ------------------------------------------------------------------------------ SparseGPT: reconstruction


def correlated_inputs(tokens: int, features: int, seed: int) -> torch.Tensor:
    """Inputs [tokens, features] with strongly correlated features and uneven scales, like LLM activations."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=generator, dtype=torch.float64)
    scales = torch.linspace(0.05, 2.0, features, dtype=torch.float64)
    return torch.randn(tokens, features, generator=generator, dtype=torch.float64) * scales @ mixing


@pytest.mark.parametrize("pattern, sparsity", [("unstructured", 0.5), ("2:4", 0.5), ("unstructured", 0.7)])
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda(pattern, sparsity):
    x = correlated_inputs(2048, 256, seed=3)  # [tokens, in]
    weight = torch.randn(48, 256, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    parsed = SparsityPattern.parse(pattern)
    hessian = 2 * x.T @ x / x.shape[0]
    pruned = {
        "sparsegpt": sparsegpt_prune(weight, hessian, sparsity, parsed),
        "wanda": weight.masked_fill(select_pruned(wanda_score(weight, x.pow(2).sum(0)), sparsity, parsed, "row"), 0),
        "magnitude": weight.masked_fill(select_pruned(magnitude_score(weight), sparsity, parsed, "layer"), 0),
    }
    error = {method: float((x @ (weight - w).T).norm()) for method, w in pruned.items()}
    assert error["sparsegpt"] < 0.95 * min(error["wanda"], error["magnitude"]), error
    for block in (pruned["sparsegpt"] != 0).split(128, dim=1):  # exact sparsity per block of 128 columns
        expected = kept_count(block.numel(), sparsity) if pattern == "unstructured" else block.numel() // 2
        assert int(block.sum()) == expected


def test_sparsegpt_update_is_the_optimal_brain_surgeon_solution():
    """When only the first column is pruned, the update of the others is the exact least-squares optimum
    min ‖X(w − ŵ)‖ with ŵ₀ = 0: ŵ_rest = w_rest + H_rr⁻¹ H_r0 w₀ (with the same dampening)."""
    x = correlated_inputs(512, 4, seed=5)
    weight = torch.randn(6, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    weight[:, 0] *= 1e-3  # column 0 is by far the cheapest to prune in every row
    hessian = 2 * x.T @ x / x.shape[0]
    result = sparsegpt_prune(weight, hessian, sparsity=0.25, pattern=SparsityPattern(3, 4))
    damped = hessian + 0.01 * hessian.diagonal().mean() * torch.eye(4, dtype=torch.float64)
    optimum = weight[:, 1:] + (torch.linalg.solve(damped[1:, 1:], damped[1:, :1]) @ weight[:, :1].T).T
    assert (result[:, 0] == 0).all()
    torch.testing.assert_close(result[:, 1:], optimum, rtol=1e-9, atol=1e-12)


def reference_sparsegpt_nm(weight: torch.Tensor, hessian: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """SparseGPT N:M written out directly, without the Cholesky shortcut or lazy blocks: at column i the
    columns < i are fixed, so the inverse Hessian of columns i.. gives the OBS update of removing w_i."""
    w = weight.clone()
    damped = hessian + 0.01 * hessian.diagonal().mean() * torch.eye(hessian.shape[0], dtype=hessian.dtype)
    mask = torch.zeros_like(w, dtype=torch.bool)
    for i in range(w.shape[1]):
        if i % m == 0:  # OBS error w_j² / [H_{j:,j:}⁻¹]_00 of each weight of the group, then the lowest m - n
            trailing = torch.stack([torch.linalg.inv(damped[j:, j:])[0, 0] for j in range(i, i + m)])
            order = (w[:, i : i + m].pow(2) / trailing).argsort(dim=1)
            mask[:, i : i + m].scatter_(1, order[:, : m - n], True)
        inverse = torch.linalg.inv(damped[i:, i:])
        removed = torch.where(mask[:, i], w[:, i], 0.0)
        w[:, i:] -= (removed / inverse[0, 0]).unsqueeze(1) * inverse[0].unsqueeze(0)
        w[:, i] = torch.where(mask[:, i], 0.0, w[:, i])
    return w


@pytest.mark.parametrize("block_size", [8, 128])
def test_sparsegpt_equals_the_direct_obs_algorithm(block_size):
    x = correlated_inputs(400, 24, seed=9)
    weight = torch.randn(5, 24, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    hessian = 2 * x.T @ x / x.shape[0]
    result = sparsegpt_prune(weight, hessian, 0.5, SparsityPattern(2, 4), block_size=block_size)
    expected = reference_sparsegpt_nm(weight, hessian, 2, 4)
    assert torch.equal(result == 0, expected == 0)
    torch.testing.assert_close(result, expected, rtol=1e-7, atol=1e-9)


def test_sparsegpt_leaves_weights_alone_at_zero_sparsity_and_zeroes_dead_inputs():
    x = correlated_inputs(256, 16, seed=7)
    x[:, 3] = 0.0  # an input that is always zero
    weight = torch.randn(5, 16, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    result = sparsegpt_prune(weight, 2 * x.T @ x / 256, sparsity=0.0, pattern=SparsityPattern())
    assert (result[:, 3] == 0).all()
    keep = torch.arange(16) != 3
    torch.testing.assert_close(result[:, keep], weight[:, keep])


# ------------------------------------------------------------------------------------- sequential path


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_capture_reproduces_every_layer_input_of_a_real_forward(arch):
    model = tiny_qwen2() if arch == "qwen2" else tiny_model(arch)
    ids = random_batch(2, 20, seed=3)  # longer than the sliding windows (8 for qwen2), so masks differ per layer
    with torch.no_grad():
        expected = model(input_ids=ids, output_hidden_states=True).hidden_states  # embeddings, layer 0, normed layer 1
    decoder, layers = decoder_and_layers(model)
    originals = list(layers)
    hidden, calls = capture_layer_inputs(decoder, layers, ids, torch.device("cpu"))
    assert all(layer is original for layer, original in zip(layers, originals))  # the recorders are gone
    assert torch.equal(hidden, expected[0])
    run_layer(layers[0], hidden, calls[0])
    torch.testing.assert_close(hidden, expected[1])
    run_layer(layers[1], hidden, calls[1])
    torch.testing.assert_close(decoder.norm(hidden), expected[2])


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_sequential_pruning_runs_on_tiny_models(arch, method):
    model = tiny_qwen2() if arch == "qwen2" else tiny_model(arch)
    model.train()
    ids = random_batch(4, 24, seed=9)
    report = prune(model, method, 0.5, calibration=ids)
    assert model.training  # the mode is restored
    assert report.sparsity == pytest.approx(0.5, abs=0.01) and len(report.layers) == 14
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


def test_target_modules_limit_pruning_to_the_named_layers():
    model = tiny_model("mistral")
    before = state_copy(model)
    prune(model, "sparsegpt", 0.5, calibration=random_batch(2, 16, seed=0), target_modules=["down_proj"])
    for name, tensor in model.state_dict().items():
        if name.endswith("down_proj.weight"):
            assert (tensor == 0).float().mean() == 0.5
        else:
            assert torch.equal(tensor, before[name]), name


# -------------------------------------------------------------------------------------- calibration data


def test_text_windows_are_seeded_slices_of_the_tokenized_text(tmp_path):
    tokenizer = byte_tokenizer()
    texts = [TEXT[:300], TEXT[300:]]
    full = torch.tensor(tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"])
    windows = calibration_windows(texts, tokenizer, nsamples=6, seqlen=50, seed=1)
    assert windows.shape == (6, 50) and windows.dtype == torch.long
    spans = full.unfold(0, 50, 1)  # every window of 50 tokens [T - 49, 50]
    assert all((spans == window).all(dim=1).any() for window in windows)
    assert torch.equal(windows, calibration_windows(texts, tokenizer, nsamples=6, seqlen=50, seed=1))
    assert not torch.equal(windows, calibration_windows(texts, tokenizer, nsamples=6, seqlen=50, seed=2))

    jsonl = tmp_path / "calib.jsonl"
    jsonl.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    txt = tmp_path / "calib.txt"
    txt.write_text("\n\n".join(texts))
    folder = tmp_path / "dataset"
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(folder))
    records = tmp_path / "calib.json"
    records.write_text(json.dumps([{"text": text} for text in texts]))
    for source in (jsonl, txt, records, folder, datasets.Dataset.from_dict({"text": texts}), "\n\n".join(texts)):
        assert torch.equal(calibration_windows(source, tokenizer, nsamples=6, seqlen=50, seed=1), windows), source
    # A str is text, never a path: one that names a file is refused with the fix, not read as a file.
    with pytest.raises(ValueError, match=r"pass pathlib.Path\("):
        calibration_windows(str(txt), tokenizer, nsamples=6, seqlen=50, seed=1)


def test_token_ids_are_used_as_given():
    ids = random_batch(3, 10, seed=0)
    assert torch.equal(calibration_windows(ids.int(), nsamples=99, seqlen=99), ids)


@pytest.mark.parametrize(
    "source, tokenizer, message",
    [
        (["a short text"], True, "shorter than one window"),
        ([TEXT], False, "needs a tokenizer"),
        (Path("/no/such/file.txt"), True, "does not exist"),
        (torch.rand(2, 8), False, "integer tensor"),
        ([], True, "non-empty list"),
    ],
)
def test_bad_calibration_data_is_refused_clearly(source, tokenizer, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        calibration_windows(source, byte_tokenizer() if tokenizer else None, nsamples=2, seqlen=64)


def test_jsonl_without_the_text_field_is_refused(tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text(json.dumps({"content": TEXT}) + "\n")
    with pytest.raises(ValueError, match="string field 'text'"):
        calibration_windows(path, byte_tokenizer(), nsamples=1, seqlen=8)


# ----------------------------------------------------------------------------- errors before any change


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="obs"), "Unknown pruning method"),
        (dict(sparsity=1.0), r"sparsity must be a number in \[0, 1\)"),
        (dict(sparsity=-0.1), r"sparsity must be a number in \[0, 1\)"),
        (dict(pattern="4:2"), "0 < N < M"),
        (dict(pattern="2:2"), "0 < N < M"),
        (dict(pattern="2:4", sparsity=0.7), "prunes exactly 0.5"),
        (dict(pattern="3:7"), "not a multiple of 7"),
        (dict(granularity="row"), "granularity only applies"),
        (dict(method="magnitude", granularity="block"), "'layer' or 'row'"),
        (dict(calibration=None), "needs calibration data"),
        (dict(calibration=[TEXT], tokenizer="char", seqlen=4096), "shorter than one window"),
        (dict(calibration=[TEXT]), "needs a tokenizer"),
        (dict(calibration=torch.full((2, 8), 10_000)), "vocabulary"),
        (dict(nsamples=0, calibration=[TEXT], tokenizer="char"), "nsamples and seqlen must be >= 1"),
        (dict(target_modules=["nope"]), "matches no module"),
    ],
)
def test_bad_input_raises_before_any_weight_changes(kwargs, message):
    model = tiny_model("llama")
    before = state_copy(model)
    arguments = {"method": "wanda", "calibration": random_batch(2, 16, seed=0), **kwargs}
    if arguments.get("tokenizer") == "char":
        arguments["tokenizer"] = byte_tokenizer()
    with pytest.raises(ValueError, match=message):
        prune(model, **arguments)
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())


# ------------------------------------------------------------------------------------- saving and the CLI


def test_cli_round_trips_a_checkpoint_that_reloads(tmp_path, capsys):
    source, output = tmp_path / "dense", tmp_path / "pruned"
    tiny_model("llama").save_pretrained(source)
    byte_tokenizer().save_pretrained(source)
    calibration = tmp_path / "calibration.txt"
    calibration.write_text(TEXT)
    main([
        "--model", str(source), "--method", "wanda", "--pattern", "2:4", "--calibration", str(calibration),
        "--nsamples", "4", "--seqlen", "32", "--output", str(output),
    ])
    assert "pattern 2:4: holds" in capsys.readouterr().out

    reloaded = AutoModelForCausalLM.from_pretrained(output)
    in_process = tiny_model("llama")
    prune(in_process, "wanda", pattern="2:4", calibration=calibration, tokenizer=byte_tokenizer(), nsamples=4,
          seqlen=32)
    for (name, weight), expected in zip(target_weights(reloaded).items(), target_weights(in_process).values()):
        assert torch.equal(weight, expected), name  # the same pruning, and exact zeros survive the save
    report = json.loads((output / "sparsity_report.json").read_text())
    assert report["pattern_holds"] and report["pruning"]["method"] == "wanda" and report["pruning"]["pattern"] == "2:4"
    assert report["total"]["sparsity"] == pytest.approx(0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibration.txt", "dense", "pruned"]  # no temp folders


@pytest.mark.parametrize(
    "extra, output_exists, message",
    [
        (["--pattern", "4:2"], False, "0 < N < M"),
        (["--sparsity", "1.5"], False, r"\[0, 1\)"),
        (["--method", "wanda"], False, "needs --prune_calibration"),
        (["--calibration", "/no/such/file.txt"], False, "does not exist"),
        (["--method", "magnitude"], True, "already exists"),
    ],
)
def test_cli_refuses_bad_options_before_loading_the_model(tmp_path, capsys, extra, output_exists, message):
    output = tmp_path / "out"
    if output_exists:
        output.mkdir()
    with pytest.raises(SystemExit) as exit_info:  # the model folder does not exist: nothing gets that far
        main(["--model", str(tmp_path / "no-model-here"), "--output", str(output), *extra])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
