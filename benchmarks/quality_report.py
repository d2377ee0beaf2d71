"""The quality benchmark's report: Markdown tables and a chart, built from the run log only.

Every number comes from a logged run; a result the plan needs but the log does not hold yet is
written as "pending", never estimated. The same layout serves both regimes.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Callable, TypeVar

import torch

from common import machine_description, markdown_table
from quality_plan import Benchmark
from quality_regimes import BASE_METHODS, FIRST_PATTERN, PATTERNS, SHORT, SPARSE_BASELINES, UNPRUNED
from quality_regimes import fixed_support_of, split_budget, split_method
from quality_runs import Pending, RunResult
from seft_trl import SparsityEvolutionConfig

PENDING = "pending"
RUN_COLUMNS = ["pattern", "method", "lr", "trainable", "val ppl (seed 0)", "test ppl", "gap recovered", "sparsity",
               "sparsity kept", "revived", "nnz growth", "train s", "run s"]
T = TypeVar("T")


def known(lookup: Callable[[], T]) -> T | None:
    """``lookup()``, or None when it needs a run that is pending."""
    try:
        return lookup()
    except Pending:
        return None


def half_range(values: list[float]) -> float:
    """Half the spread over seeds: the ± of the tables and the chart's error bars, so the two always agree."""
    return (max(values) - min(values)) / 2


def spread(values: list[float], digits: int = 2, unit: str = "") -> str:
    """Mean ± half-range over seeds (a single value as it is)."""
    mean = f"{statistics.mean(values):.{digits}f}{unit}"
    if len(values) == 1:
        return mean
    return f"{mean} ± {half_range(values):.{digits}f}{unit} (n={len(values)})"


def runs_of(bench: Benchmark, pattern: str, method: str) -> list[RunResult]:
    """Every seed of ``method`` at ``pattern`` at its chosen rate; [] while pending."""
    return known(lambda: bench.seed_runs(pattern, method)) or []


def gap_recovered(bench: Benchmark, pattern: str, test_ppl: float) -> float | None:
    """(ln ppl_pruned − ln ppl) / (ln ppl_pruned − ln ppl_dense) on the test split; None while pending.

    In log space because perplexity is exp(mean NLL): the fraction of the NLL gap closed.
    """
    dense = runs_of(bench, UNPRUNED, "dense")
    pruned = runs_of(bench, pattern, "pruned")
    if not (dense and pruned):
        return None
    bottom, top = math.log(pruned[0].test_ppl), math.log(dense[0].test_ppl)
    return (bottom - math.log(test_ppl)) / (bottom - top)


def seed_gaps(bench: Benchmark, pattern: str, runs: list[RunResult]) -> list[float] | None:
    """Each seed's gap recovered in percent (the tables' and the chart's); None while dense or pruned is pending."""
    gaps = [gap_recovered(bench, pattern, run.test_ppl) for run in runs]
    if any(gap is None for gap in gaps):
        return None
    return [100 * gap for gap in gaps]


def gap_cell(bench: Benchmark, pattern: str, runs: list[RunResult]) -> str:
    gaps = seed_gaps(bench, pattern, runs)
    return PENDING if gaps is None else spread(gaps, digits=1, unit="%")


# ------------------------------------------------------------------------------------------ tables
def run_columns(bench: Benchmark) -> list[str]:
    """RUN_COLUMNS with a column per extra held-out text of the workload, and the peak memory."""
    extra = [f"{name} ppl" for name in bench.work.extra_evals]
    return [*RUN_COLUMNS[:6], *extra, *RUN_COLUMNS[6:], "peak RSS MiB"]


def extra_ppls(runs: list[RunResult], name: str) -> list[float]:
    return [value for run in runs if (value := run.extra_ppl(name)) is not None]


def run_row(bench: Benchmark, pattern: str, method: str) -> list[str]:
    runs = runs_of(bench, pattern, method)
    if not runs:
        return [pattern, method] + [PENDING] * (len(run_columns(bench)) - 2)
    first = runs[0]
    growth = [run.nonzero_growth for run in runs if run.nonzero_growth is not None]
    walls = [run.wall_s for run in runs if not math.isnan(run.wall_s)]
    peaks = [run.peak_rss_mb for run in runs if not math.isnan(run.peak_rss_mb)]
    extra = [spread(values) if (values := extra_ppls(runs, name)) else "-" for name in bench.work.extra_evals]
    return [
        pattern, method, f"{first.lr:g}" if first.lr else "-", f"{first.trainable:,}", f"{first.val_ppl:.2f}",
        spread([run.test_ppl for run in runs]), *extra,
        "-" if method == "dense" else gap_cell(bench, pattern, runs),
        f"{statistics.mean(run.sparsity for run in runs):.2%}",
        "-" if method == "dense" else "yes" if all(run.sparsity_kept for run in runs) else "**no**",
        f"{first.revived:,}" if split_method(method)[0].startswith("seft") else "-",
        f"{max(growth):,}" if growth else "-",
        f"{statistics.mean(run.train_s for run in runs):.0f}",
        f"{statistics.mean(walls):.0f}" if walls else "-",
        f"{statistics.mean(peaks):.0f}" if peaks else "-",
    ]


def planned_at(bench: Benchmark, pattern: str) -> list[str]:
    """The methods the regime's plan runs at ``pattern`` (or has logged there), in the plan's order."""
    regime = bench.regime
    tuned = [m for m in BASE_METHODS if m != "dense" and m in (*regime.tuned, "pruned")]
    if pattern != FIRST_PATTERN and not regime.tuned_everywhere:
        tuned = ["pruned"]
    planned = [step.method for step in regime.plan if pattern in step.patterns]
    planned += [f"lora*+{split_method(m)[1]}" for m in planned if split_method(m)[0] == "lora"]
    if pattern == FIRST_PATTERN or regime.tuned_everywhere:
        planned += [m for m in regime.tuned if "+" in m]
    logged = [m for (p, m, _, _) in bench.runs if p == pattern]
    return list(dict.fromkeys([*tuned, *regime.ablations_at(pattern), *planned, *logged]))


def all_run_rows(bench: Benchmark) -> list[list[str]]:
    """The dense row, then per pattern every method the plan runs there."""
    rows = [run_row(bench, UNPRUNED, "dense")]
    for pattern in PATTERNS:
        rows += [run_row(bench, pattern, method) for method in planned_at(bench, pattern)]
    return rows


# ----------------------------------------------------------------------------- the dense parent
PARENT_BASELINES = ("lora*", "masked_lora", "spp", "fixed_deltas")  # SEFT's trainable count, as SEFT+kd


def parent_rows(bench: Benchmark, teaching: str = "kd") -> list[list[str]]:
    """Each method with CE and with the parent's loss, at every pattern (test, and the domain's test if any)."""
    extra = [name for name in bench.work.extra_evals if name.endswith("test")]
    rows = []
    for pattern in PATTERNS:
        for method in ("seft", "fixed_deltas", "masked_lora", "spp", "lora*", "masked_full"):
            ce, kd = heldout_ppls(bench, pattern, method), heldout_ppls(bench, pattern, f"{method}+{teaching}")
            if not (ce or kd or f"{method}+{teaching}" in planned_at(bench, pattern)):
                continue
            change = f"{statistics.mean(kd) / statistics.mean(ce) - 1:+.1%}" if ce and kd else "-"
            cells = [pattern, method, spread(ce) if ce else PENDING, spread(kd) if kd else PENDING, change]
            for name in extra:
                ce_x = extra_ppls(runs_of(bench, pattern, method), name)
                kd_x = extra_ppls(runs_of(bench, pattern, f"{method}+{teaching}"), name)
                cells += [spread(ce_x) if ce_x else PENDING, spread(kd_x) if kd_x else PENDING]
            rows.append(cells)
    return rows


def parent_goal_rows(bench: Benchmark) -> list[list[str]]:
    """G1 (SEFT with the parent vs the best CE baseline), G2 (vs each baseline with the parent), G3 (vs fixed support)."""
    rows = []
    for pattern in PATTERNS:
        seft = heldout_ppls(bench, pattern, "seft+kd")
        ce = {m: values for m in SPARSE_BASELINES if (values := heldout_ppls(bench, pattern, m))}
        best = min(ce, key=lambda m: runs_of(bench, pattern, m)[0].val_ppl) if ce else None  # chosen on validation
        g1 = PENDING
        if seft and best:
            ratio = statistics.mean(seft) / statistics.mean(ce[best])
            g1 = f"{ratio:.3f}× {best}'s {statistics.mean(ce[best]):.2f}" + (
                "" if len(ce) == len(SPARSE_BASELINES) else f" (best of {len(ce)} so far)")
        beaten = []
        for method in PARENT_BASELINES:
            other = heldout_ppls(bench, pattern, f"{method}+kd")
            if seft and other:
                beaten.append(f"{method} {statistics.mean(seft) / statistics.mean(other) - 1:+.1%}")
        fixed = heldout_ppls(bench, pattern, "fixed_deltas+kd")
        g3 = verdict(seft, fixed) if seft and fixed else PENDING
        rows.append([pattern, spread(seft) if seft else PENDING, g1, "; ".join(beaten) or PENDING, g3])
    return rows


def parent_section(bench: Benchmark) -> list[str]:
    if not bench.regime.teachings:
        return []
    extra = [name for name in bench.work.extra_evals if name.endswith("test")]
    headers = ["pattern", "method", "CE: test ppl", "+kd: test ppl", "change"]
    headers += [f"{label}: {name} ppl" for name in extra for label in ("CE", "+kd")]
    teachings = "; ".join(f"{name}: {teaching_text(teaching)}" for name, teaching in bench.regime.teachings.items())
    return [
        "## With the dense parent (CE vs distillation; test perplexity, mean ± half-range over seeds)", "",
        f"Teachings: {teachings}.", "",
        markdown_table(headers, parent_rows(bench)), "",
        "Goals with the parent: G1, SEFT+kd against the sparsity-preserving baseline trained with CE that is best on "
        "validation (ratio of test perplexities); G2, against each baseline at the same trainable count given the same "
        "distillation (negative: SEFT+kd lower); G3, against fixed support with distillation.", "",
        markdown_table(["pattern", "SEFT+kd", "G1: vs best CE baseline", "G2: vs each baseline +kd",
                        "G3: beats fixed_deltas+kd"], parent_goal_rows(bench)), "",
    ]


def teaching_text(teaching) -> str:
    loss = teaching.loss
    parts = [f"(1 - {loss.weight:g})·CE + {loss.weight:g}·"
             + {0.0: "KL(teacher ‖ student)", 1.0: "KL(student ‖ teacher)"}.get(loss.beta, f"JSD(β={loss.beta:g})")
             + (f" at temperature {loss.temperature:g}" if loss.temperature != 1.0 else "")]
    if loss.hidden_weight:
        parts.append(f"+ {loss.hidden_weight:g}·SquareHead")
    if teaching.engine:
        parts.append(", ".join(f"{key}={value}" for key, value in teaching.engine.items()))
    return " ".join(parts)


def heldout_ppls(bench: Benchmark, pattern: str, method: str) -> list[float]:
    """Test perplexity of every seed; [] while pending."""
    return [run.test_ppl for run in runs_of(bench, pattern, method)]


def goal_rows(bench: Benchmark) -> list[list[str]]:
    """SEFT against the sparsity-preserving baseline with the best test perplexity, per pattern."""
    rows = []
    for pattern in PATTERNS:
        seft = heldout_ppls(bench, pattern, "seft")
        done = {m: values for m in SPARSE_BASELINES if (values := heldout_ppls(bench, pattern, m))}
        if not done:
            rows.append([pattern, spread(seft) if seft else PENDING, PENDING, PENDING])
            continue
        best = min(done, key=lambda m: statistics.mean(done[m]))
        cell = f"{best}: {spread(done[best])}"
        if len(done) < len(SPARSE_BASELINES):
            cell += f" (best of {len(done)} of {len(SPARSE_BASELINES)} so far)"
        complete = seft and len(done) == len(SPARSE_BASELINES)
        rows.append([pattern, spread(seft) if seft else PENDING, cell,
                     verdict(seft, done[best]) if complete else PENDING])
    return rows


def fixed_support_rows(bench: Benchmark) -> list[list[str]]:
    """SEFT against the same sparse deltas on a fixed support: what topology evolution itself adds."""
    rows = []
    for pattern in PATTERNS:
        seft, fixed = heldout_ppls(bench, pattern, "seft"), heldout_ppls(bench, pattern, "fixed_deltas")
        rows.append([pattern, spread(seft) if seft else PENDING, spread(fixed) if fixed else PENDING,
                     verdict(seft, fixed) if seft and fixed else PENDING])
    return rows


def verdict(seft: list[float], baseline: list[float]) -> str:
    return "met" if statistics.mean(seft) < statistics.mean(baseline) else "**not met**"


def grid_rows(bench: Benchmark) -> list[list[str]]:
    """Every logged point of each method's grid at FIRST_PATTERN, the chosen one in bold."""
    rows = []
    for method in bench.regime.tuned:
        points = sorted((lr, run.val_ppl) for (pattern, m, lr, seed), run in bench.runs.items()
                        if (pattern, m, seed) == (FIRST_PATTERN, method, 0))
        best = known(lambda: bench.best_lr(method))
        cells = [f"**{lr:g}: {val:.2f}**" if lr == best else f"{lr:g}: {val:.2f}" for lr, val in points]
        if best is None:
            cells.append("grid pending")
        rows.append([method, "; ".join(cells)])
    return rows


def option_changes(bench: Benchmark, ablation: str) -> str:
    return ", ".join(f"{key}={value}" for key, value in bench.regime.ablations[ablation].items())


def ablation_rows(bench: Benchmark) -> list[list[str]]:
    rows = []
    for pattern in PATTERNS:
        seft = heldout_ppls(bench, pattern, "seft")
        for name in bench.regime.ablations_at(pattern):
            runs = runs_of(bench, pattern, name)
            change = option_changes(bench, name)
            if not runs:
                rows.append([pattern, name, change] + [PENDING] * 4)
                continue
            tests = [run.test_ppl for run in runs]
            versus = f"{statistics.mean(tests) / statistics.mean(seft) - 1:+.1%}" if seft else PENDING
            rows.append([pattern, name, change, spread(tests), versus, gap_cell(bench, pattern, runs),
                         swaps_cell(runs[0])])
    return rows


SWAPS_HEADER = "moved / revived / refused"


def swaps_cell(run: RunResult) -> str:
    """Deltas moved, pruned weights revived and swaps the test refused over the run (seed 0's run).

    Runs logged before the moves and refusals were counted show only their revivals.
    """
    if run.swapped is None:
        return f"- / {run.revived:,} / -"
    return f"{run.swapped:,} / {run.revived:,} / {run.refused:,}"


def fixed_rate_section(bench: Benchmark) -> list[str]:
    if not bench.regime.at_fixed_rate:
        return []
    rows = fixed_rate_rows(bench)
    return [f"## At fixed support's learning rate ({FIRST_PATTERN}, seed 0; vs fixed support: test perplexity)", "",
            "Where evolution's best rate differs from fixed support's, these runs say which part of evolution fails "
            "at the rate fixed support prefers.", "",
            markdown_table(["method", "change", "lr", "val ppl", "test ppl", "vs fixed support", SWAPS_HEADER],
                           rows),
            ""]


def fixed_rate_rows(bench: Benchmark) -> list[list[str]]:
    """For each budget of the listed ablations: fixed support at its chosen rate, then SEFT and the
    ablations at that same rate (seed 0)."""
    by_fixed: dict[str, list[str]] = {}
    for name in bench.regime.at_fixed_rate:
        by_fixed.setdefault(fixed_support_of(name), []).append(name)
    rows = []
    for fixed_method, ablations in by_fixed.items():
        lr = known(lambda: bench.best_lr(fixed_method))
        if lr is None:
            rows.append([fixed_method, "drop_fraction=0.0"] + [PENDING] * 5)
            continue
        seft = fixed_method.replace("fixed_deltas", "seft", 1)
        changes = {fixed_method: "drop_fraction=0.0", seft: "-"}
        changes |= {name: option_changes(bench, split_budget(name)[0]) for name in ablations}
        fixed = bench.runs[(FIRST_PATTERN, fixed_method, lr, 0)]
        for method, change in changes.items():
            run = bench.runs.get((FIRST_PATTERN, method, lr, 0))
            if run is None:
                rows.append([method, change, f"{lr:g}"] + [PENDING] * 4)
                continue
            rows.append([method, change, f"{lr:g}", f"{run.val_ppl:.2f}", f"{run.test_ppl:.2f}",
                         f"{run.test_ppl / fixed.test_ppl - 1:+.1%}", swaps_cell(run)])
    return rows


# ------------------------------------------------------------------------------------------- setup
def setup_lines(bench: Benchmark) -> list[str]:
    """The protocol, as the benchmark ran it: corpus, budget, cadence, learning rates, seeds, checks."""
    work = bench.work
    epoch = ("one epoch: no sequence is repeated within a run" if work.steps * work.batch_size <= len(work.train_ids)
             else "the text repeats in later epochs")
    return [
        f"- Text: {work.corpus}; {work.train_ids.numel():,} training tokens in {len(work.train_ids):,} sequences of "
        f"{work.seqlen}.",
        f"- Pruning: Wanda with {work.calibration['nsamples']} calibration windows of {work.calibration['seqlen']} "
        "tokens from the training articles, on the 7 projections of every decoder layer.",
        f"- Fine-tuning: {work.steps} steps × {work.batch_size} sequences × {work.seqlen} tokens = {work.tokens:,} "
        f"training tokens ({epoch}), the same batches in the same order for every method (seed s: order s); "
        "AdamW, weight decay 0, warm-up then cosine decay, gradient clipping 1.0; plain causal-LM loss.",
        f"- Trainable parameters: {lora_count(bench)} (LoRA r={work.rank} on q/k/v/o/gate/up/down) for every method "
        "but masked full fine-tuning, which trains every surviving projection weight.",
        cadence_line(bench),
        grid_line(bench),
        f"- Seeds: SEFT and the sparsity-preserving baseline with the best validation perplexity of each pattern "
        f"run with {bench.seeds} seed(s) (a seed sets the data order and the initialisation); ± is the half-range.",
        f"- Perplexity: non-overlapping windows of {work.eval_seqlen} tokens; validation = {len(work.val_ids):,} "
        f"tokens, {work.val_source} (used only to pick the learning rate and the headline baseline); "
        f"test = {len(work.test_ids):,} tokens, {work.test_source}."
        + "".join(f" {name}: {len(ids):,} tokens, {work.extra_sources[name]}." for name, ids in work.extra_evals.items()),
        "- With the dense parent (methods `+kd`): the unpruned model is the teacher of the same loss for every method "
        "(seft_trl.distillation: CE mixed with a divergence from its next-token distribution, chunked), and SEFT-engine "
        "methods start revived weights at its values unless the teaching says otherwise; peak RSS is the benchmark "
        "process's over the run, the teacher included.",
        "- Gap recovered: (ln ppl_pruned − ln ppl_method) / (ln ppl_pruned − ln ppl_dense) on the test split: "
        "0% is the pruned model, 100% the dense one.",
        "- Sparsity kept: no layer has more nonzeros than after pruning and the N:M pattern holds.",
        "- Nonzero check (SEFT-engine runs): after every optimizer step each target layer's nonzeros are counted "
        "(the N:M pattern is checked at each topology update and at the end); nnz growth = the largest "
        "(nonzeros − nonzeros after pruning) of any layer over the run, and a positive value stops the run. "
        "'-': another method, or a run logged before the check existed.",
    ]


def lora_count(bench: Benchmark) -> str:
    """The matched trainable count, from any logged run of a method that has it."""
    counts = [run.trainable for run in bench.runs.values() if run.trainable and not run.method.startswith("masked_full")]
    return f"{counts[0]:,}" if counts else PENDING


def cadence_line(bench: Benchmark) -> str:
    defaults = SparsityEvolutionConfig(num_deltas=1)
    decay = (f"drop fraction {defaults.drop_fraction} with {defaults.drop_schedule} decay, frozen after "
             f"{defaults.update_end:.0%} of the run")
    if bench.work.cadence:
        interval, window = bench.work.cadence["update_interval"], bench.work.cadence["accumulation_steps"]
        return (f"- SEFT cadence scaled to the run: update every {interval} steps, gradient window of {window} "
                f"step(s), other options at their defaults ({decay}).")
    return (f"- SEFT cadence: the engine's defaults, update every {defaults.update_interval} steps, gradient window "
            f"of {defaults.accumulation_steps} steps, {decay}; the benchmark sets only num_deltas, target_modules "
            "and seed.")


def grid_line(bench: Benchmark) -> str:
    regime = bench.regime
    if regime.rates_from is not None:
        checks = "; ".join(f"{method} at {', '.join(f'{factor:g}' for factor in factors)} × it"
                           for method, factors in regime.rate_checks.items())
        return (f"- Learning rates: each method's choice in the {regime.rates_from} regime (distilled methods: that "
                f"of the CE method they vary)" + (f"; rate checks here, the best on this regime's validation "
                f"chosen at {FIRST_PATTERN} and reused at the other patterns, extended by a factor "
                f"{regime.grid_factor:g} (at most {regime.max_grid_extensions} times) while it is at an edge: "
                f"{checks}" if checks else "") + ".")
    grids = "; ".join(f"{method} {', '.join(f'{lr:g}' for lr in grid)}" for method, grid in regime.grids.items())
    return (f"- Learning rates: a grid per method at {FIRST_PATTERN} ({grids}), extended by a factor "
            f"{regime.grid_factor:g} (at most {regime.max_grid_extensions} times) while the best validation "
            f"perplexity is at an edge; reused at the other patterns. lora* has its own choice on lora's runs; "
            "ablations reuse SEFT's rate.")


# ------------------------------------------------------------------------------------------ output
def write_results(bench: Benchmark, folder: Path, wall_s: float, note: str) -> None:
    """Write <stem>.md into ``folder`` from ``bench``'s run log (the chart it links: quality_chart.plot)."""
    regime, work = bench.regime, bench.work
    command = "python benchmarks/quality.py" + ("" if regime is SHORT else f" --regime {regime.name}")
    train_min = sum(run.train_s for run in bench.runs.values()) / 60
    text = "\n".join([
        f"# Repair quality{'' if regime is SHORT else f', {regime.name} regime'}: SEFT vs sparsity-preserving "
        f"baselines ({work.model_name})",
        "",
        f"Generated by `{command}`. {machine_description(torch.device('cpu'))} Training time summed over the "
        f"{len(bench.runs)} logged runs: {train_min:.0f} min (pruning and evaluation come on top); this invocation "
        f"took {wall_s / 60:.0f} min.",
        "",
        "## Setup",
        *setup_lines(bench),
        "",
        *parent_section(bench),
        "## Goal: SEFT beats every sparsity-preserving baseline (test perplexity, mean ± half-range over seeds)",
        "",
        markdown_table(["pattern", "SEFT", "best sparsity-preserving baseline", "goal"], goal_rows(bench)),
        "",
        "## Goal: SEFT beats the same deltas on a fixed support (what topology evolution adds)",
        "",
        markdown_table(["pattern", "SEFT", "fixed_deltas", "goal"], fixed_support_rows(bench)),
        "",
        "## All runs (test perplexity: mean ± half-range over seeds when repeated)",
        "",
        markdown_table(run_columns(bench), all_run_rows(bench)),
        "",
        f"## Learning-rate grid at {FIRST_PATTERN} (validation perplexity, seed 0; chosen in bold)",
        "",
        markdown_table(["method", "learning rate: validation perplexity"], grid_rows(bench)),
        "",
        "## Ablations (SEFT with one option changed, at SEFT's learning rate; vs SEFT: test perplexity)",
        "",
        markdown_table(["pattern", "ablation", "change", "test ppl", "vs SEFT", "gap recovered", SWAPS_HEADER],
                       ablation_rows(bench)),
        "",
        *fixed_rate_section(bench),
        f"![gap recovered by method and pattern]({regime.stem}.png)",
        "",
        note,
    ])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{regime.stem}.md").write_text(text + "\n")
    print(text)
