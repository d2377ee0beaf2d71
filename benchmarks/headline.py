"""The README's headline tables, generated from the quality benchmark's run logs.

The README quotes the long regime (repair on Wikipedia, tested on Wikipedia) and the narrow one
(repair on news, tested on Wikipedia: the general text a user wants back after repairing on narrow
instruction data). Typed by hand, those numbers drifted; here they are computed from
``benchmarks/results/quality_long_runs.csv`` and ``quality_narrow_runs.csv`` and written between the
README's ``<!-- headline:REGIME -->`` and ``<!-- /headline -->`` markers. ``tests/test_docs.py`` checks
that the README holds exactly what this script writes, so a new run in the logs fails the suite until
``python benchmarks/headline.py --write`` has put it in.

Each method's learning rate is the one the benchmark chooses (``quality_regimes.rate_of``), read from the
logs alone: the lowest validation perplexity of seed 0 at 50% over its grid as extended, in the long
regime (reused at every pattern and, but for the narrow regime's rate checks, there too) or the screen's own.
"""

from __future__ import annotations

import argparse
import re
import statistics
from pathlib import Path
from typing import Callable

from quality_regimes import PATTERNS, REGIMES, logged_rates
from quality_runs import Pending, read_runs

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
# The patterns each regime's headline shows (the screen ran at 50% first; its other patterns are still to come).
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


def chosen_rate(rates: Callable[[str], float], method: str) -> float | None:
    """The method's learning rate as the benchmark chooses it (None while the choice waits on a run)."""
    try:
        return rates(method)
    except Pending:
        return None


def cell(runs: dict, pattern: str, method: str, rates: Callable[[str], float]) -> str:
    """Test perplexity at the chosen rate: one seed as it is, several as mean ± half-range."""
    lr = chosen_rate(rates, method)
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
    rates = logged_rates(REGIMES[regime], results)
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
        print("\n".join(headline_table(regime) for regime in SHOWN))


if __name__ == "__main__":
    main()
