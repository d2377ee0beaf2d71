"""The quality benchmark's chart: gap recovered per method, one panel per pattern, from the run log only.

Points come from the same per-seed gaps as the report's tables (quality_report); a pending result is
absent, never estimated.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from quality_plan import Benchmark
from quality_regimes import EVALUATION_ONLY, PATTERNS, UNPRUNED, split_method
from quality_report import half_range, heldout_ppls, runs_of, seed_gaps


@dataclass(frozen=True)
class ChartPoint:
    """One method at one pattern as the chart draws it: gap recovered (%) over seeds, and its caveats."""

    gap: float  # mean over seeds
    error: float  # half-range over seeds
    test_ppl: float  # mean over seeds
    seeds: int
    more_trainable: bool  # trains more parameters than the matched count
    sparsity_lost: bool  # some seed's model broke the pruned sparsity


def matched_count(bench: Benchmark) -> int:
    """The trainable count the methods share (LoRA r's): the smallest of any trained run; the rest train more."""
    return min((run.trainable for run in bench.runs.values() if run.trainable), default=0)


def chart_points(bench: Benchmark) -> dict[tuple[str, str], ChartPoint]:
    """Every (pattern, method) with a result, from the same per-seed gaps as the tables; pending ones are absent."""
    matched, points = matched_count(bench), {}
    for pattern in PATTERNS:
        for method in bench.regime.methods:
            runs = [] if method in EVALUATION_ONLY else runs_of(bench, pattern, method)
            gaps = seed_gaps(bench, pattern, runs) if runs else None
            if gaps:
                points[pattern, method] = ChartPoint(
                    statistics.mean(gaps), half_range(gaps), statistics.mean(run.test_ppl for run in runs), len(runs),
                    runs[0].trainable > matched, not all(run.sparsity_kept for run in runs))
    return points


def chart_rows(bench: Benchmark, points: dict[tuple[str, str], ChartPoint]) -> list[list[str]]:
    """One row per method, holding its variants (CE, then each teaching), in one order for every panel.

    Methods before ablations; within each, best first where the row first has a result, so the
    ranking at FIRST_PATTERN reads top to bottom and a row keeps its place in the other panels.
    """
    losses = list(teaching_colours(bench))  # CE, then the teachings in the regime's order
    shown = [method for method in bench.regime.methods if any((p, method) in points for p in PATTERNS)]
    rows = {split_method(method)[0]: [] for method in shown}
    for method in sorted(shown, key=lambda m: losses.index(split_method(m)[1])):
        rows[split_method(method)[0]].append(method)

    def rank(base: str) -> tuple[bool, int, float]:
        index, pattern = next((i, p) for i, p in enumerate(PATTERNS) if any((p, m) in points for m in rows[base]))
        best = max(points[pattern, m].gap for m in rows[base] if (pattern, m) in points)
        return base in bench.regime.ablations, index, -best

    return [rows[base] for base in sorted(rows, key=rank)]


def gap_axis(points: list[ChartPoint]) -> tuple[float, float, bool]:
    """x-limits shared by the panels, and whether they leave out 0.

    The methods differ by a few points of a 50-70% recovery: from 0 those differences would be
    slivers, so the axis starts just below the lowest value whenever 0 would take more than half the
    width (the label then says so, and the chart draws points, never bars whose length would lie).
    """
    low = min(point.gap - point.error for point in points)
    high = max(point.gap + point.error for point in points)
    span = max(high - low, 2.0)
    truncated = low > span
    left = math.floor(low - 0.1 * span)
    return (left if truncated else min(0.0, left)), high + 0.25 * span, truncated  # right: room for the labels


def teaching_colours(bench: Benchmark) -> dict[str | None, str]:
    """A colour per loss: CE, then each teaching of the regime, so a method's CE and +kd points pair up by colour."""
    return {name: f"C{i}" for i, name in enumerate([None, *bench.regime.teachings])}


def chart_slots(bench: Benchmark, rows: list[list[str]]) -> tuple[dict[str, float], float | None]:
    """Each variant's height (a row's variants adjacent, rows apart), and where the ablations begin."""
    slots, ablations, y = {}, None, 0.0
    for row in rows:
        if ablations is None and split_method(row[0])[0] in bench.regime.ablations:
            ablations = y - 0.8
        slots |= {method: y + i for i, method in enumerate(row)}
        y += len(row) + 0.6
    return slots, ablations


def draw_panel(ax, bench: Benchmark, pattern: str, slots: dict[str, float],
               points: dict[tuple[str, str], ChartPoint]) -> None:
    """One pattern: a point per method variant, its seed half-range, its test perplexity beside it."""
    colours = teaching_colours(bench)
    dense, pruned = heldout_ppls(bench, UNPRUNED, "dense"), heldout_ppls(bench, pattern, "pruned")
    ends = f" (test ppl: pruned {pruned[0]:.2f}, dense {dense[0]:.2f})" if dense and pruned else ""
    ax.set_title(f"Wanda {pattern}{ends}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    shown = {method: points[pattern, method] for method in slots if (pattern, method) in points}
    if not shown:
        ax.text(0.5, 0.5, "no trained method logged yet", transform=ax.transAxes, ha="center", va="center",
                color="grey")
    for method, point in shown.items():
        colour = colours[split_method(method)[1]]
        ax.errorbar(point.gap, slots[method], xerr=point.error if point.seeds > 1 else None, capsize=3, color=colour,
                    fmt="D" if point.more_trainable else "o", markersize=6,
                    markerfacecolor="white" if point.sparsity_lost else colour)
        label = f"{point.test_ppl:.2f}" + (f" (n={point.seeds})" if point.seeds > 1 else "")
        ax.annotate(label, (point.gap + point.error, slots[method]), xytext=(5, 0), textcoords="offset points",
                    va="center", fontsize=7.5)


def chart_legend(bench: Benchmark, points: dict[tuple[str, str], ChartPoint]) -> list:
    """What a colour and a marker mean, for those the chart uses."""
    from matplotlib.lines import Line2D

    used = {split_method(method)[1] for _, method in points}
    handles = [Line2D([], [], marker="o", linestyle="", color=colour,
                      label="CE (plain causal-LM loss)" if name is None else f"+{name} (with the dense parent)")
               for name, colour in teaching_colours(bench).items() if name in used and len(used) > 1]
    if any(point.more_trainable for point in points.values()):
        handles.append(Line2D([], [], marker="D", linestyle="", color="grey",
                              label="more trainable parameters (every surviving weight)"))
    if any(point.sparsity_lost for point in points.values()):
        handles.append(Line2D([], [], marker="o", linestyle="", color="grey", markerfacecolor="white",
                              label="sparsity not kept (see the table)"))
    return handles


def plot(bench: Benchmark, path: Path) -> None:
    """Gap recovered per method, one panel per pattern: the few-percent differences a log-scale perplexity hides."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = chart_points(bench)
    slots, ablations = chart_slots(bench, chart_rows(bench, points))
    bottom = max(slots.values(), default=0.0)
    fig, axes = plt.subplots(1, len(PATTERNS), sharex=True, sharey=True, squeeze=False, layout="constrained",
                             figsize=(5 * len(PATTERNS), 2.4 + 0.28 * max(bottom, 4)))
    for ax, pattern in zip(axes[0], PATTERNS):
        draw_panel(ax, bench, pattern, slots, points)
        if ablations is not None:
            ax.axhline(ablations, color="grey", linewidth=0.8, linestyle=":")
    first = axes[0][0]
    first.set_yticks(list(slots.values()), list(slots), fontsize=8)
    first.set_ylim(bottom + 0.7, -0.7)  # the first row on top
    if points:
        left, right, truncated = gap_axis(list(points.values()))
        first.set_xlim(left, right)
        for ax in axes[0]:
            ax.set_xlabel("gap recovered, %" + (f" (the axis starts at {left:g}%, not at 0)" if truncated else ""))
            for end in (0, 100):  # the pruned and the dense model, where the axis reaches them
                if left < end < right:
                    ax.axvline(end, color="black", linewidth=0.8, linestyle="--")
    else:
        first.set_xticks([])  # no result, no scale
    handles = chart_legend(bench, points)
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4), fontsize=8, frameon=False)
    fig.suptitle(f"Share of the pruning damage each method repairs: {bench.work.model_name}, {bench.regime.name} "
                 "regime, test split\ngap recovered = (ln ppl_pruned − ln ppl) / (ln ppl_pruned − ln ppl_dense): "
                 "0% pruned, 100% dense. Point: mean over seeds; bar: half-range; number: test perplexity",
                 fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)
