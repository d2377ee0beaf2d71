"""Checks that benchmarks/speed.py --quick ran end to end as a process, reports every method with real numbers and resumes.

The run is the GPU check dry run's model step (the session fixture ``gpu_check_dry_run``): the same script with
``--optim adamw_8bit --gradient-checkpointing``; the GPU check's test reads its report and resumes it here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
METHODS = ("floor", "trainer_floor", "seft", "seft_mean_swap", "lora", "masked_full")


def table_rows(report: str) -> dict[str, dict[str, str]]:
    """The results table's rows as {method: {header: cell}}."""
    lines = [line for line in report.splitlines() if line.startswith("| ")]
    headers = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [dict(zip(headers, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[1:]]
    return {row["method"]: row for row in rows}


# The dry run's model step (benchmarks/gpu_check.py), which a rerun must match to resume.
QUICK_OPTIONS = ["--quick", "--device", "cpu", "--optim", "adamw_8bit", "--gradient-checkpointing"]


def run_quick(output: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    result = subprocess.run([sys.executable, "benchmarks/speed.py", *QUICK_OPTIONS, "--output", str(output)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def check_quick_speed_report(workdir: Path) -> None:
    """The dry run's speed report (``workdir / "speed.md"``) has every method with real numbers and resumes.

    Called by the GPU check's dry-run test: one test reads the one dry run, so it runs once. (pytest 9
    keeps a node's id where pytest-xdist 3.8's ``xdist_group`` no longer reaches it: two tests marked to
    share a worker landed on two and each ran the 4-minute dry run.)"""
    output = workdir / "speed.md"
    report = output.read_text()
    rows = table_rows(report)
    assert set(METHODS) <= set(rows)
    for method in METHODS:
        row = rows[method]
        assert float(row["median step (s)"]) > 0, row
        assert float(row["peak RSS (MiB)"]) > 0, row
        assert float(row["× LoRA"]) > 0, row
        trainable = int(row["trainable params"].replace(",", ""))
        assert trainable == 0 if method == "floor" else trainable > 0, row
    # fp32 on the CPU: SEFT keeps 12 bytes a delta (value, int32 position, base), LoRA 4 a parameter.
    assert float(rows["seft"]["own state (B per trainable)"]) == 12.0
    assert float(rows["lora"]["own state (B per trainable)"]) == 4.0
    lora = int(rows["lora"]["trainable params"].replace(",", ""))
    assert abs(int(rows["seft"]["trainable params"].replace(",", "")) - lora) <= 7  # per-layer rounding
    assert "## Goals" in report and "Topology updates plus window overhead ≤ 2%" in report
    assert "Before SEFT's window opens (the peak through step" in report

    # The raw times of the round are kept; with every round done, a rerun with the same options
    # measures nothing and reports the same numbers. Beside them, the peak so far after each step.
    raw = json.loads(output.with_suffix(".json").read_text())
    for method in METHODS:
        measured = raw["rounds"][0][method]
        peaks = [measured["step_peaks"][step] for step in sorted(measured["step_peaks"], key=int)]
        assert len(peaks) == len(measured["step_seconds"]) and peaks[0] > 0, method
        assert peaks == sorted(peaks) and peaks[-1] <= measured["memory_peak"], method  # a peak so far never falls
    assert len(raw["rounds"]) == 1 and set(raw["rounds"][0]) == set(METHODS)
    rerun = run_quick(output)
    assert "Resuming from" in rerun.stdout and "trained in" not in rerun.stdout
    assert "Pruning" not in rerun.stdout  # the report is rebuilt from the raw record alone
    assert json.loads(output.with_suffix(".json").read_text())["rounds"] == raw["rounds"]
    again = table_rows(output.read_text())
    assert {m: again[m]["median step (s)"] for m in METHODS} == {m: rows[m]["median step (s)"] for m in METHODS}
