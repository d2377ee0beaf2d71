"""The shared body of the recipes: load, prune, instruction-tune with SEFT, evaluate, summarize.

``recipes/llama_alpaca.py``, ``recipes/deepseek_alpaca.py`` and ``recipes/mistral_alpaca.py`` are
thin wrappers that differ only in their default model. Arguments parse with ``TrlParser`` from the
command line and/or ``--config recipe.yaml``: :class:`RecipeArguments`, :class:`PruningArguments`,
:class:`SEFTConfig` and TRL's ``ModelConfig``.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset, load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig, TrlParser

from ..evaluation import perplexity
from ..pruning import prune, resolve_options
from ..report import sparsity_report
from ..trainer.sft_config import SEFTConfig
from ..trainer.sft_trainer import SEFTSFTTrainer

# Alpaca's fields in a plain prompt, for tokenizers without a chat template.
PLAIN_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PLAIN_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


@dataclass
class RecipeArguments:
    dataset_name: str = field(
        default="tatsu-lab/alpaca",
        metadata={"help": "Alpaca-format data (instruction, input, output): a hub dataset or a local .json/.jsonl file."},
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of `dataset_name` to use."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training examples."})
    heldout_fraction: float = field(
        default=0.02,
        metadata={"help": "Fraction of the examples held out (never trained on) for perplexity when no eval text is given."},
    )
    eval_text: str | None = field(
        default=None,
        metadata={"help": "Local .txt/.jsonl file for perplexity (e.g. the WikiText-2 test split saved locally)."},
    )
    eval_seqlen: int = field(default=2048, metadata={"help": "Perplexity window length (non-overlapping windows)."})
    summary_file: str = field(default="summary.json", metadata={"help": "Summary written into output_dir."})


@dataclass
class PruningArguments:
    prune_method: str | None = field(
        default=None,
        metadata={"help": "Prune before repairing: wanda, sparsegpt or magnitude. Unset: the model is already pruned."},
    )
    prune_sparsity: float | None = field(default=None, metadata={"help": "Unstructured sparsity (default 0.5)."})
    prune_pattern: str = field(default="unstructured", metadata={"help": "unstructured or N:M, e.g. 2:4."})
    prune_calibration: str | None = field(
        default=None, metadata={"help": "Calibration text file; default: the training examples rendered as text."}
    )
    prune_nsamples: int = field(default=128, metadata={"help": "Calibration windows."})
    prune_seqlen: int = field(default=2048, metadata={"help": "Tokens per calibration window."})


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
    if Path(name).exists():
        dataset = load_dataset("json", data_files=name, split="train")
    else:
        dataset = load_dataset(name, split=split)
    missing = {"instruction", "output"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"{name} is not in Alpaca format: missing columns {sorted(missing)}.")
    return dataset


def as_text(example: dict) -> str:
    context = f"\n{example['input']}" if example.get("input") else ""
    return f"{example['instruction']}{context}\n{example['output']}"


def read_texts(path: str) -> list[str]:
    if path.endswith(".jsonl"):
        return [json.loads(line)["text"] for line in Path(path).read_text().splitlines() if line.strip()]
    return [Path(path).read_text()]


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def summary_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def run(default_model: str, argv: list[str] | None = None) -> dict:
    """Parse the arguments and run one recipe; returns (and prints) the summary."""
    parser = TrlParser((RecipeArguments, PruningArguments, SEFTConfig, ModelConfig))
    recipe, pruning, args, model_args = parser.parse_args_and_config(argv)
    model_name = model_args.model_name_or_path or default_model
    if pruning.prune_method is not None:  # check the pruning options before loading anything
        resolve_options(pruning.prune_method, pruning.prune_sparsity, pruning.prune_pattern)
    started = time.perf_counter()

    tokenizer = AutoTokenizer.from_pretrained(model_name, revision=model_args.model_revision)
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    model = AutoModelForCausalLM.from_pretrained(
        model_name, revision=model_args.model_revision, dtype=dtype, attn_implementation=model_args.attn_implementation
    )
    model.to(args.device)

    records = load_alpaca(recipe.dataset_name, recipe.dataset_split).shuffle(seed=args.seed)
    if recipe.max_train_samples is not None:
        records = records.select(range(min(len(records), recipe.max_train_samples + 1)))
    n_heldout = max(1, int(len(records) * recipe.heldout_fraction))
    heldout, train_records = records.select(range(n_heldout)), records.select(range(n_heldout, len(records)))
    eval_texts = read_texts(recipe.eval_text) if recipe.eval_text else [as_text(r) for r in heldout]

    def measure() -> float:
        return perplexity(model, tokenizer, eval_texts, seqlen=recipe.eval_seqlen)

    results: dict[str, float | str | None] = {"model": model_name, "dense_ppl": None}
    if pruning.prune_method is not None:
        results["dense_ppl"] = measure()
        calibration = read_texts(pruning.prune_calibration) if pruning.prune_calibration else [
            as_text(r) for r in train_records
        ]
        prune(
            model,
            method=pruning.prune_method,
            sparsity=pruning.prune_sparsity,
            pattern=pruning.prune_pattern,
            calibration=calibration if pruning.prune_method != "magnitude" else None,
            tokenizer=tokenizer,
            nsamples=pruning.prune_nsamples,
            seqlen=pruning.prune_seqlen,
            seed=args.seed,
            progress=True,
        )
    results["pruned_ppl"] = measure()
    results["pruned_sparsity"] = sparsity_report(model).sparsity

    conversational = tokenizer.chat_template is not None
    train_dataset = train_records.map(
        lambda r: to_prompt_completion(r, conversational), remove_columns=train_records.column_names
    )
    trainer = SEFTSFTTrainer(model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer)
    trainer.train()
    trainer.save_model()
    model.eval()
    results["repaired_ppl"] = measure()
    results["repaired_sparsity"] = sparsity_report(model).sparsity
    results["wall_time_s"] = time.perf_counter() - started
    results["peak_memory_gb"] = peak_memory_gb(args.device)

    def fmt(value) -> str:
        return "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)

    rows = [
        ("model", model_name),
        ("perplexity dense", fmt(results["dense_ppl"])),
        ("perplexity pruned", fmt(results["pruned_ppl"])),
        ("perplexity repaired (SEFT)", fmt(results["repaired_ppl"])),
        ("sparsity pruned / repaired", f"{results['pruned_sparsity']:.2%} / {results['repaired_sparsity']:.2%}"),
        ("wall time", f"{results['wall_time_s']:.0f} s"),
        ("peak memory", f"{results['peak_memory_gb']:.1f} GB ({'GPU' if args.device.type == 'cuda' else 'RSS'})"),
    ]
    if trainer.args.should_save:
        print(summary_table(rows), file=sys.stdout)
        (Path(args.output_dir) / recipe.summary_file).write_text(json.dumps(results, indent=2) + "\n")
    return results
