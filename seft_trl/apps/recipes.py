"""The shared body of the recipes: load, prune, instruction-tune with SEFT, evaluate, summarize.

``recipes/llama_alpaca.py``, ``recipes/deepseek_alpaca.py`` and ``recipes/mistral_alpaca.py`` are
thin wrappers that differ only in their default model, and ``seft-trl repair`` is the same run.
Arguments parse with ``TrlParser`` from the command line and/or ``--config recipe.yaml``: the
data, pruning and evaluation options of :mod:`seft_trl.apps.options`, :class:`SEFTConfig` and
TRL's ``ModelConfig``.
"""

from __future__ import annotations

import copy
import json
import resource
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset, load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig, TrlParser

from ..evaluation import perplexity
from ..pruning import dense_parent_of
from ..report import sparsity_report
from ..locations import check_model_location
from ..text import TextSource, json_records, token_ids
from ..trainer.sft_config import SEFTConfig
from ..trainer.sft_trainer import SEFTSFTTrainer, sharding_engine
from ..trainer.teacher import teacher_folder
from .options import DataArguments, EvalArguments, ParentArguments, PruningArguments

# Alpaca's fields in a plain prompt, for tokenizers without a chat template.
PLAIN_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PLAIN_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


def to_prompt_completion(example: dict, conversational: bool) -> dict:
    """One Alpaca record as a prompt-completion pair, so TRL trains on the response only."""
    instruction, context, response = example["instruction"], example.get("input") or "", example["output"]
    if conversational:
        question = f"{instruction}\n\n{context}" if context else instruction
        return {
            "prompt": [{"role": "user", "content": question}],
            "completion": [{"role": "assistant", "content": response}],
        }
    template = PLAIN_PROMPT if context else PLAIN_PROMPT_NO_INPUT
    return {"prompt": template.format(instruction=instruction, input=context), "completion": response}


def load_alpaca(name: str, split: str) -> Dataset:
    """A local .json/.jsonl file, or a hub dataset (only for users who are online)."""
    if Path(name).is_file():  # read here, so that a syntax error names the file and the line
        dataset = Dataset.from_list(json_records(Path(name)))
    elif Path(name).exists():
        raise ValueError(f"--dataset_name {name} is a folder: give a .json or .jsonl file of Alpaca records.")
    else:
        dataset = load_dataset(name, split=split)
    missing = {"instruction", "output"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"{name} is not in Alpaca format: missing columns {sorted(missing)}.")
    return dataset


def as_text(example: dict) -> str:
    context = f"\n{example['input']}" if example.get("input") else ""
    return f"{example['instruction']}{context}\n{example['output']}"


@dataclass
class Perplexity:
    """A held-out perplexity as measured: its value (None: skipped), the window used, and why if not the asked one."""

    value: float | None
    seqlen: int
    note: str = ""


def measure_perplexity(model, tokenizer, source: TextSource, seqlen: int) -> Perplexity:
    """Perplexity with ``seqlen``-token windows; never aborts a run on short held-out text.

    A text shorter than one window is measured with a single window of all its tokens, and one
    of fewer than 2 tokens is skipped; both with a warning, and the note says which.
    """
    ids = token_ids(tokenizer, source)
    if ids.numel() >= seqlen:
        return Perplexity(perplexity(model, None, ids, seqlen=seqlen, progress=False), seqlen)
    if ids.numel() >= 2:
        note = f"the held-out text has {ids.numel()} tokens, fewer than one window of {seqlen}: one window of {ids.numel()}"
        warnings.warn(f"Perplexity: {note}; give more held-out text to measure with the asked window.", stacklevel=2)
        return Perplexity(perplexity(model, None, ids, seqlen=ids.numel(), progress=False), ids.numel(), note)
    note = f"skipped: the held-out text has {ids.numel()} token(s)"
    warnings.warn(f"Perplexity {note}.", stacklevel=2)
    return Perplexity(None, 0, note)


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def launch_description(trainer: SEFTSFTTrainer) -> str:
    """How the run was distributed, e.g. 'FSDP2, 8 processes' or 'single process'."""
    accelerator = trainer.accelerator
    if accelerator.num_processes == 1:
        return "single process"
    kind = accelerator.distributed_type.value
    if kind == "FSDP":
        kind = f"FSDP{accelerator.state.fsdp_plugin.fsdp_version}"
    elif kind.startswith("MULTI_"):
        kind = "DDP"
    return f"{kind}, {accelerator.num_processes} processes"


def summary_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


REPAIR_ARGUMENTS = (DataArguments, PruningArguments, EvalArguments, SEFTConfig, ModelConfig, ParentArguments)


def run(default_model: str, argv: list[str] | None = None) -> dict:
    """Parse the arguments (see :data:`REPAIR_ARGUMENTS`) and run one recipe; returns (and prints) the summary."""
    parser = TrlParser(REPAIR_ARGUMENTS)
    data, pruning, evaluation, args, model_args, parent = parser.parse_args_and_config(argv)
    return repair(data, pruning, evaluation, args, model_args, parent, default_model=default_model)


def recorded_parent(model) -> str | None:
    """The dense parent a pruned checkpoint names, when it can be found here; else None, with a warning."""
    recorded = (getattr(model.config, "pruning_config", None) or {}).get("parent")
    if not recorded:
        return None
    try:
        return str(teacher_folder(recorded))
    except ValueError as error:
        warnings.warn(f"The pruned model names its dense parent, but it cannot be used ({error}) The repair goes on "
                      "without it: pass --teacher_model_name_or_path, or --use_parent false to silence this.", stacklevel=2)
        return None


def repair(data: DataArguments, pruning: PruningArguments, evaluation: EvalArguments, args: SEFTConfig,
           model_args: ModelConfig, parent: ParentArguments | None = None, default_model: str | None = None) -> dict:
    """Load, prune (when asked), repair with SEFT, save merged, measure; returns (and prints) the summary.

    With ``parent.use_parent`` (the default) and no ``teacher_model_name_or_path``, the dense parent is
    the teacher: the model as loaded when this run prunes it (kept in memory when a loss needs it,
    else read from its folder for revivals), or the parent a pruned checkpoint records.
    """
    parent = parent or ParentArguments()
    model_name = model_args.model_name_or_path or default_model
    if model_name is None:
        raise ValueError("repair needs --model_name_or_path: a local folder or a hub name of the model to repair.")
    check_model_location(model_name)
    started = time.perf_counter()
    records = load_alpaca(data.dataset_name, data.dataset_split).shuffle(seed=args.seed)  # before the slow loads

    tokenizer = AutoTokenizer.from_pretrained(model_name, revision=model_args.model_revision)
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    model = AutoModelForCausalLM.from_pretrained(
        model_name, revision=model_args.model_revision, dtype=dtype, attn_implementation=model_args.attn_implementation
    )
    if sharding_engine(args) != "fsdp2":  # under FSDP2 the trainer moves each rank's shards to its device
        model.to(args.device)

    if data.max_train_samples is not None:
        records = records.select(range(min(len(records), data.max_train_samples + 1)))
    n_heldout = max(1, int(len(records) * data.heldout_fraction))
    heldout, train_records = records.select(range(n_heldout)), records.select(range(n_heldout, len(records)))
    eval_source = evaluation.eval_source() or [as_text(r) for r in heldout]
    measured: dict[str, Perplexity] = {}

    def measure(stage: str) -> None:
        measured[stage] = measure_perplexity(model, tokenizer, eval_source, evaluation.eval_seqlen)

    teacher = args.teacher_model_name_or_path
    if pruning.prune_method is not None:
        measure("dense")
        if parent.use_parent and teacher is None:
            teacher = copy.deepcopy(model) if args.distillation_loss().uses_teacher else dense_parent_of(model.config)
        pruning.prune(model, tokenizer, seed=args.seed, fallback_calibration=[as_text(r) for r in train_records])
    elif parent.use_parent and teacher is None:
        teacher = recorded_parent(model)
    measure("pruned")
    results: dict[str, float | str | None] = {"model": model_name}
    results["pruned_sparsity"] = sparsity_report(model).sparsity
    results["teacher"] = ("the dense model before this run pruned it" if isinstance(teacher, torch.nn.Module)
                          else teacher)

    conversational = tokenizer.chat_template is not None
    train_dataset = train_records.map(
        lambda r: to_prompt_completion(r, conversational), remove_columns=train_records.column_names
    )
    trainer = SEFTSFTTrainer(model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer,
                             teacher_model=teacher)
    trainer.train()
    trainer.save_model()
    model.eval()
    measure("repaired")
    for stage in ("dense", "pruned", "repaired"):
        results[f"{stage}_ppl"] = measured[stage].value if stage in measured else None
    results["eval_seqlen"] = measured["repaired"].seqlen
    results["eval_note"] = measured["repaired"].note
    results["repaired_sparsity"] = sparsity_report(model).sparsity
    results["launch"] = launch_description(trainer)
    results["wall_time_s"] = time.perf_counter() - started
    results["peak_memory_gb"] = peak_memory_gb(args.device)

    def fmt(value) -> str:
        return "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)

    rows = [
        ("model", model_name),
        ("perplexity dense", fmt(results["dense_ppl"])),
        ("perplexity pruned", fmt(results["pruned_ppl"])),
        ("perplexity repaired (SEFT)", fmt(results["repaired_ppl"])),
        ("teacher (dense parent)", fmt(results["teacher"]) if results["teacher"] else "none: plain CE"),
        ("perplexity window", f"{results['eval_seqlen']} tokens" + (f" ({results['eval_note']})" if results["eval_note"] else "")),
        ("sparsity pruned / repaired", f"{results['pruned_sparsity']:.2%} / {results['repaired_sparsity']:.2%}"),
        ("launch", results["launch"]),
        ("wall time", f"{results['wall_time_s']:.0f} s"),
        ("peak memory", f"{results['peak_memory_gb']:.1f} GB ({'GPU' if args.device.type == 'cuda' else 'RSS'})"),
    ]
    if trainer.args.should_save:
        print(summary_table(rows), file=sys.stdout)
        (Path(args.output_dir) / data.summary_file).write_text(json.dumps(results, indent=2) + "\n")
    return results
