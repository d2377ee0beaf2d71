"""The quality-memory frontier: each method's repair against the training memory it would need at 7B.

Users choose a repair by what fits their GPU. The quality benchmark's budget axis (``seft@d0.1``,
``spp@r32``, ... in ``quality_regimes``) trains each method at several budgets on SmolLM2-135M; this script
places every run at the memory the same method at the same relative budget would need to train
LLaMA-2-7B (``seft_trl.memory``: bf16 weights, batch 4 × 2048, gradient checkpointing, 8-bit AdamW),
and marks the frontier: the runs no other sparsity-preserving run beats at the same or less memory.

The same relative budget: sparse deltas keep their density; the LoRA family keeps its trainable share of
the projection weights (rank 8 on SmolLM2, 2.3%, is rank 57 on LLaMA-2-7B); masked full fine-tuning
trains every surviving weight on both.

    python benchmarks/frontier.py [--regime short]   # reads benchmarks/results/<stem>_runs.csv
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from common import RESULTS_DIR, markdown_table, write_report
from headline import PATTERNS, chosen_rate
from quality_regimes import FIRST_PATTERN, REGIMES, logged_rates, split_budget, split_method
from quality_report import half_range
from quality_runs import read_runs
from seft_trl.memory import LLAMA2_7B, SMOLLM2_135M, Method, ModelShape, Workload, training_memory

GB = 1e9
GPUS = (24, 40, 80)
FAMILIES = ("seft", "fixed_deltas", "masked_lora", "spp", "masked_full")  # sparsity-preserving, in the chart's order
# SEFT with an engine option changed at a budget ('seft_no_revival@d0.25'): configurations a user can pick,
# each at the better on validation of the rates it ran at (SEFT's at that budget, fixed support's).
VARIANTS = "seft variants"
OPTIMIZER = "adamw_8bit"
SPARSITY = {"50%": 0.5, "2:4": 0.5, "70%": 0.7}
# The engine options the memory model follows (seft_trl.memory.Method's fields of the same names).
WINDOW_OPTIONS = ("regrow_pruned", "drop_fraction", "candidate_factor", "window_groups")


@dataclass(frozen=True)
class Point:
    method: str
    family: str
    trainable: int
    memory_gb: float  # projected LLaMA-2-7B training step, 8-bit AdamW
    test_ppls: tuple[float, ...]

    @property
    def ppl(self) -> float:
        return statistics.fmean(self.test_ppls)

    @property
    def half_range(self) -> float:
        return half_range(list(self.test_ppls))


def low_rank_width(shape: ModelShape) -> int:
    """Σ (in + out) over every projection: the LoRA family's trainable count per unit of rank."""
    return shape.layers * sum(o + i for o, i in shape.projections())


def projected(method: str, trainable: int, pattern: str, ablations: Mapping[str, Mapping[str, object]] | None = None,
              shape: ModelShape = LLAMA2_7B) -> Method:
    """The memory model's method at ``shape`` with the same relative budget as ``method``'s run on SmolLM2.

    SEFT keeps the window options its run had: revival as the engine resolves it at ``pattern`` (off in
    N:M models), and what an ablation of ``ablations`` changes (no revival, windows in turns, ...).
    """
    kind, density, _ = split_budget(split_method(method)[0])
    share = trainable / SMOLLM2_135M.projection_weights
    if kind == "masked_full":
        return Method("masked_full", sparsity=SPARSITY[pattern])
    if kind == "fixed_deltas":
        return Method(kind, density=density or share)
    if kind == "seft" or kind.startswith("seft_"):
        options = {"regrow_pruned": ":" not in pattern, **(ablations or {}).get(kind, {})}
        window = {name: value for name, value in options.items() if name in WINDOW_OPTIONS and value is not None}
        return Method("seft", density=density or share, **window)
    return Method(kind, rank=max(1, round(share * shape.projection_weights / low_rank_width(shape))))


def family_of(method: str) -> str | None:
    """The chart's series of a method: its family, VARIANTS for SEFT's ablations at a budget, None for the rest
    (distilled runs, dense LoRA, SEFT's ablations at LoRA's count: the benchmark's reports show those)."""
    base, teaching = split_method(method)
    kind, density, _ = split_budget(base)
    if teaching is not None:
        return None
    if kind.startswith("seft_") and density is not None:
        return VARIANTS
    return kind if kind in FAMILIES else None


def variant_rate(runs: dict, method: str) -> float | None:
    """The best on validation of the rates a variant ran at (FIRST_PATTERN, seed 0); None before any."""
    tried = [r for r in runs.values() if (r.pattern, r.method, r.seed) == (FIRST_PATTERN, method, 0)]
    return min(tried, key=lambda r: r.val_ppl).lr if tried else None


def points(runs: dict, pattern: str, methods: tuple[str, ...], rates: Callable[[str], float],
           ablations: Mapping[str, Mapping[str, object]] | None = None) -> list[Point]:
    """Every sparsity-preserving method's run at ``pattern`` at its chosen rate, seeds pooled."""
    found = []
    for method in sorted(methods):
        family = family_of(method)
        if family is None:
            continue
        lr = variant_rate(runs, method) if family == VARIANTS else chosen_rate(rates, method)
        if lr is None:
            continue
        chosen = [r for r in runs.values() if (r.pattern, r.method, r.lr) == (pattern, method, lr)]
        if not chosen:
            continue
        trainable = chosen[0].trainable
        estimate = training_memory(LLAMA2_7B, projected(method, trainable, pattern, ablations), Workload(), OPTIMIZER)
        found.append(Point(method, family, trainable, estimate.total / GB, tuple(r.test_ppl for r in chosen)))
    return found


def on_frontier(point: Point, others: list[Point]) -> bool:
    """No other run reaches a lower perplexity at the same or less memory."""
    return not any(o is not point and o.memory_gb <= point.memory_gb and o.ppl < point.ppl for o in others)


def rows(found: list[Point]) -> list[list[str]]:
    ordered = sorted(found, key=lambda p: ((*FAMILIES, VARIANTS).index(p.family), p.memory_gb))
    return [[p.method, f"{p.trainable:,}", f"{p.memory_gb:.1f}",
             f"{p.ppl:.2f}" + (f" ± {p.half_range:.2f} (n={len(p.test_ppls)})" if len(p.test_ppls) > 1 else ""),
             "**yes**" if on_frontier(p, found) else ""] for p in ordered]


def plot(by_pattern: dict[str, list[Point]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = {pattern: found for pattern, found in by_pattern.items() if found}
    fig, axes = plt.subplots(1, max(1, len(shown)), figsize=(6 * max(1, len(shown)), 4.5), squeeze=False)
    for ax, (pattern, found) in zip(axes[0], shown.items()):
        for family in FAMILIES:
            line = sorted((p for p in found if p.family == family), key=lambda p: p.memory_gb)
            if line:
                ax.errorbar([p.memory_gb for p in line], [p.ppl for p in line], yerr=[p.half_range for p in line],
                            marker="D" if family == "masked_full" else "o", capsize=3, label=family)
        for p in (p for p in found if p.family == VARIANTS):  # separate configurations: points, not a line
            ax.scatter([p.memory_gb], [p.ppl], marker="x", color="black")
            ax.annotate(split_budget(p.method)[0].removeprefix("seft_"), (p.memory_gb, p.ppl), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        for gb in GPUS:
            ax.axvline(gb, color="grey", linestyle=":", linewidth=1)
            ax.text(gb, ax.get_ylim()[1], f" {gb} GB", va="top", fontsize=8, color="grey")
        ax.set_title(f"Wanda {pattern}")
        ax.set_xlabel("projected LLaMA-2-7B training memory, GB")
        ax.set_ylabel("test perplexity (SmolLM2-135M)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Repair quality against the memory it needs (lower and further left is better); memory: the same "
                 f"method and relative budget on LLaMA-2-7B, {OPTIMIZER}, batch 4 × 2048, gradient checkpointing",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(regime: str, folder: Path) -> str:
    bench = REGIMES[regime]
    stem = bench.stem
    runs = read_runs(folder / f"{stem}_runs.csv")
    rates = logged_rates(bench, folder)
    by_pattern = {pattern: points(runs, pattern, bench.methods, rates, bench.ablations) for pattern in PATTERNS}
    plot(by_pattern, folder / f"{stem}_frontier.png")
    lines = [
        f"# The quality-memory frontier, {regime} regime",
        "",
        f"Generated by `python benchmarks/frontier.py --regime {regime}` from `{stem}_runs.csv`: every "
        "sparsity-preserving method at each budget the run log holds, at its learning rate chosen on validation "
        "at 50%, test perplexity on SmolLM2-135M; memory: the projected peak of training the same method at the "
        "same relative budget on LLaMA-2-7B (`seft_trl.memory`; bf16 weights, batch 4 × 2048, gradient "
        f"checkpointing, {OPTIMIZER}). Frontier: no other run reaches a lower perplexity with the same or less "
        "memory.",
        "",
        f"![quality against memory]({stem}_frontier.png)",
        "",
    ]
    for pattern, found in by_pattern.items():
        lines += [f"## Wanda {pattern}", ""]
        lines += [markdown_table(["method", "trainable (135M)", "7B memory GB", "test ppl", "frontier"], rows(found))
                  if found else "No run logged yet.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--regime", choices=sorted(REGIMES), default="short")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    write_report(report(args.regime, args.output_dir), args.output_dir / f"{REGIMES[args.regime].stem}_frontier.md")


if __name__ == "__main__":
    main()
