"""The report of ``benchmarks/speed.py``, built from its rounds' raw measurements.

What each method is, the protocol constants the runs and the report share, SEFT's steps split by kind
(ordinary, accumulation window, update) with the topology's share extrapolated to the engine's
default cadence and to a whole run, and the goals with their verdicts.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass

import torch

from baselines import PROJECTIONS
from common import machine_description, markdown_table
from seft_trl import allocator
from seft_trl.config import SparsityEvolutionConfig
from seft_trl.topology import drop_fraction_at, is_update_step

METHODS = ("floor", "trainer_floor", "seft", "seft_mean_swap", "lora", "masked_full")
SEFT_METHODS = ("seft", "seft_mean_swap")  # their window and update steps are reported apart
DESCRIPTIONS = {
    "floor": "frozen model, forward + input-gradient-only backward, no optimizer",
    "trainer_floor": "SFTTrainer training only the first layer's input norm: the floor plus the trainer's own per-step cost",
    "seft": "SEFTSFTTrainer, ordinary steps (outside accumulation windows)",
    "seft_mean_swap": "the same, its window and update swapping the mean drop fraction of a run at the defaults",
    "lora": "SFTTrainer + peft LoRA r=8",
    "masked_full": "SFTTrainer, projection weights trained under the pruning mask",
}
LORA_RANK, LORA_ALPHA = 8, 16
WARMUP_STEPS = 2
HOST_SPREAD_LIMIT = 0.85  # slowest / fastest host probe below this: the runs ran on different machines, in effect
LEARNING_RATE = 1e-4
DEFAULTS = SparsityEvolutionConfig()  # the cadence the extrapolation targets (update_interval, accumulation_steps)
MODEL_NAMES = {
    "tiny": "tiny random LLaMA (seft_trl.testing)",
    "smollm2": "SmolLM2-135M-Instruct",
    "llama-large": "LLaMA-shaped random model (TinyLlama-1.1B shapes, 16 layers)",
}
PRUNING = {
    "tiny": "by magnitude, 50% per layer (random weights)",
    "smollm2": "with Wanda, 50% unstructured (32 calibration windows of 512 tokens, as the demo)",
    "llama-large": "by magnitude, 50% per layer (random weights)",
}
TINY_NOTE = (
    "**The tiny model only checks that the benchmark runs**: the trainers' fixed per-step costs dominate its "
    "milliseconds of compute, so its ratios say nothing about real models."
)
# A run at the defaults of this many steps sets the mean drop fraction the seft_mean_swap run swaps.
NOMINAL_RUN_STEPS = 1000
MIB = 2**20


def run_swaps(total_steps: int = NOMINAL_RUN_STEPS) -> list[float]:
    """The drop fractions of the topology updates of a run of ``total_steps`` at the defaults, in order.

    Updates come every ``update_interval`` steps up to ``update_end`` of the run, and one whose
    scheduled fraction is 0 opens no window (the engine's rule).
    """
    end_step = int(DEFAULTS.update_end * total_steps)
    steps = range(DEFAULTS.update_interval, total_steps + 1, DEFAULTS.update_interval)
    fractions = [drop_fraction_at(step, end_step, DEFAULTS.drop_fraction, DEFAULTS.drop_schedule)
                 for step in steps if is_update_step(step, DEFAULTS.update_interval, end_step)]
    return [fraction for fraction in fractions if fraction > 0]


def mean_drop_fraction() -> float:
    """The mean fraction the updates of a nominal run at the defaults swap (0.1 under the cosine decay)."""
    swaps = run_swaps()
    return sum(swaps) / len(swaps)


@dataclass
class SeftBreakdown:
    """SEFT's step times split by kind, and the topology share measured and extrapolated to the defaults."""

    ordinary: float  # median ordinary step (s)
    window: dict[int, float]  # step -> seconds: the window's (the update step without the update) and the next
    update: float  # seconds in update_topology
    window_extra: float  # those steps beyond as many ordinary steps (s)
    train_seconds: float

    @property
    def topology_seconds(self) -> float:
        return self.update + self.window_extra

    @property
    def share_at_defaults(self) -> float:
        cycle = DEFAULTS.update_interval * self.ordinary + self.topology_seconds
        return self.topology_seconds / cycle

    @property
    def amortized_step(self) -> float:
        """Mean step time over one default update cycle (update_interval steps)."""
        return self.ordinary + self.topology_seconds / DEFAULTS.update_interval



@dataclass
class RunEstimate:
    """The topology's cost over a whole run at the defaults (``NOMINAL_RUN_STEPS`` steps).

    The run's windows swap fractions decaying from the full drop fraction to 0, and a window's
    cost grows with its fraction (candidates tracked, ranked and planned) on top of a part that
    does not (the dense gradient, the passes over every weight). Taking that growth as linear,
    the window at the mean fraction costs the mean window.
    """

    ordinary: float  # SEFT's ordinary step (s)
    window_cost: float  # one window and its update beyond as many ordinary steps (s)
    windows_per_step: float  # windows (= updates) per optimizer step of the run

    @property
    def topology_per_step(self) -> float:
        return self.windows_per_step * self.window_cost

    @property
    def share(self) -> float:
        return self.topology_per_step / (self.ordinary + self.topology_per_step)

    @property
    def amortized_step(self) -> float:
        return self.ordinary + self.topology_per_step


def run_estimate(ordinary: float, window_cost: float) -> RunEstimate:
    return RunEstimate(ordinary, window_cost, len(run_swaps()) / NOMINAL_RUN_STEPS)


def first_window_step(steps: int) -> int:
    """The first step of the SEFT runs' one accumulation window, which ends at the last step."""
    return steps - DEFAULTS.accumulation_steps + 1


def merge_rounds(rounds: list[dict], steps: int) -> dict:
    """One method's measurements over all rounds: step times kept per round, the rest as medians."""
    median = statistics.median
    return {
        "trainable": rounds[0]["trainable"],
        "state_bytes": rounds[0]["state_bytes"],
        "train_seconds": median(r["train_seconds"] for r in rounds),
        # A peak is what the machine must hold: the highest of the rounds. Between identical runs it
        # moves by hundreds of MiB (where the allocator happens to place the activations), so the
        # rounds' own peaks are kept beside it.
        "memory_peak": max(r["memory_peak"] for r in rounds),
        "memory_peak_median": median(r["memory_peak"] for r in rounds),
        "memory_increment": median(r["memory_peak"] - r["memory_before"] for r in rounds),
        # The peak through the step before SEFT's window opens (the same step in every method's run).
        "memory_peak_before_window": max((r["step_peaks"].get(first_window_step(steps) - 1, 0) for r in rounds),
                                         default=0),
        "other_load": max(r["other_load"] for r in rounds),
        "rounds": rounds,
    }


def timed_steps(round_result: dict) -> dict[int, float]:
    return {step: seconds for step, seconds in round_result["step_seconds"].items() if step > WARMUP_STEPS}


def seft_breakdown(result: dict, steps: int) -> SeftBreakdown:
    """Ordinary steps pooled over the rounds; each window step, the step after the update and the update
    itself as medians over the rounds."""
    window_steps = range(first_window_step(steps), steps + 2)
    ordinary, updates, windows = [], [], []
    for round_result in result["rounds"]:
        if len(round_result["update_seconds"]) != 1:
            raise RuntimeError(f"A SEFT run made {len(round_result['update_seconds'])} topology updates, not one.")
        timed = timed_steps(round_result)
        update = sum(round_result["update_seconds"])
        ordinary += [seconds for step, seconds in timed.items() if step not in window_steps]
        updates.append(update)
        windows.append({step: timed[step] - (update if step == steps else 0.0) for step in window_steps})
    ordinary_step = statistics.median(ordinary)
    window = {step: statistics.median(w[step] for w in windows) for step in window_steps}
    extra = sum(window.values()) - len(window) * ordinary_step
    return SeftBreakdown(ordinary_step, window, statistics.median(updates), extra, result["train_seconds"])


def training_increment(result: dict) -> int:
    return result["memory_increment"]


def round_medians(result: dict, window_steps: range) -> list[float]:
    """Each round's median timed step (for SEFT, of its ordinary steps): the spread between rounds."""
    return [statistics.median(s for step, s in timed_steps(r).items() if step not in window_steps)
            for r in result["rounds"]]


def median_step(method: str, result: dict, steps: int) -> float:
    """The median timed step; of a SEFT run, of its ordinary steps."""
    if method in SEFT_METHODS:
        return seft_breakdown(result, steps).ordinary
    return statistics.median(s for r in result["rounds"] for s in timed_steps(r).values())


def verdict(value: float, goal: float) -> str:
    return "met" if value <= goal else "not met"


def results_table(results: dict[str, dict], seft: SeftBreakdown, unit: str, n_steps: int) -> str:
    steps = {method: median_step(method, result, n_steps) for method, result in results.items()}
    window_steps = range(min(seft.window), max(seft.window) + 1)
    lora = results["lora"]
    rows = []
    for method, result in results.items():
        increment = training_increment(result)
        excluded = window_steps if method in SEFT_METHODS else range(0)
        rows.append([
            method,
            DESCRIPTIONS[method],
            f"{result['trainable']:,}",
            f"{steps[method]:.3f}",
            ", ".join(f"{seconds:.2f}" for seconds in round_medians(result, excluded)),
            f"{steps[method] / steps['floor']:.2f}",
            f"{steps[method] / steps['lora']:.2f}",
            f"{result['memory_peak'] / MIB:.0f}",
            ", ".join(f"{r['memory_peak'] / MIB:.0f}" for r in result["rounds"]),
            f"{increment / MIB:.0f}",
            f"{result['memory_peak'] / lora['memory_peak']:.2f}",
            f"{increment / training_increment(lora):.2f}",
            "—" if result.get("state_bytes") is None else f"{result['state_bytes'] / result['trainable']:.1f}",
            f"{result['other_load']:.2f}",
        ])
    headers = ["method", "what", "trainable params", "median step (s)", "round medians (s)", "× floor", "× LoRA", f"peak {unit} (MiB)",
               "round peaks (MiB)", "increment during training (MiB)", "peak × LoRA", "increment × LoRA", "own state (B per trainable)",
               "other load (cores)"]
    return markdown_table(headers, rows)


def breakdown_text(seft: SeftBreakdown, mean_swap: SeftBreakdown, run: RunEstimate, steps: int, rounds: int) -> str:
    window = ", ".join(f"step {step}: {seconds:.3f} s" for step, seconds in seft.window.items())
    interval, accumulation = DEFAULTS.update_interval, DEFAULTS.accumulation_steps
    first, last = WARMUP_STEPS + 1, steps - accumulation
    ordinary_steps = f"step {first}" if first == last else f"steps {first} to {last}"
    return "\n".join([
        "## SEFT: ordinary steps, accumulation window, topology update",
        "",
        f"* Ordinary step (median of {ordinary_steps} of {rounds} round(s)): {seft.ordinary:.3f} s.",
        f"* Window steps and the step after the update (medians over the rounds; {window}; the first picks candidates "
        "from one dense weight gradient per layer, the window's last excludes the update itself, the step after it "
        "builds every layer's sampling pattern for the new positions): "
        f"{seft.window_extra:.3f} s more than {len(seft.window)} ordinary steps in all.",
        f"* Topology update (`update_topology`, one call, median over the rounds): {seft.update:.3f} s.",
        f"* Measured in this run: the update took {seft.update / seft.train_seconds:.1%} of the training wall time "
        f"({seft.train_seconds:.1f} s), update + window overhead {seft.topology_seconds / seft.train_seconds:.1%}; "
        f"this run packs one update into {steps} steps, so these shares overstate the defaults.",
        f"* Extrapolated to the defaults (an update every {interval} steps, windows of {accumulation}): "
        f"share = (update + window overhead) / ({interval} × ordinary step + update + window overhead) = "
        f"({seft.update:.3f} + {seft.window_extra:.3f}) / ({interval} × {seft.ordinary:.3f} + "
        f"{seft.topology_seconds:.3f}) = **{seft.share_at_defaults:.1%}**; amortized step "
        f"= ordinary + (update + window overhead) / {interval} = **{seft.amortized_step:.3f} s**.",
        f"* Over a whole run at the defaults: a run of {NOMINAL_RUN_STEPS} steps has {len(run_swaps())} windows, in "
        f"the first {DEFAULTS.update_end:.0%} of its steps, whose drop fraction decays from {DEFAULTS.drop_fraction} "
        f"to 0 ({DEFAULTS.drop_schedule}; mean {mean_drop_fraction():.3f}). The seft_mean_swap run swaps that mean: "
        f"update {mean_swap.update:.3f} s + window overhead {mean_swap.window_extra:.3f} s = "
        f"{mean_swap.topology_seconds:.3f} s a window (window steps: "
        + ", ".join(f"step {step}: {seconds:.3f} s" for step, seconds in mean_swap.window.items())
        + f"; its ordinary step {mean_swap.ordinary:.3f} s). Taking a window's cost as linear in its fraction, that is "
        f"the mean window: share = {run.windows_per_step:.3f} windows a step × {run.window_cost:.3f} s / (ordinary "
        f"step {run.ordinary:.3f} s + that) = **{run.share:.1%}**; amortized step **{run.amortized_step:.3f} s**. "
        f"Every window at the first's cost (an upper bound): "
        f"{run_estimate(run.ordinary, seft.topology_seconds).share:.1%}.",
    ])


def goals_text(results: dict[str, dict], seft: SeftBreakdown, run: RunEstimate, unit: str, steps: int) -> str:
    """The goals of issues 11 and 41, each with the measured value and whether it was met."""
    lora_step = median_step("lora", results["lora"], steps)
    to_masked_full = run.amortized_step / median_step("masked_full", results["masked_full"], steps)
    trainer_floor = median_step("trainer_floor", results["trainer_floor"], steps)
    seft_result, lora = results["seft"], results["lora"]
    peak = seft_result["memory_peak"] / lora["memory_peak"]
    median_peak = seft_result["memory_peak_median"] / lora["memory_peak_median"]
    increment = training_increment(seft_result) / training_increment(lora)
    amortized, ordinary = seft.amortized_step / lora_step, seft.ordinary / lora_step
    run_amortized = run.amortized_step / lora_step
    to_trainer_floor = seft.amortized_step / trainer_floor
    own_bytes = seft_result["state_bytes"] / seft_result["trainable"]
    before = [result["memory_peak_before_window"] for result in (seft_result, lora)]
    before_window = (
        f" Before SEFT's window opens (the peak through step {first_window_step(steps) - 1}, the highest of the "
        f"rounds): SEFT {before[0] / MIB:.0f} MiB, LoRA {before[1] / MIB:.0f} MiB ({before[0] / before[1]:.2f}×)."
        if all(before) else ""
    )
    return "\n".join([
        "## Goals",
        "",
        f"* SEFT's step amortized at the defaults ≤ 1.0× LoRA's: {amortized:.3f}× over an update interval while "
        f"updates run — {verdict(amortized, 1.0)}; over a whole run at the defaults "
        f"{run_amortized:.3f}× — {verdict(run_amortized, 1.0)}; the ordinary step alone: {ordinary:.3f}× — "
        f"{verdict(ordinary, 1.0)}.",
        f"* Stretch, ≤ 1.10× the trainer floor (the same trainer, no adapter): {to_trainer_floor:.2f}× — "
        f"{verdict(to_trainer_floor, 1.10)} (LoRA: {lora_step / trainer_floor:.2f}×).",
        f"* Topology updates plus window overhead ≤ 2% of wall time at the defaults: {seft.share_at_defaults:.1%} "
        f"of an update interval at the first, largest swap (extrapolated) — {verdict(seft.share_at_defaults, 0.02)}; "
        f"{run.share:.1%} of a whole run (windows at the mean swap) — {verdict(run.share, 0.02)}.",
        f"* Whole-process peak memory ≤ LoRA's: {peak:.2f}× the peak {unit} (the highest of the rounds) — "
        f"{verdict(peak, 1.0)}; the rounds' median peaks: {median_peak:.2f}× — {verdict(median_peak, 1.0)}; "
        f"the increment during training (median): {increment:.2f}× — {verdict(increment, 1.0)}.{before_window}",
        f"* SEFT's own state ≤ 12 B per delta (optimizer state excluded): {own_bytes:.1f} B — {verdict(own_bytes, 12.0)}.",
        f"* Issue 41, at {seft_result['trainable']:,} deltas: SEFT's step over a whole run at the defaults ≤ 1.1× "
        f"masked full fine-tuning's: {to_masked_full:.3f}× — {verdict(to_masked_full, 1.1)}; ≤ 1.3× LoRA r={LORA_RANK}'s: "
        f"{run_amortized:.3f}× — {verdict(run_amortized, 1.3)}.",
        "",
    ])


def contention_text(results: dict[str, dict]) -> str:
    # common.contention_note would count the workers' CPU time as other processes' (it only
    # subtracts the calling process's own), so each worker measures the others' load itself.
    worst = max(result["other_load"] for result in results.values())
    verdict_text = "the times are inflated" if worst > 0.1 else "the machine was quiet"
    lines = [
        f"Other processes kept up to {worst:.2f} of the cores busy on average while a method trained (column "
        f"'other load': /proc/stat busy time minus the worker's CPU time): {verdict_text}."
    ]
    probes = [(method, index + 1, r["host"]) for method, result in results.items()
              for index, r in enumerate(result["rounds"]) if "host" in r]
    if probes:
        spread = {}
        for key, what, unit in (("matmul_gflops", "a 1024² matmul", "GFLOP/s"), ("copy_gbps", "a 256 MiB copy", "GB/s"),
                                ("fresh_gbps", "256 MiB of freshly mapped memory (page faults)", "GB/s")):
            values = [probe[key] for _, _, probe in probes]
            spread[key] = min(values) / max(values)
            slowest = min(probes, key=lambda probe: probe[2][key])
            lines.append(f"Host probe, {what} (timed before and after each run, the slower kept): "
                         f"{min(values):.1f}-{max(values):.1f} {unit} over the runs, the slowest {slowest[0]} in "
                         f"round {slowest[1]}.")
        steady = min(spread["matmul_gflops"], spread["copy_gbps"]) >= HOST_SPREAD_LIMIT
        lines.append("Page faults reach the workers only while their heap grows (the allocator setting above), so "
                     "that probe is reported, not judged.")
        lines.append("The host ran at a steady speed (matmul and copy)." if steady else
                     f"The host's speed varied by more than {1 - HOST_SPREAD_LIMIT:.0%} between runs: the methods' "
                     "times are not comparable; rerun on a quiet host.")
    return " ".join(lines)


def seft_budget(args: argparse.Namespace, results: dict[str, dict]) -> str:
    """How many deltas SEFT trains, in words."""
    if args.seft_density is None:
        return ("SEFT gets as many deltas (`seft_num_deltas`, split over the same projections in proportion to their "
                "size)")
    deltas, lora = results["seft"]["trainable"], results["lora"]["trainable"]
    return (f"SEFT trains a density of {args.seft_density:g} of every projection (`seft_density`): {deltas:,} deltas, "
            f"{deltas / lora:.1f}× LoRA's count")


def report(args: argparse.Namespace, prepared: dict, results: dict[str, dict], wall: float) -> str:
    device = torch.device(args.device)
    seft = seft_breakdown(results["seft"], args.steps)
    mean_swap = seft_breakdown(results["seft_mean_swap"], args.steps)
    run = run_estimate(seft.ordinary, mean_swap.topology_seconds)
    unit = "CUDA memory allocated" if device.type == "cuda" else "RSS"
    dtype = "bf16 weights, bf16 autocast" if device.type == "cuda" else "fp32"
    lora_count = f"{results['lora']['trainable']:,}"
    return "\n\n".join([
        f"# Training speed and memory: SEFT vs LoRA vs masked full fine-tuning ({MODEL_NAMES[args.model]})",
        f"Model: {MODEL_NAMES[args.model]}, {prepared['parameters']:,} parameters, pruned {PRUNING[args.model]} "
        f"({prepared['sparsity']:.1%} of the decoder's linear weights are zero), on {device}, {dtype}. Batches: "
        f"{args.batch} sequences × {args.seqlen} tokens ({prepared['chunks']} training chunks). {args.steps} "
        f"optimizer steps per method, the first {WARMUP_STEPS} excluded as warm-up; optim `{args.optim}`, lr "
        f"{LEARNING_RATE:g} constant, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, each "
        f"method in its own process, {args.rounds} round(s) that run every method once in turn (the round medians "
        "column shows the spread between rounds).",
        f"Trainable parameters: LoRA r={LORA_RANK} (alpha {LORA_ALPHA}, no dropout) on "
        f"{', '.join(PROJECTIONS)} has {lora_count}; {seft_budget(args, results)}. masked_full trains the nonzero entries of the same "
        "projections (its optimizer keeps dense state). SEFT runs with update_interval = steps, "
        f"accumulation_steps {DEFAULTS.accumulation_steps}, update_end 1.0 and a constant drop fraction "
        f"{DEFAULTS.drop_fraction}, so its last {DEFAULTS.accumulation_steps} steps form one window ending in one "
        "update, and one more step, the first on the new topology; seft_mean_swap runs the same with the mean drop "
        f"fraction of a run at the defaults ({mean_drop_fraction():.3f}).",
        f"Step: on_step_begin → on_step_end of the Trainer (forward, backward, clipping, optimizer, callbacks), "
        f"median over the timed steps; for the floor, forward + backward. Memory: peak {unit} of the method's "
        "process while it trained (the peak is reset when training starts, so model loading does not count), the "
        "highest of the rounds and each round's, and the increase over the value at that moment (median of the rounds). Own state: the bytes a method keeps beside the frozen model per "
        "trainable value, optimizer state excluded (SEFT: δ, its position and its base value; LoRA: A and B).",
        "Allocator: every worker runs with " + ", ".join(f"`{k}={v}`" for k, v in allocator.ENVIRONMENT.items())
        + ": glibc serves blocks of any size from its heap and never returns freed memory to the system, so a step "
        "reuses the pages of the last instead of faulting fresh ones in (whose cost followed the host's load). The "
        "peaks are the heap's high-water marks under that setting, the same for every method.",
        *([TINY_NOTE] if args.model == "tiny" else []),
        results_table(results, seft, unit, args.steps),
        breakdown_text(seft, mean_swap, run, args.steps, args.rounds),
        goals_text(results, seft, run, unit, args.steps),
        f"{machine_description(device)} Total wall time {wall:.0f} s. {contention_text(results)}",
        f"Command: `python benchmarks/speed.py --model {args.model} --device {args.device} --steps {args.steps} "
        f"--seqlen {args.seqlen} --batch {args.batch} --threads {args.threads} --optim {args.optim} "
        f"--rounds {args.rounds}"
        f"{' --gradient-checkpointing' if args.gradient_checkpointing else ''}"
        f"{'' if args.seft_density is None else f' --seft-density {args.seft_density:g}'}`",
    ])
