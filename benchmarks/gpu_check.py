"""The prepared GPU check: everything that needs a GPU, in one run of at most 8 minutes, into results/gpu.md.

GPU machines are lent rarely and briefly, so the check is one script that runs unattended:

1. **CUDA tests**: the device-aware tests run on the GPU: the fused Triton δ-gradient kernel
   against dense autograd (fp32, bf16, fp16, ragged token counts, empty and full rows), the layer
   against its dense reference (the Triton path is selected automatically on CUDA), 8-bit and paged
   8-bit optimizer state of 2¹⁷-element deltas, AdEMAMix, bitwise resume inside a window
   through the Trainer (also with a teacher), and the trainer's distillation from the dense parent
   (a bitsandbytes 8-bit teacher on CUDA among them).
2. **Layer speed** at 4096×11008 (``layer_speed.py --device cuda``).
3. **δ-gradient kernels**: the sampled kernels against the dense product at the ~1B model's shapes
   and 7B's MLP, bf16 and fp32 (``delta_grad_kernels.py --device cuda``): what the cost rule's
   CUDA constant stands on.
4. **Model speed and memory**: a ~0.8B LLaMA-shaped model pruned 50%, SEFT against peft LoRA and
   the floor, with bf16, ``adamw_8bit`` and gradient checkpointing (``speed.py``).
5. **FSDP2** on two GPUs (skipped on one): the 2-process FSDP2 tests through accelerate's GPU launch
   config, unpatched (the test suite runs them on CPU processes through ``tests/fsdp_on_cpu.py``).

Each step runs as its own process under its own time limit, so one failure does not hide the
others; the report keeps every step's outcome, wall time and output tail.

    make gpu-check              # on the GPU machine
    make gpu-check DRY_RUN=1    # anywhere: the same steps at toy sizes on the CPU (the test suite runs it)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common import RESULTS_DIR, write_report

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
# The FSDP2 step's selection: on a machine with 2 GPUs it runs them; a dry run collects the same selection
# (the test suite runs every one of them over gloo, so running them again would only double its time).
FSDP2_TESTS = ["tests/test_ddp.py", "-k", "fsdp2"]
CUDA_TESTS = ["tests/test_sampled_kernels.py", "tests/test_layer.py", "tests/test_optim_state.py",
              "tests/test_trainer.py::test_resume_reproduces_the_uninterrupted_run_bitwise", "tests/test_distillation.py"]


@dataclass
class Step:
    name: str
    command: list[str]
    limit_s: int
    report: Path | None = None  # a markdown file the step writes, included in gpu.md
    env: dict[str, str] | None = None
    skipped: str | None = None  # why the step cannot run on this machine


@dataclass
class Outcome:
    step: Step
    returncode: int | None  # None: stopped at its time limit
    seconds: float
    tail: str


def plan(dry_run: bool, workdir: Path, gpus: int = 0) -> list[Step]:
    """The steps for a machine with ``gpus`` GPUs; a dry run keeps their shape on the CPU at toy sizes."""
    python = sys.executable
    if dry_run:
        tests = ["tests/test_sampled_kernels.py::test_sampled_kernel_reads_strided_rows_and_handles_no_tokens"]
        layer = ["--device", "cpu", "--layers", "64x96", "--tokens", "64", "--repeats", "2"]
        kernels = {dtype: ["--device", "cpu", "--dtype", dtype, "--shapes", "64x96", "--tokens", "64",
                           "--densities", "0.01", "--repeats", "2"] for dtype in ("bf16", "fp32")}
        model = ["--quick", "--device", "cpu"]
        fsdp2 = Step("FSDP2 tests, collected", [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only",
                                                 *FSDP2_TESTS], 600)
    else:
        tests = CUDA_TESTS
        layer = ["--device", "cuda", "--layers", "4096x11008", "--tokens", "4096", "--repeats", "5", "--large-repeats", "5"]
        # bf16 at the ~1B model's shapes and 7B's MLP; fp32 at 7B's MLP only.
        kernels = {dtype: ["--device", "cuda", "--dtype", dtype, "--shapes", shapes, "--tokens", "4096",
                           "--densities", "0.005,0.01,0.02,0.05", "--repeats", "5", "--large-repeats", "5",
                           "--gather-max-work", "0"]
                   for dtype, shapes in (("bf16", "2048x5632,5632x2048,2048x2048,4096x11008"), ("fp32", "4096x11008"))}
        model = ["--device", "cuda", "--model", "llama-large", "--steps", "12", "--rounds", "2"]
        fsdp2 = Step("FSDP2, 2 GPUs", [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *FSDP2_TESTS],
                     150, env={"SEFT_TEST_FSDP2_CONFIG": str(ROOT / "recipes" / "accelerate" / "fsdp2.yaml")},
                     skipped=None if gpus >= 2 else f"needs 2 GPUs, this machine has {gpus}")
    # The limits (460 s in all, 610 s with the FSDP2 step of a multi-GPU machine) fit the GPU session's 8
    # minutes on one GPU; a dry run's only guard against a hang.
    limits = (600, 600, 600, 600) if dry_run else (110, 40, 40, 230)  # tests, layer, each kernel step, model
    kernel_steps = [
        Step(f"delta-gradient kernels, {dtype}",
             [python, str(BENCHMARKS / "delta_grad_kernels.py"), *options, "--output", str(workdir / f"kernels_{dtype}.md")],
             limits[2], workdir / f"kernels_{dtype}.md")
        for dtype, options in kernels.items()
    ]
    return [
        Step("CUDA tests", [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], limits[0]),
        Step("layer speed", [python, str(BENCHMARKS / "layer_speed.py"), *layer, "--output", str(workdir / "layer.md")],
             limits[1], workdir / "layer.md"),
        *kernel_steps,
        Step("model speed and memory",
             [python, str(BENCHMARKS / "speed.py"), *model, "--optim", "adamw_8bit", "--gradient-checkpointing",
              "--output", str(workdir / "speed.md")],
             limits[3], workdir / "speed.md"),
        fsdp2,
    ]


def run(step: Step, log_dir: Path | None) -> Outcome:
    if step.skipped is not None:
        print(f"{step.name}: skipped ({step.skipped})", flush=True)
        return Outcome(step, 0, 0.0, step.skipped)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", **(step.env or {})}
    started = time.perf_counter()
    try:
        done = subprocess.run(step.command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=step.limit_s)
        returncode, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as stopped:
        returncode = None
        output = "".join(part.decode() if isinstance(part, bytes) else part or "" for part in (stopped.stdout, stopped.stderr))
    seconds = time.perf_counter() - started
    if log_dir is not None:  # the whole output, where the report keeps only a failure's tail
        (log_dir / ("".join(c if c.isascii() and c.isalnum() else "_" for c in step.name) + ".log")).write_text(output)
    status = "passed" if returncode == 0 else f"stopped at its {step.limit_s} s limit" if returncode is None else f"failed ({returncode})"
    print(f"{step.name}: {status} in {seconds:.0f} s", flush=True)
    return Outcome(step, returncode, seconds, output[-3000:])


def report(outcomes: list[Outcome], dry_run: bool) -> str:
    lines = ["# GPU check" + (" (dry run on the CPU: toy sizes, no GPU numbers)" if dry_run else ""),
             "| step | outcome | wall (s) |", "|---|---|---|"]
    for outcome in outcomes:
        status = ("passed" if outcome.returncode == 0 else "time limit" if outcome.returncode is None else "FAILED")
        if outcome.step.skipped is not None:
            status = f"skipped: {outcome.step.skipped}"
        lines.append(f"| {outcome.step.name} | {status} | {outcome.seconds:.0f} |")
    sections = ["\n".join(lines)]
    for outcome in outcomes:
        written = outcome.step.report
        if outcome.returncode == 0 and written is not None and written.exists():
            body = written.read_text().replace("\n# ", "\n### ").removeprefix("# ")
            sections.append(f"## {outcome.step.name}\n\n{body}")
        elif outcome.returncode != 0:
            sections.append(f"## {outcome.step.name}: output tail\n\n```\n{outcome.tail}\n```")
    command = " ".join(["python", "benchmarks/gpu_check.py", *(["--dry-run"] if dry_run else [])])
    sections.append(f"Command: `{command}`")
    return "\n\n".join(sections)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the same steps at toy sizes on the CPU")
    parser.add_argument("--output", type=Path, default=None, help="default: results/gpu.md (gpu_dry_run.md with --dry-run)")
    parser.add_argument("--log-dir", type=Path, default=None, help="also write each step's whole output there")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the steps' own reports (speed.md and its raw .json, layer.md, ...) in this folder "
                             "instead of a temporary one")
    args = parser.parse_args()
    output = args.output or RESULTS_DIR / ("gpu_dry_run.md" if args.dry_run else "gpu.md")
    gpus = 0
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("No CUDA device: run the GPU check on a GPU machine, or pass --dry-run to rehearse it here.")
        gpus = torch.cuda.device_count()
    with tempfile.TemporaryDirectory(prefix="seft-gpu-check-") as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        outcomes = [run(step, args.log_dir) for step in plan(args.dry_run, workdir, gpus)]
        write_report(report(outcomes, args.dry_run), output)
    if any(outcome.returncode != 0 for outcome in outcomes):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
