"""The GPU check's dry run: every step of `make gpu-check` runs on the CPU at toy sizes and is reported."""

from __future__ import annotations

from pathlib import Path

from speed_checks import check_quick_speed_report

ROOT = Path(__file__).parents[1]


def test_gpu_check_dry_run_runs_and_reports_every_step(gpu_check_dry_run):
    result = gpu_check_dry_run.result
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = gpu_check_dry_run.report.read_text()
    for step in ("CUDA tests", "layer speed", "model speed and memory", "FSDP2 tests, collected"):
        assert f"| {step} | passed |" in report
    assert "## layer speed" in report and "## model speed and memory" in report
    assert "optim `adamw_8bit`" in report and "gradient checkpointing on" in report
    check_quick_speed_report(gpu_check_dry_run.workdir)  # its model step: speed.py --quick, resumed


def test_the_fsdp2_step_runs_the_unpatched_gpu_launch_on_two_gpus_and_is_skipped_on_one(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check

    one, two = (gpu_check.plan(False, tmp_path, gpus)[-1] for gpus in (1, 2))
    assert one.skipped == "needs 2 GPUs, this machine has 1" and two.skipped is None
    assert two.env["SEFT_TEST_FSDP2_CONFIG"].endswith("recipes/accelerate/fsdp2.yaml")
    outcome = gpu_check.run(one, None)
    assert "| FSDP2, 2 GPUs | skipped: needs 2 GPUs, this machine has 1 |" in gpu_check.report([outcome], False)
