"""benchmarks/quality.py --quick: every method trains, merges and is measured on a tiny random model."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "quality.py"
SPARSE_METHODS = {"lora*", "masked_lora", "spp", "masked_full", "fixed_deltas", "seft",
                  "seft_no_revival", "seft_magnitude", "seft_revert"}


def test_quality_quick_runs_every_method_and_keeps_sparsity(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--output-dir", str(tmp_path)],
                          cwd=SCRIPT.parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    with (tmp_path / "quality_runs.csv").open() as handle:
        runs = {(row["pattern"], row["method"]): row for row in csv.DictReader(handle)}
    for pattern, target in (("50%", 0.5), ("2:4", 0.5), ("70%", 0.7)):
        pruned = runs[(pattern, "pruned")]
        assert float(pruned["sparsity"]) >= target - 0.01
        for method in SPARSE_METHODS:
            row = runs[(pattern, method)]
            assert row["sparsity_kept"] == "True", (pattern, method)
            assert float(row["sparsity"]) >= float(pruned["sparsity"]) - 1e-9, (pattern, method)
            assert float(row["test_ppl"]) > 1.0
        # Merging LoRA densifies the model: the reference row must show the sparsity loss.
        assert runs[(pattern, "lora")]["sparsity_kept"] == "False"
        assert float(runs[(pattern, "lora")]["sparsity"]) < 0.05
        # Revival happens with the defaults and not in the no-revival ablation.
        assert int(runs[(pattern, "seft")]["revived"]) > 0
        assert int(runs[(pattern, "seft_no_revival")]["revived"]) == 0
        # Every method trains the same number of parameters except masked full fine-tuning.
        counts = {int(runs[(pattern, m)]["trainable"]) for m in SPARSE_METHODS - {"masked_full"}}
        assert len(counts) == 1 and int(runs[(pattern, "masked_full")]["trainable"]) > counts.pop()

    report = (tmp_path / "quality.md").read_text()
    assert "## Goal" in report and "| 2:4 | seft |" in report
    assert (tmp_path / "quality.png").stat().st_size > 1000
