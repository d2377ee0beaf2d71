"""``seft-trl report``: the sparsity report of a saved checkpoint folder (merged, pruned or a SEFT checkpoint-N)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..patterns import SparsityPattern, detect_pattern
from ..report import LayerSparsity, SparsityReport
from ..saving import file_damage
from ..targets import output_embedding_names
from .options import CheckpointArguments

REPORT_ARGUMENTS = (CheckpointArguments,)


def _safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not folder.is_dir():
        raise ValueError(f"{folder} does not exist: report reads a local checkpoint folder.")
    files = sorted(folder.glob("*.safetensors"))
    sharded = sorted(folder.glob("pytorch_model_fsdp_*"))  # accelerate's torch.distributed.checkpoint folders
    if not files and sharded:
        raise ValueError(
            f"{folder} is a sharded FSDP checkpoint ({sharded[0].name}), which only resumes training: report the "
            "merged folder that save_model() writes at the end."
        )
    if not files:
        raise ValueError(f"{folder} holds no .safetensors weights: give a checkpoint folder (merged or checkpoint-N).")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        damage = file_damage(file)
        if damage is not None:
            raise ValueError(f"{file} is damaged: {damage}. Save or copy the checkpoint again.")
        tensors.update(load_file(file))
    return tensors


@torch.no_grad()
def checkpoint_report(folder: str | Path) -> SparsityReport:
    """The sparsity report of a saved folder: a plain (merged, pruned) checkpoint or a SEFT periodic one.

    The linear layers come from the config (the model is built on the meta device, so no weight is
    loaded twice); a SEFT checkpoint's layers are also checked against the budgets it saved.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    tensors = _safetensors(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} has no config.json: report reads a folder that save_pretrained (or seft-trl) wrote.")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    excluded = output_embedding_names(skeleton)
    names = [n for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear) and n not in excluded]
    entries, weights = [], []
    for name in names:
        weight = tensors.get(f"{name}.weight")
        if weight is None:
            continue  # tied to a saved tensor
        nonzeros = int(torch.count_nonzero(weight))
        support, budget, within = nonzeros, None, True
        index = tensors.get(f"{name}.delta_index")
        if index is not None:  # SEFT layer: W' is saved; the support adds the delta positions
            mask = weight.reshape(-1) != 0
            mask[index.long()] = True
            support, budget = int(mask.sum()), int(tensors[f"{name}.support_budget"])
            row_budget = tensors.get(f"{name}.row_budget")
            rows_within = row_budget is None or bool((mask.view(weight.shape).sum(1) <= row_budget).all())
            within = support <= budget and rows_within
        entries.append(LayerSparsity(name, tuple(weight.shape), weight.numel(), nonzeros, support, budget, within))
        weights.append(weight)
    pattern = detect_pattern(weights) if weights else SparsityPattern()
    return SparsityReport(entries, str(pattern), all(e.within_budget for e in entries))


def report_command(checkpoint: CheckpointArguments) -> dict:
    """Print the report of ``--model_name_or_path`` and save it as JSON into ``--output_dir`` when given."""
    report = checkpoint_report(checkpoint.require_model("report"))
    print(report.table())
    if checkpoint.output_dir:
        folder = Path(checkpoint.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "sparsity_report.json").write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    return report.as_dict()
