"""The GPU check's dry run: every step of `make gpu-check` runs on the CPU at toy sizes and is reported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_gpu_check_dry_run_runs_and_reports_every_step(tmp_path):
    output = tmp_path / "gpu.md"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--output", str(output)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = output.read_text()
    for step in ("CUDA tests", "layer speed", "model speed and memory"):
        assert f"| {step} | passed |" in report
    assert "## layer speed" in report and "## model speed and memory" in report
    assert "optim `adamw_8bit`" in report and "gradient checkpointing on" in report
