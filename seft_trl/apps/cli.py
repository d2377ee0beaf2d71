"""``seft-trl``: prune, repair, evaluate and report on sparse causal LMs from one command.

    seft-trl prune  --model_name_or_path DENSE --prune_method wanda --prune_calibration c4.txt --output_dir PRUNED
    seft-trl repair --model_name_or_path PRUNED --dataset_name alpaca.jsonl --output_dir REPAIRED [--config r.yaml]
    seft-trl eval   --model_name_or_path REPAIRED --eval_text wikitext2_test.txt [--eval_tasks boolq rte]
    seft-trl report --model_name_or_path REPAIRED/checkpoint-200

Each subcommand parses its options with ``TrlParser`` (command line and ``--config`` YAML alike)
from the classes of :mod:`seft_trl.apps.options`, TRL's ``ModelConfig`` and ``SEFTConfig``:
``seft-trl SUBCOMMAND --help`` lists them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable

import torch
from trl import TrlParser

from ..patterns import SparsityPattern, detect_pattern
from ..report import LayerSparsity, SparsityReport
from ..saving import file_damage
from ..targets import output_embedding_names
from .options import CheckpointArguments, EvalArguments
from .prune import PRUNE_ARGUMENTS, prune_checkpoint
from .recipes import REPAIR_ARGUMENTS, measure_perplexity, repair


def evaluate_checkpoint(checkpoint: CheckpointArguments, evaluation: EvalArguments) -> dict:
    """Perplexity on ``eval_text`` and, when tasks are named, the zero-shot suite; printed and returned."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if evaluation.eval_text is None and not evaluation.eval_tasks:
        raise ValueError("eval needs --eval_text (perplexity) or --eval_tasks (zero-shot), or both.")
    model_path = checkpoint.require_model("eval")
    device = checkpoint.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=checkpoint.torch_dtype()).to(device).eval()
    results: dict = {"model": model_path}
    if evaluation.eval_text is not None:
        measured = measure_perplexity(model, tokenizer, evaluation.eval_source(), evaluation.eval_seqlen)
        results.update(perplexity=measured.value, eval_seqlen=measured.seqlen, eval_note=measured.note)
        print(f"perplexity: {'-' if measured.value is None else f'{measured.value:.3f}'} "
              f"({measured.seqlen}-token windows{'; ' + measured.note if measured.note else ''})")
    if evaluation.eval_tasks:
        from ..evaluation import zero_shot

        scores = zero_shot(model, tokenizer, evaluation.eval_tasks, limit=evaluation.eval_limit)
        results["zero_shot"] = scores.as_dict()
    if checkpoint.output_dir:
        folder = Path(checkpoint.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "eval_results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


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
    report = checkpoint_report(checkpoint.require_model("report"))
    print(report.table())
    if checkpoint.output_dir:
        folder = Path(checkpoint.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "sparsity_report.json").write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    return report.as_dict()


# name: (help line, option classes, what to run on the parsed options)
COMMANDS: dict[str, tuple[str, tuple[type, ...], Callable[..., object]]] = {
    "prune": ("prune a causal LM one-shot (Wanda, SparseGPT, magnitude) into a plain checkpoint",
              PRUNE_ARGUMENTS, prune_checkpoint),
    "repair": ("prune optionally, repair with SEFT on instruction data, save merged, report",
               REPAIR_ARGUMENTS, repair),
    "eval": ("perplexity on a local text and the zero-shot suite of the pruning papers",
             (CheckpointArguments, EvalArguments), evaluate_checkpoint),
    "report": ("sparsity report of a checkpoint folder (merged, pruned or a SEFT checkpoint-N)",
               (CheckpointArguments,), report_command),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_line}" for name, (help_line, _, _) in COMMANDS.items()]
    return "usage: seft-trl {" + ",".join(COMMANDS) + "} [options] [--config FILE.yaml] [--debug]\n\n" + "\n".join(lines) + (
        "\n\nseft-trl SUBCOMMAND --help lists the subcommand's options. An error prints one line; --debug (or "
        f"{DEBUG_ENV}=1) prints its traceback."
    )


# What a user's mistake raises (a bad value, a missing or damaged file): one line and exit status 2.
USER_ERRORS = (ValueError, OSError)
DEBUG_ENV = "SEFT_TRL_DEBUG"


def one_line(error: BaseException) -> str:
    """The error's message on one line (library messages often run over several)."""
    text = " ".join(part.strip() for part in str(error).splitlines() if part.strip())
    return text or type(error).__name__


def main(argv: list[str] | None = None) -> None:
    """Run a subcommand. An error prints one line (``--debug`` or SEFT_TRL_DEBUG=1: the traceback): exit status 2
    for a user's mistake, 1 for anything else."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [arg for arg in argv if arg != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        sys.exit(f"seft-trl: unknown subcommand {name!r}\n\n{usage()}")
    help_line, classes, command = COMMANDS[name]
    parser = TrlParser(classes, prog=f"seft-trl {name}", description=help_line[0].upper() + help_line[1:] + ".")
    try:
        command(*parser.parse_args_and_config(rest))
    except Exception as error:  # noqa: BLE001 - every failure ends in one line unless asked for the traceback
        if debug:
            raise
        user = isinstance(error, USER_ERRORS)
        hint = "" if user else f" ({type(error).__name__}; --debug or {DEBUG_ENV}=1 shows the traceback)"
        print(f"seft-trl {name}: error: {one_line(error)}{hint}", file=sys.stderr)
        sys.exit(2 if user else 1)


if __name__ == "__main__":
    main()
