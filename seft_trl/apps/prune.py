"""Command line: prune a Hugging Face causal LM one-shot and save it as a plain checkpoint.

    python -m seft_trl.prune --model PATH --method wanda --sparsity 0.5 --pattern unstructured \\
        --calibration FILE --output DIR

The output folder gets the pruned model (safetensors, exact zeros), its tokenizer, and
``sparsity_report.json`` (per-layer sparsity, pattern check and the options used). It is written to
a temporary folder next to DIR and renamed at the end. Options are checked before the model loads.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from ..pruning import METHODS, prune, resolve_options
from ..saving import check_target, save_checkpoint

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m seft_trl.prune", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--model", required=True, help="local folder of a Hugging Face causal LM (with its tokenizer)")
    add("--output", required=True, help="folder to write the pruned checkpoint to (must not exist)")
    add("--method", choices=METHODS, default="wanda")
    add("--sparsity", type=float, default=None, help="fraction pruned in [0, 1); default 0.5; N:M implies it")
    add("--pattern", default="unstructured", help="'unstructured' or N:M such as 2:4 or 4:8")
    add("--granularity", choices=("layer", "row"), default=None, help="magnitude only; default layer")
    add("--calibration", help="calibration text: a .txt or .jsonl file, or a folder saved by datasets")
    add("--text-field", default="text", help="field holding the text in .jsonl / dataset calibration")
    add("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    add("--seqlen", type=int, default=2048, help="tokens per calibration window (default 2048)")
    add("--seed", type=int, default=0, help="seed of the calibration window offsets")
    add("--target-modules", nargs="+", default=None, help="linear names (suffix match); default: all but lm_head")
    add("--dtype", choices=DTYPES, default="auto", help="dtype to load and save in; default: the checkpoint's")
    add("--device", default=None, help="where layers are pruned; default: cuda when available, else cpu")
    add("--overwrite", action="store_true", help="replace --output if it exists")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        options = resolve_options(args.method, args.sparsity, args.pattern, args.granularity)
        output = check_target(args.output, args.overwrite)
    except (ValueError, FileExistsError) as error:
        parser.error(str(error))
    if options.method != "magnitude" and args.calibration is None:
        parser.error(f"--method {options.method} needs --calibration (a text file); only magnitude needs no data.")
    if args.calibration is not None and not os.path.exists(args.calibration):
        parser.error(f"--calibration {args.calibration!r} does not exist.")

    from transformers import AutoModelForCausalLM, AutoTokenizer  # slow import: only once the arguments are valid

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=DTYPES[args.dtype])
    try:
        report = prune(
            model,
            method=options.method,
            sparsity=options.sparsity,
            pattern=str(options.pattern),
            calibration=args.calibration if options.method != "magnitude" else None,
            tokenizer=tokenizer,
            nsamples=args.nsamples,
            seqlen=args.seqlen,
            target_modules=args.target_modules,
            seed=args.seed,
            granularity=args.granularity,
            device=args.device,
            text_field=args.text_field,
            progress=True,
        )
    except ValueError as error:
        sys.exit(f"error: {error}")
    provenance = {**options.as_dict(), "model": args.model}
    if options.method != "magnitude":
        provenance.update(calibration=args.calibration, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
    report_json = {"pruning": provenance, **report.as_dict()}
    save_checkpoint(model, tokenizer, output, {"sparsity_report.json": report_json})
    print(report.table().splitlines()[-1])
    print(f"Saved to {output}")


if __name__ == "__main__":
    main()
