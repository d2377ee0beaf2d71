"""``seft-trl prune``: prune a Hugging Face causal LM one-shot and save it as a plain checkpoint.

    seft-trl prune --model_name_or_path PATH --prune_method wanda --prune_sparsity 0.5 \\
        --prune_calibration FILE --output_dir DIR
    python -m seft_trl.prune --model PATH --method wanda --sparsity 0.5 --calibration FILE --output DIR

The output folder gets the pruned model (safetensors, exact zeros, ``pruning_config`` in its
config.json), its tokenizer, and ``sparsity_report.json`` (per-layer sparsity, pattern check and
the options used). It is written to a temporary folder next to DIR and renamed at the end. Every
option is checked before the model loads. The first spellings of the flags (``--model``,
``--method``, ...) still work.
"""

from __future__ import annotations

from trl import TrlParser

from ..saving import check_target, save_checkpoint
from .noise import silence_import_noise
from .options import CheckpointArguments, PruningArguments

PRUNE_ARGUMENTS = (CheckpointArguments, PruningArguments)


def prune_checkpoint(checkpoint: CheckpointArguments, pruning: PruningArguments) -> dict:
    """Load, prune and save; returns the saved sparsity report (with its ``pruning`` provenance)."""
    if not checkpoint.model_name_or_path:
        raise ValueError("prune needs --model_name_or_path, the folder of the model to read.")
    if not checkpoint.output_dir:
        raise ValueError("prune needs --output_dir, the folder to write the pruned checkpoint to.")
    options = pruning.options()
    calibration = pruning.calibration_source()
    if options.method != "magnitude" and calibration is None:
        raise ValueError(f"--prune_method {options.method} needs --prune_calibration (a text file); only magnitude needs none.")
    output = check_target(checkpoint.output_dir, checkpoint.overwrite)
    model_path = checkpoint.require_model("prune")  # options first: they need no file system

    from transformers import AutoModelForCausalLM, AutoTokenizer  # slow import: only once the arguments are valid

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=checkpoint.torch_dtype())
    report = pruning.prune(model, tokenizer, seed=checkpoint.seed, device=checkpoint.device)
    provenance = {**model.config.pruning_config, "model": model_path}
    if calibration is not None:
        provenance["calibration"] = str(calibration)
    report_json = {"pruning": provenance, **report.as_dict()}
    save_checkpoint(model, tokenizer, output, {"sparsity_report.json": report_json})
    print(report.table().splitlines()[-1])
    print(f"Saved to {output}")
    return report_json


def main(argv: list[str] | None = None, prog: str = "python -m seft_trl.prune") -> None:
    silence_import_noise()  # before prune_checkpoint imports transformers' model code
    parser = TrlParser(PRUNE_ARGUMENTS, prog=prog, description=__doc__.split("\n\n")[0])
    try:
        checkpoint, pruning = parser.parse_args_and_config(argv)
        prune_checkpoint(checkpoint, pruning)
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        parser.error(str(error))  # exit status 2, with the usage line


if __name__ == "__main__":
    main()
