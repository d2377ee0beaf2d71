"""Repair quality: SEFT against the sparsity-preserving baselines on a real pruned model.

SmolLM2-135M-Instruct is pruned with Wanda (50% unstructured, 2:4, 70%) and fine-tuned by every
method on the same token budget in the same data order, with the same loop (AdamW, no weight decay,
linear warm-up then cosine decay, gradient clipping at 1.0). Methods (see baselines.py):

* ``dense``: the unpruned model, evaluated only (the top of the "gap recovered" scale);
* ``pruned``: no fine-tuning (the bottom of it);
* ``lora``: peft LoRA r=8 merged, dense (sparsity lost: the reference row);
* ``lora*``: the same LoRA run merged, then re-pruned with Wanda to the target pattern;
* ``masked_lora`` (SQFT), ``spp`` (SPP-style scaling), ``masked_full`` (masked full fine-tuning);
* ``fixed_deltas``: sparse deltas on a fixed random support (SEFT with evolution off);
* ``seft`` and its ablations (one engine option changed each; see ``Regime.ablations``).

Trainable counts match LoRA r=8 on the 7 projections (sparse deltas get exactly that many; masked
full fine-tuning trains every surviving weight). The learning rate of each method is picked on a
small grid at 50% (extended while the best point is at its edge) by perplexity on validation
articles (never trained on, never reported as the result) and reused at 2:4 and 70%; ablations
reuse SEFT's. The reported number is perplexity on held-out articles. The headline rows (SEFT and
the best sparsity-preserving baseline of each pattern) are repeated with more seeds; a seed changes
the data order and the initialisation.

Two regimes (``--regime``), each with its own run log, report and chart:

* ``short`` (default): 32 steps × 4 × 128 tokens on the Lee news corpus, SEFT's cadence scaled to
  the run (interval = steps // 8, window = interval // 2); ~2.5 h on 2 cores;
* ``long``: 256 steps × 4 × 256 tokens (one epoch of Wikipedia articles), SEFT at the engine's
  default cadence, more ablations (at 50%; revival's also at 2:4 and 70%); about 45 runs of 6-17 s a
  step on a 2-core AMD EPYC (30-60 min a run, the pace varies between sessions; the short results'
  Xeon was ~2.7× faster), so it spans many sessions.

Every finished run is appended to ``<stem>_runs.csv`` (``quality_runs.csv``,
``quality_long_runs.csv``), so an interrupted benchmark resumes where it stopped, and the run in progress is checkpointed
every ``--checkpoint-every`` steps under ``partial/`` (and at ``--stop-after``), so it resumes mid-run; ``--methods``
restricts what may run, ``--report-only`` rebuilds the Markdown and the chart from the file (a run
not there yet is shown as pending). Every report ends with ``<stem>_notes.md`` from the same folder
(what a reader of the numbers must know, e.g. which runs shared the machine), kept in git like the
log, and with this invocation's ``--remark``. The committed results folder already holds every short run,
so measure afresh into another ``--output-dir``.

    python benchmarks/quality.py --output-dir DIR                 # short (make bench-quality)
    python benchmarks/quality.py --regime long --output-dir DIR   # long (make bench-quality-long)
    python benchmarks/quality.py --regime long --methods lora,masked_lora,spp,masked_full --output-dir DIR
    python benchmarks/quality.py --quick [--regime long] --output-dir /tmp/q   # tiny random model, seconds
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable

from common import RESULTS_DIR, contention_note, cpu_snapshot
from quality_plan import Benchmark
from quality_regimes import (EVALUATION_ONLY, LONG, NARROW, PATTERNS, REGIMES, SCREEN, SHORT, Regime, logged_rates,
                             trained_name)
from quality_runs import OutOfTime
from quality_chart import plot
from quality_report import write_results
from quality_workloads import Workload, lee_workload, narrow_workload, quick_workload, scaled_cadence, wikipedia_workload


def build_workload(args: argparse.Namespace, regime: Regime) -> Workload:
    narrow = regime in (SCREEN, NARROW)
    if args.quick:
        return quick_workload(args.steps or 8, long=regime in (LONG, NARROW), narrow=narrow)
    steps, seqlen = args.steps or regime.steps, args.seqlen or regime.seqlen
    if regime is LONG:
        return wikipedia_workload(steps, args.batch_size, seqlen, args.eval_seqlen, args.rank)
    if narrow:
        cadence, share = (scaled_cadence(steps), 0.5) if regime is SCREEN else ({}, 1.0)
        return narrow_workload(steps, args.batch_size, seqlen, args.eval_seqlen, args.rank, args.val_articles, cadence,
                               share)
    return lee_workload(steps, args.batch_size, seqlen, args.eval_seqlen, args.rank, args.val_articles)


def borrowed_rates(args: argparse.Namespace, regime: Regime) -> Callable[[str], float]:
    """The chosen learning rate of each method in the regime ``regime`` takes its rates from, read from its log."""
    source = REGIMES[regime.rates_from]
    if args.quick:  # the smoke test: the middle of the lender's grid, without its runs
        return lambda method: sorted(source.grids["lora" if method == "lora*" else method])[1]
    return logged_rates(source, Path(args.rates_dir or args.output_dir))


def runnable_methods(args: argparse.Namespace, regime: Regime, parser: argparse.ArgumentParser) -> frozenset[str]:
    """What may run: nothing under --report-only; else --methods (default all) and the evaluation-only rows."""
    if args.report_only:
        return frozenset()
    if not args.methods:
        return frozenset(regime.methods)
    chosen = {name.strip() for name in args.methods.split(",") if name.strip()}
    unknown = chosen - set(regime.methods)
    if unknown:
        parser.error(f"unknown --methods {sorted(unknown)} for the {regime.name} regime; choose from "
                     f"{', '.join(regime.methods)}")
    chosen |= {trained_name(name) for name in chosen}  # lora* comes from lora's runs
    return frozenset(chosen | set(EVALUATION_ONLY))


def runnable_patterns(args: argparse.Namespace, parser: argparse.ArgumentParser) -> frozenset[str] | None:
    """Where runs may start: --patterns, or everywhere (None)."""
    chosen = {name.strip() for name in args.patterns.split(",") if name.strip()}
    unknown = chosen - set(PATTERNS)
    if unknown:
        parser.error(f"unknown --patterns {sorted(unknown)}; choose from {', '.join(PATTERNS)}")
    return frozenset(chosen) or None


def build_parser() -> argparse.ArgumentParser:
    """The command line; help strings escape ``%`` because argparse formats them (``70%`` is a pattern)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--regime", choices=sorted(REGIMES), default="short")
    add("--steps", type=int, default=None, help="optimizer steps per run (default: short 32, long 256; --quick 8)")
    add("--batch-size", type=int, default=4)
    add("--seqlen", type=int, default=None, help="tokens per training sequence (default: short 128, long 256)")
    add("--eval-seqlen", type=int, default=512)
    add("--rank", type=int, default=8, help="LoRA rank that sets every method's trainable count")
    add("--seeds", type=int, default=2, help="seeds of the headline rows")
    add("--val-articles", type=int, default=24, help="short regime: training-side articles kept for validation")
    add("--methods", default="", help="comma-separated methods that may run (default all); others are read "
                                      "from the run log or left pending")
    add("--patterns", default="", help=f"comma-separated patterns where runs may start (default all: "
                                       f"{', '.join(PATTERNS).replace('%', '%%')}); the plan's runs elsewhere wait, as outside --methods")
    add("--quick", action="store_true", help="tiny random model, one learning rate (short: one seed): a smoke test")
    add("--report-only", action="store_true", help="rebuild the report and the chart from the run log")
    add("--output-dir", default=str(RESULTS_DIR))
    add("--remark", default="", help="a sentence for this invocation's report only; what should stay in every "
                                     "report (e.g. what disturbed earlier runs' wall times) belongs in "
                                     "<output-dir>/<stem>_notes.md, which every report ends with")
    add("--stop-after", type=float, default=None, metavar="SECONDS",
        help="pause after this long: the run in progress is checkpointed and the next invocation resumes it; "
             "no run starts that its method's median logged wall time would not finish")
    add("--rates-dir", default=None, help="the folder of the run log whose chosen learning rates the narrow regime "
                                          "reuses (the long regime's; default --output-dir)")
    add("--start-any", action="store_true",
        help="with --stop-after, start a run even when it cannot finish in time: it pauses at a checkpoint in "
             "<output-dir>/partial/, which the next invocation on this machine resumes")
    add("--checkpoint-every", type=int, default=16, metavar="STEPS",
        help="save the run in progress this often, so even a killed benchmark loses little")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    regime = REGIMES[args.regime]
    if args.quick and regime is SHORT:
        args.seeds = 1
    runnable = runnable_methods(args, regime, parser)
    patterns = runnable_patterns(args, parser)
    folder = Path(args.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    started, snapshot = time.perf_counter(), cpu_snapshot()

    work = build_workload(args, regime)
    deadline = None if args.stop_after is None else time.monotonic() + args.stop_after
    bench = Benchmark(regime, work, folder / f"{regime.stem}_runs.csv", args.seeds, args.quick, runnable,
                      deadline=deadline, checkpoint_every=args.checkpoint_every, start_any=args.start_any,
                      patterns=patterns)
    if regime.rates_from is not None:
        bench.rates = borrowed_rates(args, regime)
    if runnable:
        try:
            bench.run_plan()
        except OutOfTime as paused:
            print(f"--stop-after reached: {paused}; run the same command again to resume.", flush=True)
        bench.runnable = frozenset()  # the report reads the log; it never starts a run
    notes = folder / f"{regime.stem}_notes.md"
    kept_notes = notes.read_text().strip() if notes.exists() else ""
    note = f"{args.remark} {contention_note(snapshot)}".strip()
    write_results(bench, folder, time.perf_counter() - started, "\n\n".join(filter(None, (kept_notes, note))))
    plot(bench, folder / f"{regime.stem}.png")
    print(f"\nWritten to {folder}/{regime.stem}.md, {regime.stem}.png, {regime.stem}_runs.csv")


if __name__ == "__main__":
    main()
