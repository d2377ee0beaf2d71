"""Shared fixtures: tiny random LLaMA / Mistral models built from configs (no downloads), pruned."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402

# Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter, which must be
# chosen before any kernel module is imported; on a GPU machine they compile for CUDA.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Where the device-aware tests run: the GPU when there is one (make gpu-check), else the CPU.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

import pytest
from torch import nn

from seft_trl.pruning import prune
from seft_trl.testing import tiny_model

ROOT = Path(__file__).parents[1]
VOCAB = 96  # token ids of the random batches: below every tiny model's vocabulary


def prune_linears(model: nn.Module, pattern: str = "layer", sparsity: float = 0.5) -> nn.Module:
    """Magnitude-prune every decoder linear: per layer, per row, or 2:4."""
    if pattern == "2:4":
        prune(model, method="magnitude", pattern="2:4")
    else:
        prune(model, method="magnitude", sparsity=sparsity, granularity=pattern)
    return model


def random_batch(batch: int = 4, seqlen: int = 24, seed: int | None = None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.randint(0, VOCAB, (batch, seqlen), generator=generator)


@pytest.fixture
def pruned_llama() -> nn.Module:
    return prune_linears(tiny_model("llama"))


@dataclass(frozen=True)
class DryRun:
    """`benchmarks/gpu_check.py --dry-run`, run once: its outcome, its report, and the folder of its steps' reports."""

    result: subprocess.CompletedProcess
    report: Path
    workdir: Path


@pytest.fixture(scope="session")
def gpu_check_dry_run(tmp_path_factory: pytest.TempPathFactory) -> DryRun:
    """The GPU check's dry run. It includes `benchmarks/speed.py --quick`, whose report the same test checks and
    resumes (tests/speed_checks.py), so the suite launches the speed benchmark's six worker processes once."""
    folder = tmp_path_factory.mktemp("gpu-check")
    report, workdir = folder / "gpu.md", folder / "steps"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--output", str(report),
                             "--workdir", str(workdir)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    return DryRun(result, report, workdir)
