"""The option classes of every front end: one dataclass per concern, parsed by ``TrlParser``.

``seft-trl`` (prune, repair, eval, report), the recipe scripts and the demo all combine these with
TRL's ``ModelConfig`` and :class:`~seft_trl.SEFTConfig`, so an option has one name, one help text
and one check, on the command line and in a YAML ``--config`` alike. Each class checks itself in
``__post_init__``, so a bad value stops the command before a model loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..locations import check_model_location
from ..pruning import METHODS, PruningOptions, prune, resolve_options
from ..report import SparsityReport

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def option(default, help: str, *aliases: str, **metadata):
    """A dataclass field with help text and, for the first pruning CLI's flags, their old spellings."""
    extra = {"aliases": list(aliases)} if aliases else {}
    return field(default=default, metadata={"help": help, **extra, **metadata})


@dataclass
class CheckpointArguments:
    """A saved model to read, and where a command that writes one puts it (prune, eval, report)."""

    model_name_or_path: str | None = option(None, "A local folder of a Hugging Face causal LM (with its tokenizer).", "--model")
    output_dir: str | None = option(None, "The folder to write to (prune: must not exist unless --overwrite).", "--output")
    overwrite: bool = option(False, "Replace output_dir if it exists.")
    dtype: str = option("auto", "dtype to load (and save) in: auto (the checkpoint's), float32, bfloat16, float16.")
    device: str | None = option(None, "Where to compute: default cuda when available, else cpu.")
    seed: int = option(0, "Seed of the calibration windows.")

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: choose one of {', '.join(DTYPES)}.")

    def require_model(self, command: str) -> str:
        if not self.model_name_or_path:
            raise ValueError(f"{command} needs --model_name_or_path, the folder of the model to read.")
        check_model_location(self.model_name_or_path)
        return self.model_name_or_path

    def torch_dtype(self) -> torch.dtype | str:
        return DTYPES[self.dtype]


@dataclass
class PruningArguments:
    """One-shot pruning before repair (or as ``seft-trl prune``)."""

    prune_method: str | None = option(
        None, f"Prune with {', '.join(METHODS)}. Unset in a repair: the model is already pruned.", "--method"
    )
    prune_sparsity: float | None = option(None, "Unstructured sparsity (default 0.5); N:M implies it.", "--sparsity")
    prune_pattern: str = option("unstructured", "unstructured or N:M, e.g. 2:4.", "--pattern")
    prune_granularity: str | None = option(None, "magnitude only: layer (default) or row.", "--granularity")
    prune_calibration: str | None = option(
        None, "Calibration text: a .txt/.jsonl/.json file or a saved dataset folder (repair: default the training "
        "examples).", "--calibration",
    )
    prune_text_field: str = option("text", "Field holding the text in .jsonl/.json/dataset calibration.", "--text-field")
    prune_nsamples: int = option(128, "Calibration windows.", "--nsamples")
    prune_seqlen: int = option(2048, "Tokens per calibration window.", "--seqlen")
    prune_target_modules: list[str] | None = option(
        None, "Linear layer names to prune (suffix match); default every nn.Linear but lm_head.", "--target-modules"
    )

    def __post_init__(self) -> None:
        self.options()  # also when no method is set: a pattern given with it is checked all the same
        if self.prune_calibration is not None and not Path(self.prune_calibration).exists():
            raise ValueError(f"prune_calibration={self.prune_calibration!r} does not exist; give a file or folder.")

    def options(self) -> PruningOptions:
        """The validated method, sparsity, pattern and granularity (raises ValueError)."""
        return resolve_options(self.prune_method or "wanda", self.prune_sparsity, self.prune_pattern, self.prune_granularity)

    def calibration_source(self) -> Path | None:
        return Path(self.prune_calibration) if self.prune_calibration else None

    def prune(self, model, tokenizer, *, seed: int, fallback_calibration: list[str] | None = None,
              device: str | None = None) -> SparsityReport:
        """Prune ``model`` in place with these options; calibrate on ``prune_calibration`` or the fallback texts."""
        options = self.options()
        return prune(
            model,
            method=options.method,
            sparsity=options.sparsity,
            pattern=str(options.pattern),
            calibration=self.calibration_source() or fallback_calibration,
            tokenizer=tokenizer,
            nsamples=self.prune_nsamples,
            seqlen=self.prune_seqlen,
            target_modules=self.prune_target_modules,
            seed=seed,
            granularity=self.prune_granularity,
            device=device,
            text_field=self.prune_text_field,
            progress=True,
        )


@dataclass
class ParentArguments:
    """The dense parent of a repair: the model before pruning, as distillation teacher and revival source."""

    use_parent: bool = option(
        True, "Repair with the dense parent when it is known and --teacher_model_name_or_path is unset: the model "
        "loaded before --prune_method, or the parent a pruned checkpoint records (pruning_config.parent). false: "
        "plain CE, revived weights start at zero."
    )


@dataclass
class DataArguments:
    """The instruction data of a repair."""

    dataset_name: str = option(
        "tatsu-lab/alpaca", "Alpaca-format data (instruction, input, output): a hub dataset or a local .json/.jsonl file."
    )
    dataset_split: str = option("train", "Split of dataset_name to use.")
    max_train_samples: int | None = option(None, "Use at most this many training examples.")
    heldout_fraction: float = option(
        0.02, "Fraction of the examples held out (never trained on) for perplexity when no eval_text is given."
    )
    summary_file: str = option("summary.json", "Summary written into output_dir.")

    def __post_init__(self) -> None:
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction={self.heldout_fraction}: choose a fraction in (0, 1).")


@dataclass
class EvalArguments:
    """Perplexity (and optionally the zero-shot suite of the pruning papers)."""

    eval_text: str | None = option(
        None, "A local .txt/.jsonl/.json file or saved dataset folder for perplexity (e.g. WikiText-2's test split)."
    )
    eval_seqlen: int = option(
        2048, "Perplexity window (non-overlapping). A text shorter than one window is measured with one window of "
        "all its tokens, and the summary says so."
    )
    eval_tasks: list[str] | None = option(
        None, "Zero-shot lm-evaluation-harness tasks (e.g. boolq rte hellaswag); needs the eval extra.",
    )
    eval_limit: float | None = option(None, "Examples per zero-shot task (a count, or a fraction if < 1).")

    def __post_init__(self) -> None:
        if self.eval_seqlen < 2:
            raise ValueError(f"eval_seqlen={self.eval_seqlen}: a window needs at least 2 tokens.")
        if self.eval_text is not None and not Path(self.eval_text).exists():
            raise ValueError(f"eval_text={self.eval_text!r} does not exist; give a file or folder.")

    def eval_source(self) -> Path | None:
        return Path(self.eval_text) if self.eval_text else None
