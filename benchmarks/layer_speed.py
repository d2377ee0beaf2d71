"""Speed and backward memory of one sparse-delta layer against the frozen floor and LoRA.

For each layer shape, at T tokens, fp32, 1% delta density, it times forward + backward of:

* the frozen nn.Linear with only the input gradient: the floor every method pays;
* SparseDeltaLinear on an ordinary step (δ gradient by the sampled product);
* LoRA with the same number of trainable parameters (rank r = round(k / (out + in))),
  a minimal implementation here and peft's;
* SparseDeltaLinear on the step that opens an accumulation window (begin_window: one dense
  weight gradient, candidate selection); it happens once per window, not every step;
* SparseDeltaLinear on the other steps of a window (δ gradient plus the candidates' gradients).

It also measures the backward's peak extra memory and checks that an ordinary SEFT step never
makes an allocation the size of a dense fp32 weight gradient (out · in · 4 bytes).

    python benchmarks/layer_speed.py                 # 576x1536 and 4096x11008 on the CPU
    python benchmarks/layer_speed.py --quick         # 576x1536 only
    python benchmarks/layer_speed.py --device cuda
"""

from __future__ import annotations

import argparse
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from common import RESULTS_DIR, contention_note, cpu_snapshot, interleaved_median_ms, machine_description
from common import markdown_table, parse_shapes, pruned_linear, synchronizer, write_report
from seft_trl.config import SparsityEvolutionConfig
from seft_trl.engine import arm_window, initial_delta_index
from seft_trl.kernels import TOKEN_CHUNK, default_sampled_kernel
from seft_trl.layer import SparseDeltaLinear
from seft_trl.patterns import Scope

DEFAULT_LAYERS = "576x1536,4096x11008"
QUICK_LAYERS = "576x1536"
LARGE_LAYER = 4_000_000  # weights; layers this big get --large-repeats timed runs instead of --repeats
MIB = 2**20
# The step that opens a window, as the engine arms it with the default config (drop_fraction 0.2, factor 4).
DEFAULTS = SparsityEvolutionConfig()

FLOOR = "frozen linear, input grad only (floor)"
SEFT = "SEFT, ordinary step"


class LoRALinear(nn.Module):
    """Frozen linear plus a trainable rank-r update: y = x Wᵀ + (x Aᵀ) Bᵀ · alpha / r (no dropout)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.weight = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale


class _Wrapper(nn.Module):
    """peft injects adapters by module name, so the linear needs a parent."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.proj = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


@dataclass
class Method:
    """A layer to benchmark; ``prepare`` runs before each forward and is timed with the step."""

    name: str
    module: nn.Module
    prepare: Callable[[], None] = lambda: None

    def trainable(self) -> int:
        return sum(p.numel() for p in self.module.parameters() if p.requires_grad)


@dataclass
class BackwardMemory:
    """What one backward allocated on the benchmark's device."""

    peak_extra: int  # bytes above what was allocated when the backward started
    largest: int  # bytes of the largest single allocation
    large: list[tuple[int, str]]  # (bytes, op that made it) of allocations >= the dense-gradient size


@dataclass
class Result:
    method: Method
    ms: float
    memory: BackwardMemory


def clear_grads(method: Method, x: torch.Tensor) -> None:
    """Drop the previous step's gradients, so each backward allocates its own as in training."""
    x.grad = None
    for parameter in method.module.parameters():
        parameter.grad = None


def train_step(method: Method, x: torch.Tensor, grad_output: torch.Tensor) -> None:
    """Forward and backward of one batch."""
    clear_grads(method, x)
    method.prepare()
    method.module(x).backward(grad_output)


def seft_layer(linear: nn.Linear, density: float, seed: int) -> SparseDeltaLinear:
    index = initial_delta_index(linear.weight, round(density * linear.weight.numel()), seed)
    return SparseDeltaLinear(linear, index, Scope("layer", linear.in_features))


def arm_default_window(layer: SparseDeltaLinear) -> None:
    """Make the next backward the window-start step, as the engine does with its default config."""
    arm_window(layer, DEFAULTS.drop_fraction, DEFAULTS.candidate_factor)


def peft_lora(linear: nn.Linear, rank: int) -> nn.Module:
    """peft's LoRA on the same frozen linear (imported here: peft is only a dev dependency)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["proj"])
    return get_peft_model(_Wrapper(linear), config)


def methods_for(
    linear: nn.Linear, density: float, seed: int, x: torch.Tensor, grad_output: torch.Tensor
) -> list[Method]:
    """All methods over the same frozen weight tensor (no copies, so memory stays that of one layer)."""
    linear.weight.requires_grad_(False)
    ordinary = seft_layer(linear, density, seed)
    window_start = seft_layer(linear, density, seed)
    in_window = seft_layer(linear, density, seed)
    arm_default_window(in_window)
    train_step(Method("open the window", in_window), x, grad_output)  # its later steps track the candidates
    k = ordinary.delta.numel()
    rank = max(1, round(k / (linear.out_features + linear.in_features)))
    return [
        Method(FLOOR, linear),
        Method(SEFT, ordinary),
        Method(f"LoRA r={rank} (minimal)", LoRALinear(linear, rank, alpha=2 * rank)),
        Method(f"LoRA r={rank} (peft)", peft_lora(linear, rank)),
        Method("SEFT, window-start step (once per window)", window_start, lambda: arm_default_window(window_start)),
        Method("SEFT, later step in a window", in_window),
    ]


def _allocating_op(events: list, timestamp: int, thread: int) -> str:
    """Where an allocation came from: 'outermost aten op › innermost aten op' running at ``timestamp``."""
    containing = [e for e in events if e.start_thread_id() == thread and e.start_ns() <= timestamp <= e.end_ns()]
    aten = sorted((e for e in containing if e.name().startswith("aten::")), key=lambda e: e.start_ns())
    if not aten:
        return "?"
    outer, inner = aten[0].name(), aten[-1].name()
    return outer if outer == inner else f"{outer} › {inner}"


def profiled_backward(method: Method, x: torch.Tensor, grad_output: torch.Tensor) -> tuple[list, list]:
    """One step with the backward under torch.profiler: (memory records in time order, op events)."""
    clear_grads(method, x)
    method.prepare()
    y = method.module(x)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.device.type == "cuda" else [])
    with profile(activities=activities, profile_memory=True) as prof:
        y.backward(grad_output)
        synchronizer(x.device)()
    events = prof.profiler.kineto_results.events()
    device_type = x.device.type.upper()
    records = [e for e in events if e.name() == "[memory]" and e.device_type().name == device_type]
    ops = [e for e in events if e.name() != "[memory]"]
    return sorted(records, key=lambda e: e.start_ns()), ops


def backward_memory(method: Method, x: torch.Tensor, grad_output: torch.Tensor, threshold: int) -> BackwardMemory:
    """Allocations of one backward, from the profiler's allocator records.

    Every allocation and free on the device is a record with its size; their running sum from
    the start of the backward gives the peak extra memory. On CUDA the peak comes from
    torch.cuda.max_memory_allocated instead, which also sees the caching allocator's rounding.
    """
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        start = torch.cuda.memory_allocated(x.device)
    records, ops = profiled_backward(method, x, grad_output)
    running, peak, largest, large = 0, 0, 0, []
    for record in records:
        running += record.nbytes()
        peak = max(peak, running)
        largest = max(largest, record.nbytes())
        if record.nbytes() >= threshold:
            large.append((record.nbytes(), _allocating_op(ops, record.start_ns(), record.start_thread_id())))
    if x.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(x.device) - start
    return BackwardMemory(peak, largest, large)


def measure_layer(out_features: int, in_features: int, args: argparse.Namespace, device: torch.device) -> list[Result]:
    linear = pruned_linear(out_features, in_features, device, args.seed)
    generator = torch.Generator(device=device).manual_seed(args.seed + 1)
    x = torch.randn(args.tokens, in_features, device=device, generator=generator).requires_grad_(True)
    grad_output = torch.randn(args.tokens, out_features, device=device, generator=generator)
    repeats = args.large_repeats if linear.weight.numel() >= LARGE_LAYER else args.repeats
    threshold = out_features * in_features * 4
    methods = methods_for(linear, args.density, args.seed + 2, x, grad_output)
    steps = {method.name: (lambda method=method: train_step(method, x, grad_output)) for method in methods}
    ms = interleaved_median_ms(steps, repeats, device)
    print(f"  {out_features}x{in_features}: timed, profiling memory", flush=True)
    return [Result(m, ms[m.name], backward_memory(m, x, grad_output, threshold)) for m in methods]


def extra_large(result: Result, floor: Result) -> list[tuple[int, str]]:
    """Large allocations of ``result`` not matched by a same-size one of the floor (its input gradient)."""
    surplus = Counter(size for size, _ in result.memory.large) - Counter(size for size, _ in floor.memory.large)
    extra = []
    for size, op in result.memory.large:
        if surplus[size] > 0:
            surplus[size] -= 1
            extra.append((size, op))
    return extra


def fp32_shapes(out_features: int, in_features: int, tokens: int) -> dict[int, str]:
    """Byte sizes of the fp32 tensors a backward of this layer may make, to name allocations by."""
    chunk = min(tokens, TOKEN_CHUNK)
    return {
        chunk * out_features * 4: f"[{chunk}, out]",
        chunk * in_features * 4: f"[{chunk}, in]",
        tokens * out_features * 4: "[T, out]",
        tokens * in_features * 4: "[T, in]",
        out_features * in_features * 4: "[out, in]",
    }


def describe(allocations: list[tuple[int, str]], shapes: dict[int, str]) -> str:
    """'6.0 MiB [1024, in] in aten::empty, ...' or 'none'."""
    parts = [f"{size / MIB:.1f} MiB {shapes.get(size, '')} in {op}".replace("  ", " ") for size, op in allocations]
    return ", ".join(parts) or "none"


def table(layers: list[tuple[tuple[int, int], list[Result]]], tokens: int) -> str:
    headers = [
        "layer (out×in)",
        "method",
        "trainable",
        "fwd+bwd ms (median)",
        "× floor",
        "backward peak extra MiB",
        "largest alloc MiB",
        "allocs ≥ out·in·4 B beyond the floor's",
    ]
    rows = []
    for (out_features, in_features), results in layers:
        floor, shapes = results[0], fp32_shapes(out_features, in_features, tokens)
        for r in results:
            rows.append(
                [
                    f"{out_features}×{in_features}",
                    r.method.name,
                    f"{r.method.trainable():,}",
                    f"{r.ms:.1f}",
                    f"{r.ms / floor.ms:.2f}",
                    f"{r.memory.peak_extra / MIB:.1f}",
                    f"{r.memory.largest / MIB:.1f}",
                    describe(extra_large(r, floor), shapes),
                ]
            )
    return markdown_table(headers, rows)


def dense_gradient_check(layers: list[tuple[tuple[int, int], list[Result]]], tokens: int) -> str:
    """The verdict on the goal: no dense weight gradient in an ordinary SEFT backward.

    The brief's test is literal (any allocation of at least out·in·4 bytes beyond the floor's);
    on small layers a token chunk of x can pass that size, so allocations of exactly a dense
    [out, in] fp32 tensor are reported as well.
    """
    lines = []
    for (out_features, in_features), results in layers:
        floor, shapes = results[0], fp32_shapes(out_features, in_features, tokens)
        seft = next(r for r in results if r.method.name == SEFT)
        dense_size = out_features * in_features * 4
        extra = extra_large(seft, floor)
        exact = [a for a in seft.memory.large if a[0] == dense_size]
        lines.append(
            f"- {out_features}×{in_features} (dense fp32 weight gradient = {dense_size / MIB:.1f} MiB): ordinary SEFT "
            f"backward allocations ≥ that size: {describe(seft.memory.large, shapes)}; the floor's: "
            f"{describe(floor.memory.large, shapes)}. Beyond the floor's: {'**' if extra else ''}"
            f"{describe(extra, shapes)}{'**' if extra else ''}. Of exactly the dense [out, in] size: "
            f"{'**' if exact else ''}{describe(exact, shapes)}{'**' if exact else ''}."
            + numba_scratch(out_features, in_features, seft.method.trainable())
        )
    return "\n".join(lines)


def numba_scratch(out_features: int, in_features: int, k: int) -> str:
    """The Numba kernel's allocations, which the profiler cannot see ('' where another kernel runs)."""
    if default_sampled_kernel(torch.device("cpu")) != "numba":
        return ""
    from seft_trl import numba_kernels  # installed: the default kernel is numba

    scratch = numba_kernels.scratch_bytes(out_features, in_features, k, torch.get_num_threads())
    return f" Numba's scratch, outside the profiler's view: {scratch / MIB:.1f} MiB."


def memory_note(device: torch.device) -> str:
    how = (
        "torch.cuda.max_memory_allocated minus torch.cuda.memory_allocated at the start of the backward"
        if device.type == "cuda"
        else "the peak of the running sum of the allocation/free records that torch.profiler "
        "(profile_memory=True) logs for every CPU allocator call during the backward (the profiler cannot size "
        "blocks allocated before it started, so their freeing, e.g. of saved activations, is not subtracted)"
    )
    return (
        f"Memory is that of one backward (the forward runs before it): peak extra = {how}; it includes the "
        "returned gradients. Single allocations are the profiler's allocator records, attributed to the "
        "outermost › innermost aten op running at the time. The last column lists allocations of at least a "
        "dense fp32 weight gradient's size (out·in·4 bytes) that the floor's backward does not also make (the "
        "floor's is the input gradient, T·in·4 bytes, which every method returns). Sizes are named by the fp32 "
        f"shape they match (T tokens; {TOKEN_CHUNK}-token chunks are seft_trl.kernels.TOKEN_CHUNK)."
        + (
            " The Numba kernel's scratch (per thread: partial sums [k] and transposed token tiles "
            "[out + in, tile], fp32) comes from Numba's allocator, which the profiler does "
            "not see; its size is stated per layer below."
            if device.type == "cpu" and default_sampled_kernel(device) == "numba"
            else ""
        )
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default=DEFAULT_LAYERS, help="comma-separated OUTxIN layer shapes")
    parser.add_argument("--quick", action="store_true", help=f"only {QUICK_LAYERS}")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens T per batch")
    parser.add_argument("--density", type=float, default=0.01, help="delta density")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=15, help="timed steps per method")
    parser.add_argument("--large-repeats", type=int, default=5, help=f"timed steps for layers >= {LARGE_LAYER} weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "layer_speed.md")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    start = cpu_snapshot()
    shapes = parse_shapes(QUICK_LAYERS if args.quick else args.layers)
    layers = [(shape, measure_layer(*shape, args, device)) for shape in shapes]
    report = "\n\n".join(
        [
            "# Sparse-delta layer speed",
            f"{machine_description(device)} Device {device}, fp32, T = {args.tokens} tokens, density "
            f"{args.density:.1%}. Each time is the median of {args.repeats} steps ({args.large_repeats} for layers "
            f"≥ {LARGE_LAYER:,} weights), timed in rounds that run every method once, after one warm-up round. "
            f"{contention_note(start)}",
            table(layers, args.tokens),
            memory_note(device),
            dense_gradient_check(layers, args.tokens),
        ]
    )
    print()
    write_report(report, args.output)


if __name__ == "__main__":
    main()
