"""Repair quality: SEFT against the sparsity-preserving baselines on a real pruned model.

SmolLM2-135M-Instruct is pruned with Wanda (50% unstructured, 2:4, 70%) and fine-tuned by every
method on the same token budget in the same data order, with the same loop (AdamW, no weight decay,
linear warm-up then cosine decay, gradient clipping at 1.0). Methods (see baselines.py):

* ``pruned``: no fine-tuning;
* ``lora``: peft LoRA r=8 merged, dense (sparsity lost: the reference row);
* ``lora*``: the same LoRA run merged, then re-pruned with Wanda to the target pattern;
* ``masked_lora`` (SQFT), ``spp`` (SPP-style scaling), ``masked_full`` (masked full fine-tuning);
* ``fixed_deltas``: sparse deltas on a fixed random support (SEFT with evolution off);
* ``seft`` and its ablations ``seft_no_revival`` (regrow_pruned=False), ``seft_magnitude``
  (prune_criterion=magnitude), ``seft_revert`` (drop_mode=revert).

Trainable counts match LoRA r=8 on the 7 projections (sparse deltas get exactly that many; masked
full fine-tuning trains every surviving weight). The learning rate of each method is picked on a
small grid at 50% (extended while the best point is at its edge) by perplexity on validation articles (never trained on, never reported as the
result) and reused at 2:4 and 70%; ablations reuse SEFT's. The reported number is perplexity on the
held-out articles. The headline rows (SEFT and the best sparsity-preserving baseline of each
pattern) are repeated with more seeds; a seed changes the data order and the initialisation.

SEFT's topology cadence is scaled to the short run (the defaults, interval 20 with a 5-step window,
are meant for runs of thousands of steps): interval = steps // 8, window = interval // 2.

Every finished run is appended to ``quality_runs.csv``, so an interrupted benchmark resumes where it
stopped; ``--report-only`` rebuilds the Markdown and the chart from that file. The committed
results folder already holds every run, so measure afresh into another ``--output-dir``.

    python benchmarks/quality.py --output-dir DIR  # ~2.5 h on 2 cores (make bench-quality)
    python benchmarks/quality.py --quick --output-dir /tmp/q   # tiny random model, every method, seconds
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from baselines import (
    Adapter,
    PROJECTIONS,
    low_rank_adapter,
    lora_trainable_count,
    masked_full_adapter,
    peft_lora_adapter,
    seft_adapter,
)
from common import RESULTS_DIR, contention_note, cpu_snapshot, machine_description, markdown_table
from seft_trl import SparsityEvolutionConfig
from seft_trl.evaluation import perplexity
from seft_trl.pruning import prune
from seft_trl.report import SparsityReport, sparsity_report

PATTERNS = {"50%": ("unstructured", 0.5), "2:4": ("2:4", None), "70%": ("unstructured", 0.7)}
LOW_RANK_GRID = (4e-4, 1e-3, 2.5e-3)
GRIDS = {
    "lora": LOW_RANK_GRID,
    "masked_lora": LOW_RANK_GRID,
    "spp": LOW_RANK_GRID,
    "masked_full": (2e-5, 5e-5, 1.25e-4),
    "fixed_deltas": (2e-4, 5e-4, 1.25e-3),
    "seft": (2e-4, 5e-4, 1.25e-3),
}
GRID_FACTOR, MAX_GRID_EXTENSIONS = 2.5, 2
ABLATIONS = {
    "seft_no_revival": {"regrow_pruned": False},
    "seft_magnitude": {"prune_criterion": "magnitude"},
    "seft_revert": {"drop_mode": "revert"},
}
SPARSE_BASELINES = ("lora*", "masked_lora", "spp", "fixed_deltas", "masked_full")
METHOD_ORDER = ("pruned", "lora", "lora*", "masked_lora", "spp", "masked_full", "fixed_deltas", "seft", *ABLATIONS)


@dataclass
class RunResult:
    """One row of quality_runs.csv."""

    pattern: str
    method: str
    lr: float
    seed: int
    val_ppl: float
    test_ppl: float
    sparsity: float
    sparsity_kept: bool
    trainable: int
    revived: int
    final_loss: float
    train_s: float

    @property
    def key(self) -> tuple[str, str, float, int]:
        return (self.pattern, self.method, self.lr, self.seed)


def read_runs(path: Path) -> dict[tuple, RunResult]:
    if not path.exists():
        return {}
    runs = {}
    with path.open() as handle:
        for row in csv.DictReader(handle):
            run = RunResult(
                pattern=row["pattern"], method=row["method"], lr=float(row["lr"]), seed=int(row["seed"]),
                val_ppl=float(row["val_ppl"]), test_ppl=float(row["test_ppl"]), sparsity=float(row["sparsity"]),
                sparsity_kept=row["sparsity_kept"] == "True", trainable=int(row["trainable"]),
                revived=int(row["revived"]), final_loss=float(row["final_loss"]), train_s=float(row["train_s"]),
            )
            runs[run.key] = run
    return runs


def append_run(path: Path, run: RunResult) -> None:
    """Append one row (header first if the file is new); a crash loses at most the current run."""
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(run)))
        if new:
            writer.writeheader()
        writer.writerow(asdict(run))


# ------------------------------------------------------------------------------------------ setup
@dataclass
class Workload:
    """Everything that is the same for every method: model, text, budget."""

    load_model: Callable[[], nn.Module]
    tokenizer: object
    calibration_texts: list[str]
    train_ids: torch.Tensor  # [chunks, seqlen]
    val_ids: torch.Tensor  # [tokens]
    test_ids: torch.Tensor  # [tokens]
    steps: int
    batch_size: int
    eval_seqlen: int
    calibration: dict  # nsamples, seqlen of the Wanda calibration
    rank: int
    model_name: str

    def batches(self, seed: int) -> list[torch.Tensor]:
        """``steps`` batches of ``batch_size`` chunks in a seeded order (epochs repeat when the text runs out)."""
        generator = torch.Generator().manual_seed(seed)
        needed = self.steps * self.batch_size
        order = torch.cat([torch.randperm(len(self.train_ids), generator=generator)
                           for _ in range(-(-needed // len(self.train_ids)))])[:needed]
        return list(self.train_ids[order].split(self.batch_size))


def token_ids(tokenizer, texts: list[str]) -> torch.Tensor:
    return torch.tensor(tokenizer("\n\n".join(texts), verbose=False)["input_ids"])


def smollm2_workload(args: argparse.Namespace) -> Workload:
    from seft_trl.assets import english_texts, load_smollm2

    train_texts, test_texts = english_texts()
    train_texts, val_texts = train_texts[: -args.val_articles], train_texts[-args.val_articles:]
    _, tokenizer = load_smollm2()
    ids = token_ids(tokenizer, train_texts)
    return Workload(
        load_model=lambda: load_smollm2()[0], tokenizer=tokenizer, calibration_texts=train_texts,
        train_ids=ids[: len(ids) // args.seqlen * args.seqlen].view(-1, args.seqlen),
        val_ids=token_ids(tokenizer, val_texts), test_ids=token_ids(tokenizer, test_texts),
        steps=args.steps, batch_size=args.batch_size, eval_seqlen=args.eval_seqlen,
        calibration={"nsamples": 32, "seqlen": 512}, rank=args.rank, model_name="SmolLM2-135M-Instruct",
    )


def quick_workload(args: argparse.Namespace) -> Workload:
    """A tiny random LLaMA and the README's paragraphs: exercises every method in seconds."""
    from seft_trl.testing import byte_tokenizer, tiny_model

    readme = Path(__file__).resolve().parent.parent / "README.md"
    paragraphs = [p for p in readme.read_text().split("\n\n") if len(p) > 40]
    tokenizer = byte_tokenizer()
    ids = token_ids(tokenizer, paragraphs[: len(paragraphs) // 2])
    seqlen = 32
    return Workload(
        load_model=tiny_model, tokenizer=tokenizer, calibration_texts=paragraphs[: len(paragraphs) // 2],
        train_ids=ids[: len(ids) // seqlen * seqlen].view(-1, seqlen),
        val_ids=token_ids(tokenizer, paragraphs[len(paragraphs) // 2:][::2])[:512],
        test_ids=token_ids(tokenizer, paragraphs[len(paragraphs) // 2:][1::2])[:512],
        steps=args.steps or 8, batch_size=2, eval_seqlen=64,
        calibration={"nsamples": 4, "seqlen": 64}, rank=2, model_name="tiny random LLaMA (--quick)",
    )


# --------------------------------------------------------------------------------------- running
def train(model: nn.Module, adapter: Adapter, batches: list[torch.Tensor], lr: float) -> list[float]:
    """The loop every method shares; returns the training losses."""
    optimizer = torch.optim.AdamW(adapter.parameters, lr=lr, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, len(batches) // 16), len(batches))
    adapter.attach(optimizer, len(batches))
    model.train()
    losses = []
    for batch in batches:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(adapter.parameters, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        adapter.after_step()
        losses.append(loss.item())
    model.eval()
    return losses


def seft_config(work: Workload, count: int, seed: int, **options) -> SparsityEvolutionConfig:
    interval = max(2, work.steps // 8)
    return SparsityEvolutionConfig(
        num_deltas=count, target_modules=PROJECTIONS, update_interval=interval,
        accumulation_steps=max(1, interval // 2), seed=seed, **options,
    )


def make_adapter(method: str, model: nn.Module, work: Workload, seed: int) -> tuple[Adapter, int]:
    """The method's adapter on ``model`` and its trainable parameter count."""
    torch.manual_seed(seed)
    count = lora_trainable_count(model, work.rank)
    if method == "lora":
        return peft_lora_adapter(model, work.rank, 2 * work.rank), count
    if method == "masked_lora":
        return low_rank_adapter(model, work.rank, 2 * work.rank, "masked_add"), count
    if method == "spp":
        return low_rank_adapter(model, work.rank, 2 * work.rank, "scale"), count
    if method == "masked_full":
        adapter = masked_full_adapter(model)
        return adapter, sum(int(torch.count_nonzero(p)) for p in adapter.parameters)
    if method == "fixed_deltas":
        return seft_adapter(model, seft_config(work, count, seed, drop_fraction=0.0)), count
    if method == "seft":
        return seft_adapter(model, seft_config(work, count, seed)), count
    return seft_adapter(model, seft_config(work, count, seed, **ABLATIONS[method])), count


def kept(before: SparsityReport, after: SparsityReport) -> bool:
    """No layer holds more nonzeros than after pruning, and an N:M pattern still holds."""
    per_layer = all(a.nonzeros <= b.nonzeros for a, b in zip(after.layers, before.layers))
    return per_layer and after.pattern_holds


class Benchmark:
    def __init__(self, work: Workload, runs_path: Path, seeds: int, quick: bool) -> None:
        self.work, self.runs_path, self.seeds, self.quick = work, runs_path, seeds, quick
        self.runs = read_runs(runs_path)
        self.pruned: dict[str, tuple[nn.Module, SparsityReport]] = {}

    def pruned_copy(self, pattern: str) -> tuple[nn.Module, SparsityReport]:
        if pattern not in self.pruned:
            model = self.work.load_model()
            spec, sparsity = PATTERNS[pattern]
            started = time.perf_counter()
            report = self.wanda(model, pattern)
            print(f"[{pattern}] Wanda {spec} {sparsity or ''}: sparsity {report.sparsity:.2%} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
            self.pruned[pattern] = (model, report)
        model, report = self.pruned[pattern]
        return copy.deepcopy(model), report

    def wanda(self, model: nn.Module, pattern: str) -> SparsityReport:
        spec, sparsity = PATTERNS[pattern]
        return prune(model, "wanda", sparsity=sparsity, pattern=spec, calibration=self.work.calibration_texts,
                     tokenizer=self.work.tokenizer, target_modules=PROJECTIONS, **self.work.calibration)

    def evaluate(self, model: nn.Module) -> tuple[float, float]:
        work = self.work
        return tuple(perplexity(model, None, ids, seqlen=work.eval_seqlen, progress=False)
                     for ids in (work.val_ids, work.test_ids))

    def ensure(self, pattern: str, method: str, lr: float, seed: int = 0) -> RunResult:
        """The run's result, from the CSV or by running it now."""
        key = (pattern, method, lr, seed)
        if key not in self.runs:
            # A LoRA run yields both the dense merge (lora) and its re-pruned copy (lora*).
            for run in self.execute(pattern, "lora" if method == "lora*" else method, lr, seed):
                self.runs[run.key] = run
                append_run(self.runs_path, run)
        return self.runs[key]

    def execute(self, pattern: str, method: str, lr: float, seed: int) -> list[RunResult]:
        model, before = self.pruned_copy(pattern)
        spec = PATTERNS[pattern][0]
        common = dict(pattern=pattern, lr=lr, seed=seed)
        if method == "pruned":
            val, test = self.evaluate(model)
            return [RunResult(method=method, val_ppl=val, test_ppl=test, sparsity=before.sparsity, sparsity_kept=True,
                              trainable=0, revived=0, final_loss=math.nan, train_s=0.0, **common)]
        adapter, count = make_adapter(method, model, self.work, seed)
        started = time.perf_counter()
        losses = train(model, adapter, self.work.batches(seed), lr)
        train_s = time.perf_counter() - started
        model = adapter.finish()
        final_loss = statistics.mean(losses[-max(1, len(losses) // 8):])
        results = []
        variants = [(method, model)]
        if method == "lora":
            variants.append(("lora*", copy.deepcopy(model)))
            self.wanda(variants[1][1], pattern)
        for name, variant in variants:
            after = sparsity_report(variant, pattern=spec)
            val, test = self.evaluate(variant)
            results.append(RunResult(method=name, val_ppl=val, test_ppl=test, sparsity=after.sparsity,
                                     sparsity_kept=kept(before, after), trainable=count,
                                     revived=int(adapter.notes.get("revived", 0)), final_loss=final_loss,
                                     train_s=train_s, **common))
            print(f"[{pattern}] {name:16s} lr {lr:.2e} seed {seed}: val {val:8.2f}  test {test:8.2f}  "
                  f"sparsity {after.sparsity:.2%} kept {results[-1].sparsity_kept}  ({train_s:.0f} s)", flush=True)
        return results

    # ----------------------------------------------------------------------------------- plan
    def best_lr(self, method: str) -> float:
        """The lowest validation perplexity at the first pattern, seed 0, over the method's grid."""
        first = next(iter(PATTERNS))
        grid = self.grid(method)
        return min(grid, key=lambda lr: self.ensure(first, method, lr).val_ppl)

    def grid(self, method: str) -> list[float]:
        """The method's grid, extended by a factor-2.5 step (at most twice) while the best point is at an edge.

        A best learning rate at the edge of a grid only says the optimum lies beyond it; extending
        keeps every method tuned as well as the others, whichever way its short-run optimum lies.
        """
        base = list(GRIDS["lora" if method == "lora*" else method])
        if self.quick:
            return base[1:2]
        first = next(iter(PATTERNS))
        grid = sorted(base)
        for _ in range(MAX_GRID_EXTENSIONS):
            best = min(grid, key=lambda lr: self.ensure(first, method, lr).val_ppl)
            if best == grid[-1]:
                grid.append(float(f"{grid[-1] * GRID_FACTOR:.3g}"))
            elif best == grid[0]:
                grid.insert(0, float(f"{grid[0] / GRID_FACTOR:.3g}"))
            else:
                break
        return grid

    def lr_of(self, method: str) -> float:
        return self.best_lr("seft") if method in ABLATIONS else self.best_lr(method)

    def run_all(self) -> None:
        for pattern in PATTERNS:
            self.ensure(pattern, "pruned", 0.0)
            for method in [*GRIDS, "lora*", *ABLATIONS]:
                self.ensure(pattern, method, self.lr_of(method))
            for method in self.headline_methods(pattern):
                for seed in range(1, self.seeds):
                    self.ensure(pattern, method, self.lr_of(method), seed)

    def headline_methods(self, pattern: str) -> list[str]:
        """SEFT and the sparsity-preserving baseline with the best validation perplexity (seed 0)."""
        best = min(SPARSE_BASELINES, key=lambda m: self.ensure(pattern, m, self.lr_of(m)).val_ppl)
        return ["seft", best]

    def seed_runs(self, pattern: str, method: str) -> list[RunResult]:
        lr = self.lr_of(method) if method != "pruned" else 0.0
        return [run for (p, m, r, _), run in sorted(self.runs.items()) if (p, m, r) == (pattern, method, lr)]


# ---------------------------------------------------------------------------------------- report
def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {(max(values) - min(values)) / 2:.2f} (n={len(values)})"


def write_results(bench: Benchmark, folder: Path, wall_s: float, note: str) -> None:
    work = bench.work
    rows, csv_rows = [], []
    for pattern in PATTERNS:
        for method in METHOD_ORDER:
            runs = bench.seed_runs(pattern, method)
            if not runs:
                continue
            first = runs[0]
            tests = [run.test_ppl for run in runs]
            rows.append([pattern, method, f"{first.lr:g}" if first.lr else "-", f"{first.trainable:,}",
                         f"{first.val_ppl:.2f}", spread(tests), f"{statistics.mean(r.sparsity for r in runs):.2%}",
                         "yes" if all(r.sparsity_kept for r in runs) else "**no**",
                         f"{first.revived:,}" if method.startswith("seft") else "-",
                         f"{statistics.mean(r.train_s for r in runs):.0f}"])
    grid_rows = []
    first_pattern = next(iter(PATTERNS))
    for method in [*GRIDS, "lora*"]:
        grid = bench.grid(method)
        best = bench.best_lr(method)
        cells = []
        for lr in grid:
            run = bench.runs[(first_pattern, method, lr, 0)]
            text = f"{lr:g}: {run.val_ppl:.2f}"
            cells.append(f"**{text}**" if lr == best else text)
        grid_rows.append([method, "; ".join(cells)])

    goals = []
    for pattern in PATTERNS:
        seft = [r.test_ppl for r in bench.seed_runs(pattern, "seft")]
        baselines = {m: [r.test_ppl for r in bench.seed_runs(pattern, m)] for m in SPARSE_BASELINES}
        best = min(baselines, key=lambda m: statistics.mean(baselines[m]))
        verdict = "met" if statistics.mean(seft) < statistics.mean(baselines[best]) else "**not met**"
        goals.append([pattern, spread(seft), f"{best}: {spread(baselines[best])}", verdict])

    counts = bench.seed_runs(first_pattern, "seft")[0].trainable
    tokens = work.steps * work.batch_size * work.train_ids.shape[1]
    interval = max(2, work.steps // 8)
    text = "\n".join([
        f"# Repair quality: SEFT vs sparsity-preserving baselines ({work.model_name})",
        "",
        f"Generated by `python benchmarks/quality.py`. {machine_description(torch.device('cpu'))} "
        f"Training time summed over the {len(bench.runs)} runs: {sum(r.train_s for r in bench.runs.values()) / 60:.0f} "
        f"min (pruning and evaluation come on top); this invocation took {wall_s / 60:.0f} min.",
        "",
        "## Setup",
        f"- Pruning: Wanda with {work.calibration['nsamples']} calibration windows of {work.calibration['seqlen']} "
        "tokens from the training articles, on the 7 projections of every decoder layer.",
        f"- Fine-tuning: {work.steps} steps × {work.batch_size} sequences × {work.train_ids.shape[1]} tokens = "
        f"{tokens:,} training tokens, the same batches in the same order for every method (seed s: order s); "
        "AdamW, weight decay 0, warm-up then cosine decay, gradient clipping 1.0; plain causal-LM loss.",
        f"- Trainable parameters: {counts:,} (LoRA r={work.rank} on q/k/v/o/gate/up/down) for every method but "
        "masked full fine-tuning, which trains every surviving projection weight.",
        f"- SEFT cadence scaled to the short run: update every {interval} steps, window {max(1, interval // 2)} "
        "steps, other options at their defaults (drop fraction 0.2, cosine decay, frozen after 80% of the run).",
        f"- Perplexity: non-overlapping windows of {work.eval_seqlen} tokens; validation = {len(work.val_ids):,} "
        f"tokens of training-side articles never trained on (used only to pick the learning rate and the "
        f"headline baseline); test = {len(work.test_ids):,} held-out tokens (the demo's held-out set).",
        "- Sparsity kept: no layer has more nonzeros than after pruning and the N:M pattern holds.",
        "",
        "## Goal: SEFT beats every sparsity-preserving baseline (test perplexity, mean ± half-range over seeds)",
        "",
        markdown_table(["pattern", "SEFT", "best sparsity-preserving baseline", "goal"], goals),
        "",
        "## All runs (test perplexity: mean ± half-range over seeds when repeated)",
        "",
        markdown_table(["pattern", "method", "lr", "trainable", "val ppl (seed 0)", "test ppl", "sparsity",
                        "sparsity kept", "revived", "train s"], rows),
        "",
        f"## Learning-rate grid at {first_pattern} (validation perplexity, seed 0; chosen in bold)",
        "",
        markdown_table(["method", "learning rate: validation perplexity"], grid_rows),
        "",
        "![test perplexity by method](quality.png)",
        "",
        note,
    ])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "quality.md").write_text(text + "\n")
    plot(bench, folder / "quality.png")
    print(text)
    print(f"\nWritten to {folder}/quality.md, quality.png, quality_runs.csv")


def plot(bench: Benchmark, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in METHOD_ORDER if any(bench.seed_runs(p, m) for p in PATTERNS)]
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / len(PATTERNS)
    for i, pattern in enumerate(PATTERNS):
        means, errors = [], []
        for method in methods:
            tests = [r.test_ppl for r in bench.seed_runs(pattern, method)] or [math.nan]
            means.append(statistics.mean(tests))
            errors.append((max(tests) - min(tests)) / 2)
        ax.bar([j + i * width for j in range(len(methods))], means, width, yerr=errors, label=f"Wanda {pattern}")
    ax.set_xticks([j + width for j in range(len(methods))], methods, rotation=30, ha="right")
    ax.set(yscale="log", ylabel="held-out perplexity (log)", title=f"Repair of a pruned {bench.work.model_name}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--steps", type=int, default=None, help="optimizer steps per run (default 32; --quick: 8)")
    add("--batch-size", type=int, default=4)
    add("--seqlen", type=int, default=128, help="tokens per training sequence")
    add("--eval-seqlen", type=int, default=512)
    add("--rank", type=int, default=8, help="LoRA rank that sets every method's trainable count")
    add("--seeds", type=int, default=2, help="seeds of the headline rows")
    add("--val-articles", type=int, default=24, help="training-side articles kept aside for validation")
    add("--quick", action="store_true", help="tiny random model, one learning rate, one seed: a smoke test")
    add("--report-only", action="store_true", help="rebuild quality.md and the chart from quality_runs.csv")
    add("--output-dir", default=str(RESULTS_DIR))
    add("--remark", default="", help="a sentence for the report's end, e.g. what disturbed the wall times")
    args = parser.parse_args()
    if args.quick:
        args.seeds = 1
    elif args.steps is None:
        args.steps = 32
    folder = Path(args.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    started, snapshot = time.perf_counter(), cpu_snapshot()

    work = quick_workload(args) if args.quick else smollm2_workload(args)
    bench = Benchmark(work, folder / "quality_runs.csv", args.seeds, args.quick)
    if not args.report_only:
        bench.run_all()
    write_results(bench, folder, time.perf_counter() - started, f"{args.remark} {contention_note(snapshot)}".strip())


if __name__ == "__main__":
    main()
