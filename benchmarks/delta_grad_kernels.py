"""Compare the ways of computing the delta gradient of a sparse-delta layer.

The gradient of the k deltas is k entries of the dense weight gradient gᵀx [out, in]. This
script times, for each weight shape and delta density:

(a) the frozen layer's own work, forward F.linear(x, W) plus input gradient g @ W: the floor
    every fine-tuning method pays, used as the unit;
(b) the sampled product, through seft_trl.kernels.sampled_weight_gradient with each CPU kernel
    forced: the Numba kernel (seft_trl.numba_kernels, when installed) and
    torch.sparse.sampled_addmm over a CSR pattern;
(c) the dense product gᵀx followed by a gather (seft_trl.kernels.dense_weight_gradient);
(d) a naive gather-multiply, (gᵀ[rows] * xᵀ[cols]).sum(1), in chunks of entries.

It reports which of (b)/(c) the cost rule of SamplingPattern picks (with the CPU's default
sampled kernel), whether that was the faster one, and each sampled kernel's per-entry cost
relative to (c), which the rule's constants SAMPLED_ENTRY_COST stand for.

    python benchmarks/delta_grad_kernels.py            # all shapes (a few minutes on 2 cores)
    python benchmarks/delta_grad_kernels.py --quick    # 576x1536 only
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import seft_trl.kernels as kernels
from seft_trl.engine import initial_delta_index
from common import RESULTS_DIR, contention_note, cpu_snapshot, interleaved_median_ms, machine_description
from common import markdown_table, parse_shapes, pruned_linear, write_report
from seft_trl.kernels import SamplingPattern, default_sampled_kernel, dense_weight_gradient, sampled_weight_gradient

DEFAULT_SHAPES = "576x1536,1536x576,4096x11008"
QUICK_SHAPES = "576x1536"
DENSITIES = "0.005,0.01,0.02,0.05,0.1"
LARGE_LAYER = 4_000_000  # weights; layers this big get --large-repeats timed runs instead of --repeats
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GATHER_CHUNK_BYTES = 16 * 2**20  # bound on each gathered [chunk, T] fp32 block of the naive kernel


@dataclass
class Case:
    """Measurements of one (shape, density) case; times in ms."""

    out_features: int
    in_features: int
    density: float
    k: int
    tokens: int
    frozen: float
    sampled: dict[str, float]  # per sampled kernel
    dense: float
    gather: float | None  # None when skipped as too slow
    rule_kernel: str  # the CPU's default sampled kernel, which the rule weighs against dense
    rule_uses_dense: bool

    @property
    def sampled_is_faster(self) -> bool:
        return self.sampled[self.rule_kernel] < self.dense

    @property
    def rule_is_right(self) -> bool:
        return self.rule_uses_dense != self.sampled_is_faster

    def entry_cost_ratio(self, kernel: str) -> float:
        """(sampled ms per sampled entry·token) / (dense ms per dense entry·token)."""
        per_sampled = self.sampled[kernel] / (self.k * self.tokens)
        per_dense = self.dense / (self.out_features * self.in_features * self.tokens)
        return per_sampled / per_dense


def sampled_kernels(device: torch.device) -> tuple[str, ...]:
    """The device's sampled kernels that are installed, the default first."""
    return tuple(dict.fromkeys([default_sampled_kernel(device), "sampled_addmm"]))


def frozen_forward_backward(x: torch.Tensor, weight: torch.Tensor, grad_output: torch.Tensor) -> None:
    """The frozen layer's forward and input-gradient product, without autograd bookkeeping."""
    F.linear(x, weight)
    grad_output @ weight


def gather_multiply(grad_output: torch.Tensor, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Naive delta gradient: for each position, the dot product of its g column and x column."""
    in_features, tokens = x.shape[1], x.shape[0]
    g_t, x_t = grad_output.t().float().contiguous(), x.t().float().contiguous()  # [out, T], [in, T]
    rows, cols = index // in_features, index % in_features
    chunk = max(1, GATHER_CHUNK_BYTES // (tokens * 4))
    parts = [(g_t[rows[s : s + chunk]] * x_t[cols[s : s + chunk]]).sum(1) for s in range(0, index.numel(), chunk)]
    return torch.cat(parts)


def dense_then_gather(grad_output: torch.Tensor, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return dense_weight_gradient(grad_output, x).view(-1)[index]


def check_agreement(name: str, result: torch.Tensor, reference: torch.Tensor) -> None:
    """Fail loudly if a kernel computes something else than the dense reference."""
    torch.testing.assert_close(result.float(), reference, rtol=1e-3, atol=1e-2, msg=lambda m: f"{name}: {m}")


def measure_shape(
    out_features: int, in_features: int, densities: list[float], args: argparse.Namespace
) -> list[Case]:
    """All kernels at every density for one weight shape."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    weight = pruned_linear(out_features, in_features, device, args.seed).weight.detach().to(dtype)
    generator = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(args.tokens, in_features, generator=generator).to(device, dtype)
    grad_output = torch.randn(args.tokens, out_features, generator=generator).to(device, dtype)
    repeats = args.large_repeats if weight.numel() >= LARGE_LAYER else args.repeats

    cases = []
    for density in densities:
        index = initial_delta_index(weight, round(density * weight.numel()), args.seed + 2)
        kernels_to_time = {"frozen": lambda: frozen_forward_backward(x, weight, grad_output)}
        for kernel in sampled_kernels(device):
            pattern = SamplingPattern(index, out_features, in_features, kernel=kernel)
            kernels_to_time[kernel] = lambda pattern=pattern: sampled_weight_gradient(grad_output, x, pattern)
        kernels_to_time["dense"] = lambda: dense_then_gather(grad_output, x, index)
        if index.numel() * args.tokens <= args.gather_max_work:
            kernels_to_time["gather"] = lambda: gather_multiply(grad_output, x, index)
        reference = (grad_output.float().t() @ x.float()).view(-1)[index]  # the plain fp32 product
        for name in (*sampled_kernels(device), "dense", "gather"):
            if name in kernels_to_time:
                check_agreement(name, kernels_to_time[name](), reference)
        ms = interleaved_median_ms(kernels_to_time, repeats, device)
        case = Case(
            out_features=out_features,
            in_features=in_features,
            density=density,
            k=index.numel(),
            tokens=args.tokens,
            frozen=ms["frozen"],
            sampled={kernel: ms[kernel] for kernel in sampled_kernels(device)},
            dense=ms["dense"],
            gather=ms.get("gather"),
            rule_kernel=default_sampled_kernel(index.device),
            rule_uses_dense=SamplingPattern(index, out_features, in_features).kernel == "dense",
        )
        cases.append(case)
        print(f"  {out_features}x{in_features} density {density:.1%}: done", flush=True)
    return cases


def fmt(ms: float | None, unit: float) -> str:
    if ms is None:
        return "skipped"
    return f"{ms:.1f} ({ms / unit:.2f}×)"


def faster(case: Case) -> str:
    """'sampled by 35%': the faster of (b, default kernel)/(c) and how much longer the other took."""
    sampled = case.sampled[case.rule_kernel]
    margin = max(sampled, case.dense) / min(sampled, case.dense) - 1
    return f"{'sampled' if case.sampled_is_faster else 'dense'} by {margin:.0%}"


def table(cases: list[Case]) -> str:
    kernels_measured = list(cases[0].sampled)
    headers = [
        "layer (out×in)",
        "density",
        "k",
        "(a) frozen fwd + bwd(x) ms",
        *(f"(b) sampled, {kernel} ms (×a)" for kernel in kernels_measured),
        "(c) dense gᵀx + gather ms (×a)",
        "(d) gather-multiply ms (×a)",
        f"rule picks ({cases[0].rule_kernel})",
        "faster of b/c (margin)",
        "rule right?",
        *(f"per-entry cost ratio, {kernel}" for kernel in kernels_measured),
    ]
    rows = [
        [
            f"{c.out_features}×{c.in_features}",
            f"{c.density:.1%}",
            c.k,
            f"{c.frozen:.1f}",
            *(fmt(c.sampled[kernel], c.frozen) for kernel in kernels_measured),
            fmt(c.dense, c.frozen),
            fmt(c.gather, c.frozen),
            "dense" if c.rule_uses_dense else "sampled",
            faster(c),
            "yes" if c.rule_is_right else "**no**",
            *(f"{c.entry_cost_ratio(kernel):.1f}" for kernel in kernels_measured),
        ]
        for c in cases
    ]
    return markdown_table(headers, rows)


def ratio_summary(cases: list[Case]) -> str:
    """Each kernel's per-entry cost ratio, overall and per shape, against the rule's constant."""
    lines = []
    for kernel in cases[0].sampled:
        ratios = [c.entry_cost_ratio(kernel) for c in cases]
        constant = kernels.SAMPLED_ENTRY_COST[kernel]
        lines.append(
            f"Per-entry cost ratio of {kernel} (sampled ms / (k·T)) / (dense ms / (out·in·T)): "
            f"{min(ratios):.1f} to {max(ratios):.1f} (median {statistics.median(ratios):.1f}) over {len(cases)} "
            f"cases; the cost rule uses SAMPLED_ENTRY_COST[{kernel!r}] = {constant}, i.e. samples below density "
            f"{1 / constant:.1%}. Sampling is faster in a case exactly when its ratio < 1/density."
        )
        for shape in dict.fromkeys((c.out_features, c.in_features) for c in cases):
            shape_ratios = [c.entry_cost_ratio(kernel) for c in cases if (c.out_features, c.in_features) == shape]
            lines.append(f"- {shape[0]}×{shape[1]}: {min(shape_ratios):.1f} to {max(shape_ratios):.1f}")
    wrong = [c for c in cases if not c.rule_is_right]
    lines.append(
        f"The cost rule ({cases[0].rule_kernel} or dense) picked the faster path in every case."
        if not wrong
        else f"The cost rule ({cases[0].rule_kernel} or dense) picked the slower path in: "
        + ", ".join(f"{c.out_features}×{c.in_features} at {c.density:.1%}" for c in wrong)
        + "."
    )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated OUTxIN weight shapes")
    parser.add_argument("--quick", action="store_true", help=f"only {QUICK_SHAPES}")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens T per batch")
    parser.add_argument("--densities", default=DENSITIES, help="comma-separated delta densities")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per measurement")
    parser.add_argument("--large-repeats", type=int, default=3, help=f"timed runs for layers >= {LARGE_LAYER} weights")
    parser.add_argument(
        "--gather-max-work",
        type=float,
        default=1e9,
        help="skip the naive gather-multiply when k·T exceeds this (it takes ~5 s per 1e9 on 2 cores)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="of x, g and the weight")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "delta_grad_kernels.md")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    start = cpu_snapshot()
    shapes = parse_shapes(QUICK_SHAPES if args.quick else args.shapes)
    densities = [float(d) for d in args.densities.split(",")]
    cases = []
    for out_features, in_features in shapes:
        cases += measure_shape(out_features, in_features, densities, args)
    report = "\n\n".join(
        [
            "# Delta-gradient kernels",
            f"{machine_description(torch.device(args.device))} T = {args.tokens} tokens, {args.dtype}. Each time is the median "
            f"of {args.repeats} runs ({args.large_repeats} for layers ≥ {LARGE_LAYER:,} weights), timed in "
            "rounds that run (a)-(d) once each, after one warm-up round; (a) is re-timed with every density. "
            f"(b) and (d) are checked against (c) first. {contention_note(start)}",
            table(cases),
            ratio_summary(cases),
        ]
    )
    print()
    write_report(report, args.output)


if __name__ == "__main__":
    main()
