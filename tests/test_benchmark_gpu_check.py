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
    for step in ("CUDA tests", "layer speed", "model speed and memory", "FSDP2, 2 processes"):
        assert f"| {step} | passed |" in report
    assert "## layer speed" in report and "## model speed and memory" in report
    assert "optim `adamw_8bit`" in report and "gradient checkpointing on" in report


def test_the_fsdp2_step_runs_the_unpatched_gpu_launch_on_two_gpus_and_is_skipped_on_one(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check

    one, two = (gpu_check.plan(False, tmp_path, gpus)[-1] for gpus in (1, 2))
    assert one.skipped == "needs 2 GPUs, this machine has 1" and two.skipped is None
    assert two.env["SEFT_TEST_FSDP2_CONFIG"].endswith("recipes/accelerate/fsdp2.yaml")
    outcome = gpu_check.run(one, None)
    assert "| FSDP2, 2 GPUs | skipped: needs 2 GPUs, this machine has 1 |" in gpu_check.report([outcome], False)
