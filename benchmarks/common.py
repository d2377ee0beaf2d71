"""Helpers shared by the benchmark scripts: test layers, timing, machine description, Markdown output.

The scripts import this module by its bare name, which works because Python puts a script's own
folder first on ``sys.path`` (run them as ``python benchmarks/<script>.py``).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_shapes(spec: str) -> list[tuple[int, int]]:
    """'576x1536,4096x11008' -> [(576, 1536), (4096, 11008)] as (out_features, in_features)."""
    shapes = []
    for item in spec.split(","):
        out_features, in_features = item.lower().split("x")
        shapes.append((int(out_features), int(in_features)))
    return shapes


def pruned_linear(out_features: int, in_features: int, device: torch.device, seed: int) -> nn.Linear:
    """A bias-free fp32 nn.Linear (like LLM projections) with the smaller half of |W| set to zero."""
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=False, device=device)
    with torch.no_grad():
        flat = linear.weight.view(-1)
        smallest = torch.topk(flat.abs(), flat.numel() // 2, largest=False).indices
        flat[smallest] = 0.0
    return linear


def random_delta_index(weight: torch.Tensor, density: float, seed: int) -> torch.Tensor:
    """k = round(density · out · in) distinct flat positions among the nonzero weights (int64, unsorted)."""
    k = round(density * weight.numel())
    nonzero = torch.nonzero(weight.detach().reshape(-1)).squeeze(1)
    generator = torch.Generator(device=weight.device).manual_seed(seed)
    return nonzero[torch.randperm(nonzero.numel(), generator=generator, device=weight.device)[:k]]


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for queued work, so wall-clock times cover GPU kernels too."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 1, device: torch.device | None = None) -> float:
    """Median wall time of ``fn`` in ms over ``repeats`` runs, after ``warmup`` untimed runs.

    The warm-up runs absorb one-off costs (allocator growth, first-touch page faults, lazy
    initialisation) that a training loop pays once, not every step.
    """
    sync = synchronizer(device or torch.device("cpu"))
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (falls back to platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_description(device: torch.device) -> str:
    """One Markdown line naming the hardware and the torch build the numbers came from."""
    parts = [
        f"CPU: {cpu_model()}",
        f"cores (os.cpu_count): {os.cpu_count()}",
        f"torch {torch.__version__}",
        f"torch threads: {torch.get_num_threads()}",
    ]
    if device.type == "cuda":
        parts.append(f"GPU: {torch.cuda.get_device_name(device)}")
    return "Machine: " + "; ".join(parts) + "."


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(text: str, path: Path) -> None:
    """Print ``text`` and save it to ``path`` (creating the results folder)."""
    print(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    print(f"\nWritten to {path}")
