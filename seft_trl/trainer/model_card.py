"""The model card (``README.md``) of a merged SEFT checkpoint, as TRL's trainers write one.

A repaired sparse model is only useful with its provenance: which model it came from, how it was
pruned, how it was repaired and how sparse it still is. The card carries all of it, with hub
metadata (``base_model``, tags, datasets) that the hub reads like any other card.
"""

from __future__ import annotations

import json
import os
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from ..report import SparsityReport

SEFT_PAPER = "Leave it to the Specialist: Repair Sparse LLMs with Sparse Fine-Tuning via Sparsity Evolution"
SEFT_ARXIV = "2505.24037"
FRAMEWORKS = ("seft_trl", "trl", "transformers", "torch", "accelerate", "datasets", "bitsandbytes")
# Training metrics worth a line on the card, in this order, when the run logged them.
CARD_METRICS = ("train_loss", "train_runtime", "train_samples_per_second", "epoch", "eval_loss",
                "seft/final_sparsity", "seft/final_nonzeros")


def hub_model_id(name_or_path: str | None) -> str | None:
    """``name_or_path`` when it names a hub repository (``org/name``), not a local folder."""
    if not name_or_path or os.path.isdir(name_or_path) or name_or_path.count("/") != 1:
        return None
    return name_or_path


def final_metrics(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """The latest value of each of :data:`CARD_METRICS` in the trainer's log history."""
    latest: dict[str, float] = {}
    for entry in log_history:
        latest.update({key: value for key, value in entry.items() if key in CARD_METRICS})
    if log_history and "step" in log_history[-1]:
        latest["global_step"] = log_history[-1]["step"]
    return latest


def _framework_versions() -> list[str]:
    lines = []
    for package in FRAMEWORKS:
        try:
            lines.append(f"- {package}: {version(package)}")
        except PackageNotFoundError:
            continue
    return lines


def _pruning_lines(pruning: dict[str, Any] | None) -> list[str]:
    if not pruning:
        return ["How the base model was pruned is not recorded in its config (`pruning_config`)."]
    method = pruning.get("method", "unknown method")
    pattern = pruning.get("pattern", "unknown pattern")
    sparsity = pruning.get("sparsity")
    amount = f" to {sparsity:.0%}" if isinstance(sparsity, (int, float)) else ""
    return [f"The base model was pruned with {method}{amount}, pattern {pattern} "
            f"(`config.pruning_config`: `{json.dumps(pruning, sort_keys=True)}`)."]


def seft_model_card(
    report: SparsityReport,
    *,
    model_name: str,
    base_model: str | None,
    pruning: dict[str, Any] | None,
    seft_options: dict[str, Any],
    training: dict[str, Any],
    metrics: dict[str, float],
    dataset_name: str | None = None,
    tags: list[str] | None = None,
) -> ModelCard:
    """A card for the merged model: provenance, SEFT options, final sparsity, metrics, versions.

    ``seft_options``: the engine's options; ``training``: the few trainer options that decide a run
    (learning rate, optimizer, steps); ``metrics``: see :func:`final_metrics`.
    """
    data = ModelCardData(
        base_model=base_model,
        datasets=[dataset_name] if dataset_name else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        model_name=model_name,
        tags=sorted({"generated_from_trainer", "trl", "sft", "seft", "sparse", "pruned", *(tags or [])}),
    )
    origin = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "a pruned causal LM"
    budget = "every layer within its budget" if report.within_budget else "SOME LAYERS OVER BUDGET"
    lines = [
        f"# {model_name}",
        "",
        f"A sparse causal LM repaired from {origin} with SEFT (Sparsity Evolution Fine-Tuning, "
        f"[arXiv {SEFT_ARXIV}](https://arxiv.org/abs/{SEFT_ARXIV})) using seft_trl and TRL. "
        "The weights are a plain checkpoint: exact zeros outside the support, no adapter; it loads with "
        "`AutoModelForCausalLM.from_pretrained` and needs no seft_trl.",
        "",
        "## Sparsity",
        "",
        *_pruning_lines(pruning),
        "",
        f"After repair the {len(report.layers)} linear layers hold {report.nonzeros:,} nonzeros of "
        f"{report.numel:,} weights: **{report.sparsity:.2%} sparse**, pattern {report.pattern} "
        f"{'holds' if report.pattern_holds else 'VIOLATED'}, {budget}. Per-layer numbers: "
        "`sparsity_report.json` beside the weights.",
        "",
        "## Training procedure",
        "",
        "Sparse deltas on the frozen pruned weights, trained with `SEFTSFTTrainer`; every few steps the "
        "weakest deltas move to where the gradient is largest, and a revived pruned weight is paid for by "
        "pruning a kept one, so the layer never holds more nonzeros than it started with.",
        "",
        "| option | value |",
        "|---|---|",
        *[f"| {key} | `{value}` |" for key, value in {**training, **seft_options}.items()],
    ]
    if metrics:
        lines += ["", "### Training results", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {value:.6g} |" if isinstance(value, float) else f"| {key} | {value} |"
                  for key, value in metrics.items()]
    lines += ["", "### Framework versions", "", *_framework_versions(), "", "## Citation", "",
              f"SEFT: *{SEFT_PAPER}*, arXiv:{SEFT_ARXIV}."]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
