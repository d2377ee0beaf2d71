"""Helpers shared by the benchmark scripts: test layers, timing, machine description, Markdown output.

The scripts import this module by its bare name, which works because Python puts a script's own
folder first on ``sys.path`` (run them as ``python benchmarks/<script>.py``).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from seft_trl.kernels import default_sampled_kernel

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


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for queued work, so wall-clock times cover GPU kernels too."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def interleaved_median_ms(
    fns: dict[str, Callable[[], object]], repeats: int, device: torch.device | None = None
) -> dict[str, float]:
    """Median wall time in ms of each function, timed in interleaved rounds after one warm-up round.

    Interleaving (one run of every function per round) spreads any load from other processes
    over all candidates alike, so their ratios stay meaningful on a shared machine. The warm-up
    round absorbs one-off costs (allocator growth, lazy initialisation, first-touch page faults).
    """
    sync = synchronizer(device or torch.device("cpu"))
    for fn in fns.values():
        fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(samples) for name, samples in times.items()}


@dataclass
class CpuSnapshot:
    """Wall time, busy CPU time of the whole machine and CPU time of this process, in seconds."""

    wall: float
    machine_busy: float
    own: float


def cpu_snapshot() -> CpuSnapshot:
    """Read the counters that :func:`others_load` compares (Linux /proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # user .. steal
    own = os.times()
    return CpuSnapshot(time.perf_counter(), busy, own.user + own.system)


def others_load(since: CpuSnapshot) -> float:
    """Average number of cores that other processes kept busy since ``since``."""
    now = cpu_snapshot()
    others = (now.machine_busy - since.machine_busy) - (now.own - since.own)
    return max(0.0, others / (now.wall - since.wall))


def contention_note(since: CpuSnapshot) -> str:
    """A sentence saying how much other processes competed for the CPU during the run."""
    load = others_load(since)
    verdict = "the times are inflated" if load > 0.1 else "the machine was quiet"
    return (
        f"Other processes kept {load:.2f} of the {os.cpu_count()} cores busy on average during the run "
        f"(/proc/stat busy time minus this process's CPU time): {verdict}."
    )


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
        f"sampled δ-gradient kernel: {default_sampled_kernel(device)}",
    ]
    if device.type == "cuda":
        parts.append(f"GPU: {torch.cuda.get_device_name(device)}")
    return "Machine: " + "; ".join(parts) + "."


def documentation_paragraphs() -> list[str]:
    """The paragraphs of the README and the documentation pages: English text every checkout has, for the
    random-weight models of the smoke tests and the GPU check (nothing to download)."""
    root = Path(__file__).resolve().parents[1]
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    return [paragraph.strip() for page in pages for paragraph in page.read_text().split("\n\n") if paragraph.strip()]


def status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


def reset_peak_memory(device: torch.device) -> None:
    """Restart peak tracking, so that the peak is the training's and not, say, the model loading's."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM restarts from the current RSS


def peak_memory(device: torch.device) -> int:
    """Peak bytes since :func:`reset_peak_memory`: CUDA memory allocated, or the resident set size."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else status_bytes("VmHWM")


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
