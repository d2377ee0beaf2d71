"""``prune``: one-shot pruning of a causal LM in place (Wanda, SparseGPT, magnitude; unstructured or N:M).

Every option, the target layers, the device placement and the calibration data are checked (and
the calibration text tokenized) before the first weight changes, so bad input leaves the model as it was.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..targets import find_target_linears
from ..patterns import SparsityPattern
from ..report import SparsityReport, sparsity_report
from .calibration import CalibrationSource, calibration_windows
from .masks import magnitude_score, select_pruned, wanda_score
from .sequential import InputStatistics, decoder_and_layers, prune_sequentially, targets_by_layer
from .sparsegpt import sparsegpt_prune

METHODS = ("wanda", "sparsegpt", "magnitude")
DEFAULT_SPARSITY = 0.5  # for unstructured patterns; an N:M pattern implies 1 - N/M


@dataclass(frozen=True)
class PruningOptions:
    """Validated method, sparsity, pattern and the scope over which each method counts its sparsity."""

    method: str
    sparsity: float
    pattern: SparsityPattern
    granularity: str  # magnitude: 'layer' | 'row'; wanda: 'row'; sparsegpt: 'block'; any N:M: 'group'

    def as_dict(self) -> dict:
        return {**asdict(self), "pattern": str(self.pattern)}


def resolve_options(
    method: str, sparsity: float | None = None, pattern: str = "unstructured", granularity: str | None = None
) -> PruningOptions:
    """Check the options (before anything is loaded or changed) and fill in the defaults."""
    if method not in METHODS:
        raise ValueError(f"Unknown pruning method {method!r}: use one of {', '.join(METHODS)}.")
    parsed = SparsityPattern.parse(pattern)
    resolved_sparsity = _resolve_sparsity(sparsity, parsed)
    return PruningOptions(method, resolved_sparsity, parsed, _resolve_granularity(method, granularity, parsed))


def _resolve_sparsity(sparsity: float | None, pattern: SparsityPattern) -> float:
    if sparsity is not None and (
        isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0
    ):
        raise ValueError(f"sparsity must be a number in [0, 1) (the fraction of weights pruned); got {sparsity!r}.")
    if not pattern.is_nm:
        return DEFAULT_SPARSITY if sparsity is None else float(sparsity)
    implied = 1.0 - pattern.n / pattern.m
    if sparsity is not None and not math.isclose(sparsity, implied, abs_tol=1e-9):
        raise ValueError(
            f"Pattern {pattern} prunes exactly {implied:.4g} of the weights, but sparsity={sparsity} was given; "
            f"leave sparsity unset or set it to {implied:.4g}."
        )
    return implied


def _resolve_granularity(method: str, granularity: str | None, pattern: SparsityPattern) -> str:
    if method != "magnitude" or pattern.is_nm:
        if granularity is not None:
            raise ValueError(
                "granularity only applies to unstructured magnitude pruning: Wanda always compares within each "
                "output row, SparseGPT within blocks of 128 columns, and N:M within each group."
            )
        return "group" if pattern.is_nm else {"wanda": "row", "sparsegpt": "block"}[method]
    if granularity not in (None, "layer", "row"):
        raise ValueError(f"granularity must be 'layer' or 'row' for magnitude pruning; got {granularity!r}.")
    return granularity or "layer"


@torch.no_grad()
def prune(
    model: nn.Module,
    method: str = "wanda",
    sparsity: float | None = None,
    pattern: str = "unstructured",
    calibration: CalibrationSource | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    nsamples: int = 128,
    seqlen: int = 2048,
    target_modules: list[str] | str | None = None,
    seed: int = 0,
    granularity: str | None = None,
    device: str | torch.device | None = None,
    text_field: str = "text",
    progress: bool = False,
) -> SparsityReport:
    """Prune ``model`` in place, one-shot, and return its sparsity report.

    ``method``: 'wanda' (|W|·‖X‖, compared per output row), 'sparsegpt' (OBS reconstruction, exact
    sparsity per block of 128 columns) or 'magnitude' (|W|, per layer or ``granularity='row'``; no
    calibration). ``sparsity`` defaults to 0.5; an N:M ``pattern`` ('2:4', '4:8') implies 1 - N/M.
    ``calibration`` (Wanda, SparseGPT): token ids [n, seqlen] used as they are, or text with
    ``tokenizer`` (a str or list of str, a ``pathlib.Path`` of a .txt / .jsonl / .json file or of a
    saved dataset folder, a ``datasets.Dataset``: see :mod:`seft_trl.text`), cut into
    ``nsamples`` random windows of ``seqlen`` tokens drawn with ``seed``. ``target_modules``: as in
    the engine (default: every nn.Linear but lm_head). ``device``: where layers are pruned, one at a
    time (default: CUDA when available, else where the model is); the model stays where it is.

    The options are recorded in ``model.config.pruning_config`` (saved in config.json), so that the
    checkpoint, and the card of a model repaired from it, say how it was pruned.
    """
    options = resolve_options(method, sparsity, pattern, granularity)
    targets = find_target_linears(model, target_modules)
    _check_group_fits(targets, options.pattern)
    device = _execution_device(model, device)
    if options.method == "magnitude":
        for linear in tqdm(targets.values(), desc="pruning", unit="linear", disable=not progress):
            _prune_by_magnitude(linear, options, device)
        return _recorded(model, options.as_dict())

    decoder, layers = decoder_and_layers(model)
    groups = targets_by_layer(layers, targets)
    ids = _calibration_ids(model, options, calibration, tokenizer, nsamples, seqlen, seed, text_field)
    was_training = model.training
    model.eval()
    try:
        prune_sequentially(
            decoder,
            layers,
            groups,
            ids,
            device,
            lambda linear, stats: _prune_calibrated(linear, stats, options),
            full_statistics=options.method == "sparsegpt",
            progress=progress,
        )
    finally:
        model.train(was_training)
    return _recorded(model, {**options.as_dict(), "nsamples": int(ids.shape[0]), "seqlen": int(ids.shape[1]), "seed": seed})


def _recorded(model: nn.Module, provenance: dict) -> SparsityReport:
    """Write ``provenance`` into the model's config (when it has one); the pruned model's report.

    The record names the dense parent (``parent``: where the model was loaded from before its first
    pruning, a local folder made absolute, or a hub name), which a repair uses as its teacher.
    """
    report = sparsity_report(model, pattern=provenance["pattern"])
    config = getattr(model, "config", None)
    if config is not None:
        parent = dense_parent_of(config)
        model.config.pruning_config = {**provenance, "achieved_sparsity": round(report.sparsity, 6),
                                       **({"parent": parent} if parent else {})}
    return report


def dense_parent_of(config) -> str | None:
    """The dense model a model (by its config) descends from: the parent its pruning recorded, else where it was
    loaded from (an absolute path for a local folder); None when unknown."""
    recorded = (getattr(config, "pruning_config", None) or {}).get("parent")
    if recorded:
        return recorded
    source = getattr(config, "_name_or_path", "") or ""
    if not source:
        return None
    path = Path(source).expanduser()
    return str(path.resolve()) if path.is_dir() else source


def _check_group_fits(targets: dict[str, nn.Linear], pattern: SparsityPattern) -> None:
    if not pattern.is_nm:
        return
    misfits = [f"{name} ({linear.in_features})" for name, linear in targets.items() if linear.in_features % pattern.m]
    if misfits:
        raise ValueError(
            f"Pattern {pattern} groups every {pattern.m} consecutive inputs, but the input size of "
            f"{', '.join(misfits)} is not a multiple of {pattern.m}. Leave these out of target_modules or use "
            "another pattern."
        )


def _execution_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """Where layers are pruned; the model must sit on one real device (layers travel there one at a time)."""
    homes = {parameter.device for parameter in model.parameters()}
    if len(homes) != 1 or next(iter(homes)).type == "meta":
        raise ValueError(
            f"The model's weights are on {sorted(map(str, homes))}; load it on one device (the CPU is fine: layers "
            "are moved to the GPU one at a time) and without device_map offloading."
        )
    if device is not None:
        return torch.device(device)
    return torch.device("cuda") if torch.cuda.is_available() else next(iter(homes))


def _calibration_ids(
    model: nn.Module,
    options: PruningOptions,
    calibration: CalibrationSource | None,
    tokenizer: PreTrainedTokenizerBase | None,
    nsamples: int,
    seqlen: int,
    seed: int,
    text_field: str,
) -> torch.Tensor:
    """Calibration windows [n, seqlen], checked against the model's vocabulary."""
    if calibration is None:
        raise ValueError(
            f"{options.method} needs calibration data: token ids [n, seqlen], a list of texts, a .txt / .jsonl file "
            "or a datasets.Dataset (with tokenizer). Only method='magnitude' prunes without data."
        )
    if nsamples < 1 or seqlen < 1:
        raise ValueError(f"nsamples and seqlen must be >= 1; got nsamples={nsamples}, seqlen={seqlen}.")
    ids = calibration_windows(calibration, tokenizer, nsamples, seqlen, seed, text_field)
    vocab = model.get_input_embeddings().num_embeddings
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(
            f"Calibration token ids span [{int(ids.min())}, {int(ids.max())}] but the model's vocabulary has {vocab} "
            "entries; use the model's own tokenizer."
        )
    return ids


def _prune_calibrated(linear: nn.Linear, stats: InputStatistics, options: PruningOptions) -> None:
    """Wanda or SparseGPT on one linear layer, from the statistics of its calibration inputs."""
    weight = linear.weight
    if options.method == "sparsegpt":
        weight.copy_(sparsegpt_prune(weight, stats.hessian(), options.sparsity, options.pattern))
    else:
        score = wanda_score(weight, stats.column_sq_norms())
        weight.masked_fill_(select_pruned(score, options.sparsity, options.pattern, options.granularity), 0.0)


def _prune_by_magnitude(linear: nn.Linear, options: PruningOptions, device: torch.device) -> None:
    """Magnitude pruning of one linear layer, scored on ``device``."""
    score = magnitude_score(linear.weight.to(device))
    mask = select_pruned(score, options.sparsity, options.pattern, options.granularity)
    linear.weight.masked_fill_(mask.to(linear.weight.device), 0.0)
