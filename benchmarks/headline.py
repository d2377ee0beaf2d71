"""The README's headline tables, generated from the quality benchmark's run logs.

The README quotes the long regime (repair on Wikipedia, tested on Wikipedia) and the narrow one
(repair on news, tested on Wikipedia: the general text a user wants back after repairing on narrow
instruction data). Typed by hand, those numbers drifted; here they are computed from
``benchmarks/results/quality_long_runs.csv`` and ``quality_narrow_runs.csv`` and written between the
README's ``<!-- headline:REGIME -->`` and ``<!-- /headline -->`` markers. ``tests/test_docs.py`` checks
that the README holds exactly what this script writes, so a new run in the logs fails the suite until
``python benchmarks/headline.py --write`` has put it in.

Each method's learning rate is chosen as the benchmark chooses it: the lowest validation perplexity of
seed 0 at 50% once the grid has an interior optimum, in the long regime (reused at every pattern and in the
narrow regime) or the screen's own.
"""

from __future__ import annotations

import argparse
import re
import statistics
from pathlib import Path

from quality_runs import RunResult, read_runs

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
PATTERNS = ("50%", "2:4", "70%")
RATE_PATTERN = "50%"
# Whose run log chooses each regime's learning rates, and the patterns its headline shows (the screen
# ran at 50% first; its other patterns are still to come).
RATES_FROM = {"long": "long", "narrow": "long", "screen": "screen"}
SHOWN = {"long": PATTERNS, "narrow": PATTERNS, "screen": ("50%",)}
# (method in the run log, how the README names it); methods trained with the dense parent end in +kd.
ROWS = (
    ("lora", "LoRA r=8, merged (dense again: sparsity lost)"),
    ("masked_full", "masked full fine-tuning (every surviving weight trains: 13–22× the others' count)"),
    ("spp", "SPP-style low-rank scaling"),
    ("masked_lora", "masked LoRA (SQFT)"),
    ("fixed_deltas", "sparse deltas on a fixed support"),
    ("seft", "**SEFT**"),
    ("spp+kd", "SPP-style + dense parent"),
    ("masked_lora+kd", "masked LoRA + dense parent"),
    ("fixed_deltas+kd", "sparse deltas on a fixed support + dense parent"),
    ("seft+kd", "**SEFT + dense parent** (seft_trl's default when the parent is known)"),
)
MARKERS = re.compile(r"(<!-- headline:(?P<regime>\w+) -->\n)(?P<body>.*?)(<!-- /headline -->)", re.S)


def chosen_rates(runs: dict) -> dict[str, float]:
    """Each method's chosen learning rate: the lowest seed-0 validation perplexity at 50%, once its grid has
    found an interior optimum (a best point at the grid's edge means the grid is still being extended); a
    variant trained with the parent (``method+teaching``) takes its method's rate."""
    grids: dict[str, dict[float, float]] = {}
    for run in runs.values():
        if run.seed == 0 and run.pattern == RATE_PATTERN:
            grids.setdefault(run.method, {})[run.lr] = run.val_ppl
    rates = {}
    for method, grid in grids.items():
        best, rates_tried = min(grid, key=grid.get), sorted(grid)
        if "+" not in method and len(grid) >= 3 and rates_tried[0] < best < rates_tried[-1]:
            rates[method] = best
    for method in grids:
        base = method.partition("+")[0]
        if "+" in method and base in rates:
            rates[method] = rates[base]
    return rates


def cell(runs: dict, pattern: str, method: str, rates: dict[str, float]) -> str:
    """Test perplexity at the chosen rate: one seed as it is, several as mean ± half-range."""
    lr = rates.get(method)
    ppls = [r.test_ppl for r in runs.values() if r.pattern == pattern and r.method == method and r.lr == lr]
    if not ppls:
        return "pending"
    if len(ppls) == 1:
        return f"{ppls[0]:.2f}"
    return f"{statistics.fmean(ppls):.2f} ± {(max(ppls) - min(ppls)) / 2:.2f}"


def reference(runs: dict, pattern: str, method: str) -> str:
    ppls = [r.test_ppl for r in runs.values() if r.pattern == pattern and r.method == method]
    return f"{ppls[0]:.2f}" if ppls else "pending"


def headline_table(regime: str, results: Path = RESULTS) -> str:
    """The markdown table of ``regime`` ('long' or 'narrow'): test perplexity per method and pattern."""
    runs = read_runs(results / f"quality_{regime}_runs.csv")
    rates = chosen_rates(read_runs(results / f"quality_{RATES_FROM[regime]}_runs.csv"))
    shown = SHOWN[regime]
    lines = ["| test perplexity (lower is better) | " + " | ".join(f"Wanda {p}" for p in shown) + " |",
             "|---|" + "---|" * len(shown)]
    dense = reference(runs, "unpruned", "dense")
    lines.append("| dense model, before pruning | " + " | ".join(dense for _ in shown) + " |")
    lines.append("| pruned, no repair | " + " | ".join(reference(runs, p, "pruned") for p in shown) + " |")
    for method, name in ROWS:
        lines.append(f"| {name} | " + " | ".join(cell(runs, p, method, rates) for p in shown) + " |")
    return "\n".join(lines) + "\n"


def updated_readme(text: str, results: Path = RESULTS) -> str:
    """``text`` with every headline block replaced by its table from the run logs."""
    return MARKERS.sub(lambda m: m.group(1) + headline_table(m["regime"], results) + m.group(4), text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite README.md's headline tables in place")
    args = parser.parse_args()
    text = README.read_text()
    new = updated_readme(text)
    if args.write:
        README.write_text(new)
    else:
        print("\n".join(headline_table(regime) for regime in RATES_FROM))


if __name__ == "__main__":
    main()
