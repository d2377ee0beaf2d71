"""The quality benchmark's shared training loop, and the runs' bookkeeping and plan.

A regime (:mod:`quality_regimes`) is a plan (budget, learning-rate grids, ablations, files); a
:class:`Benchmark` holds one regime's runs: it reads them from the run log, runs a missing one when ``--methods``
allows it (raising :class:`~quality_runs.Pending` otherwise), and orders the runs so that the
decisions later runs depend on come first. See quality.py for the methods and the protocol.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import statistics
import time
from dataclasses import asdict
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
    projection_linears,
    seft_adapter,
)
from blockwise import blockwise_train, surviving_count
from common import peak_memory, reset_peak_memory
from quality_regimes import (EVALUATION_ONLY, FIRST_PATTERN, PATTERNS, SPARSE_BASELINES, UNPRUNED, Regime, best_rate,
                             extended_grid, fixed_support_of, rate_of, split_budget, split_method, trained_name)
from quality_runs import (
    Claimed, OutOfTime, Pending, PrunedCache, RunCheckpoint, RunClaim, RunKey, RunResult, append_run, read_runs,
)
from quality_workloads import Workload
from seft_trl import SparsityEvolutionConfig, patterns, pruning
from seft_trl.distillation import DistillationLoss, add_backbone_forward, distillation_loss
from seft_trl.evaluation import perplexity
from seft_trl.pruning import prune
from seft_trl.report import SparsityReport, sparsity_report



# --------------------------------------------------------------------------------------- running
LossFunction = Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (model, batch [B, T]) -> scalar loss


def causal_lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch, labels=batch).loss


def distilled_loss(teacher: nn.Module, loss: DistillationLoss) -> LossFunction:
    """The trainer's distillation loss (seft_trl.distillation) from ``teacher``, as a loss of the shared loop."""
    add_backbone_forward(teacher)

    def compute(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return distillation_loss(add_backbone_forward(model), teacher, {"input_ids": batch, "labels": batch}, loss).loss

    return compute


def train(model: nn.Module, adapter: Adapter, batches: list[torch.Tensor], lr: float,
          checkpoint: RunCheckpoint | None = None, stop: int | None = None,
          loss_function: LossFunction = causal_lm_loss) -> tuple[list[float], float]:
    """The loop every method shares; returns the training losses and the seconds it trained.

    With a ``checkpoint``, a saved state is resumed first (its seconds count), the state is saved
    every ``checkpoint.every`` steps, and past the deadline it is saved and :class:`OutOfTime` raised.
    ``stop`` trains only the first ``stop`` steps of the run's schedule (a probe of its beginning).
    ``loss_function``: the plain causal-LM loss, or a distillation loss (the same for every method it
    is given to).
    """
    optimizer = torch.optim.AdamW(adapter.parameters, lr=lr, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, len(batches) // 16), len(batches))
    losses, start, earlier_s = [], 0, 0.0
    saved = checkpoint.load() if checkpoint else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        # A count the checkpoint's code did not keep is unknown for the whole run, not zero.
        adapter.notes.update({key: math.nan for key in adapter.notes} | saved["notes"])
        losses, start, earlier_s = saved["losses"], saved["steps"], saved["train_s"]
        print(f"  resumed at step {start} of {len(batches)}", flush=True)
    adapter.attach(optimizer, len(batches), start)
    began = time.perf_counter()
    since, since_step = began, start  # the pace printed at each save: where an hour-long run's time goes
    model.train()
    for done, batch in enumerate(batches[start:stop], start=start + 1):
        loss = loss_function(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(adapter.parameters, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        adapter.after_step()
        losses.append(loss.item())
        if checkpoint and checkpoint.due(done, len(batches)):
            now = time.perf_counter()
            print(f"  step {done} of {len(batches)}: {(now - since) / (done - since_step):.1f} s a step since step "
                  f"{since_step}, loss {statistics.mean(losses[since_step:]):.3f}", flush=True)
            since, since_step = now, done
            checkpoint.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "notes": dict(adapter.notes), "losses": losses,
                             "steps": done, "train_s": earlier_s + time.perf_counter() - began})
            if checkpoint.out_of_time():
                raise OutOfTime(f"stopped after step {done} of {len(batches)}")
    model.eval()
    return losses, earlier_s + time.perf_counter() - began


def make_adapter(method: str, model: nn.Module, work: Workload, seed: int, regime: Regime,
                 parent: nn.Module | None = None) -> tuple[Adapter, int]:
    """The method's adapter on ``model`` and its trainable parameter count.

    ``parent``: the dense model, given to SEFT-engine methods with a teaching (dense-value revival).
    """
    torch.manual_seed(seed)
    base, density, rank = split_budget(split_method(method)[0])
    rank = rank or work.rank
    count = lora_trainable_count(model, rank)
    if base == "lora":
        return peft_lora_adapter(model, rank, 2 * rank), count
    if base == "masked_lora":
        return low_rank_adapter(model, rank, 2 * rank, "masked_add"), count
    if base == "spp":
        return low_rank_adapter(model, rank, 2 * rank, "scale"), count
    if base == "masked_full":
        adapter = masked_full_adapter(model)
        return adapter, sum(int(torch.count_nonzero(p)) for p in adapter.parameters)
    config = seft_config(method, work, regime, seed, count)
    adapter = seft_adapter(model, config, parent)
    return adapter, count if density is None else sum(p.numel() for p in adapter.parameters)


def seft_config(method: str, work: Workload, regime: Regime, seed: int, count: int = 1) -> SparsityEvolutionConfig | None:
    """The engine config of a SEFT-engine method's run with ``count`` deltas; None for the other methods.

    The options are plain dicts, checked by the engine only when a config is built: an ablation of an
    option the engine does not have yet fails here, when it is run, and nowhere else.
    """
    options = regime.seft_options(method)
    if options is None:
        return None
    density = split_budget(split_method(method)[0])[1]
    budget = {"num_deltas": count} if density is None else {"density": density}
    return SparsityEvolutionConfig(**budget, target_modules=PROJECTIONS, seed=seed, **{**work.cadence, **options})


def options_record(config: SparsityEvolutionConfig) -> str:
    """The engine options of a run as sorted JSON, without what every run sets for itself (count, targets, seed).

    Logged with each SEFT-engine run, so that a change of the engine's defaults cannot pass an old
    run off as one of the current plan: the plan keys runs by method name.
    """
    values = {key: value for key, value in asdict(config).items()
              if key not in ("density", "num_deltas", "target_modules", "seed")}
    return json.dumps(values, sort_keys=True)


def run_record(method: str, work: Workload, regime: Regime, seed: int) -> str | None:
    """What a run is logged with to be recognised later: the engine options (:func:`options_record`) and, for a
    distilled method, its loss; None for a plain-CE method of no engine."""
    config, teaching = seft_config(method, work, regime, seed), regime.teaching(method)
    if config is None and teaching is None:
        return None
    values = {} if config is None else json.loads(options_record(config))
    if teaching is not None:
        values["distillation"] = asdict(teaching.loss)
    return json.dumps(values, sort_keys=True)


def same_record(logged: str, current: str) -> bool:
    """Whether a run logged with ``logged`` options is the run ``current`` describes. An engine option added
    after the run was logged is absent from its record; at its default it changes nothing, so it matches."""
    old, new = json.loads(logged), json.loads(current)
    defaults = asdict(SparsityEvolutionConfig())
    return {**{key: defaults[key] for key in new.keys() - old.keys() if key in defaults}, **old} == new


def wanda(model: nn.Module, pattern: str, work: Workload) -> SparsityReport:
    """Prune ``model`` in place to ``pattern`` (a PATTERNS key) with Wanda, calibrated on the training text."""
    spec, sparsity = PATTERNS[pattern]
    return prune(model, "wanda", sparsity=sparsity, pattern=spec, calibration=work.calibration_texts,
                 tokenizer=work.tokenizer, target_modules=PROJECTIONS, **work.calibration)


def file_tag(pattern: str) -> str:
    """The pattern as it appears in file names: '2:4' -> '2-4', '50%' -> '50pct'."""
    return pattern.replace(":", "-").replace("%", "pct")


def pruning_fingerprint(model: nn.Module, pattern: str, work: Workload) -> str:
    """What Wanda's result depends on: the unpruned weights, the pattern, the calibration and the pruning code."""
    inputs = (work.model_name, pattern, PATTERNS[pattern], sorted(work.calibration.items()))
    digest = hashlib.sha256(repr(inputs).encode())
    for text in work.calibration_texts:
        digest.update(text.encode())
    sources = [*Path(pruning.__file__).parent.glob("*.py"), Path(patterns.__file__)]
    for source in sorted(sources):
        digest.update(source.read_bytes())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def kept(before: SparsityReport, after: SparsityReport) -> bool:
    """No layer holds more nonzeros than after pruning, and an N:M pattern still holds."""
    per_layer = all(a.nonzeros <= b.nonzeros for a, b in zip(after.layers, before.layers))
    return per_layer and after.pattern_holds


def count_note(notes: dict[str, float], key: str) -> int | None:
    """An adapter's count as a run-log cell: None where it was not counted (no engine, or an old checkpoint)."""
    value = notes.get(key, math.nan)
    return None if math.isnan(value) else int(value)


class Benchmark:
    """The runs of one regime: read from its log, run when missing and allowed, and the plan that orders them."""

    def __init__(self, regime: Regime, work: Workload, runs_path: Path, seeds: int, quick: bool,
                 runnable: frozenset[str], deadline: float | None = None, checkpoint_every: int = 16,
                 start_any: bool = False, patterns: frozenset[str] | None = None) -> None:
        self.regime, self.work, self.runs_path, self.seeds, self.quick = regime, work, runs_path, seeds, quick
        self.runnable = runnable  # methods that may run now; any other missing run is Pending
        self.patterns = patterns  # where trained runs may run now (None: everywhere); elsewhere they are Pending
        self.deadline = deadline  # time.monotonic() after which no run starts and the current one pauses
        self.start_any = start_any  # start runs the deadline will pause: their checkpoints stay on this machine
        self.checkpoint_every = checkpoint_every
        self.runs = self.current_runs(read_runs(runs_path))
        self.pruned: dict[str, tuple[nn.Module, SparsityReport]] = {}
        self._teacher: nn.Module | None = None  # the dense model, loaded once for the distilled runs
        # The chosen rate of a method in the regime this one takes its rates from (quality.py sets it).
        self.rates: Callable[[str], float] | None = None

    def current_runs(self, logged: dict[RunKey, RunResult]) -> dict[RunKey, RunResult]:
        """The logged runs that stand for the plan's: an engine run logged with other options than the plan
        now gives its method is set aside (and run again when its method may run). Rows logged before
        the options were recorded cannot be checked and are kept."""
        current = {}
        for key, run in logged.items():
            if run.method not in self.regime.methods:
                print(f"set aside: {run.method} at {run.pattern} (lr {run.lr:g}, seed {run.seed}) is not in the "
                      f"{self.regime.name} regime's plan", flush=True)
                continue
            record = run_record(run.method, self.work, self.regime, run.seed)
            if run.options is not None and record is not None and not same_record(run.options, record):
                print(f"set aside: {run.method} at {run.pattern} (lr {run.lr:g}, seed {run.seed}) was logged with engine "
                      f"options {run.options}, the plan now uses {record}", flush=True)
                continue
            current[key] = run
        return current

    def pruned_copy(self, pattern: str) -> tuple[nn.Module, SparsityReport]:
        """A fresh copy of the model pruned to ``pattern``: pruned once per invocation, cached across them."""
        if pattern not in self.pruned:
            model = self.work.load_model()
            spec, sparsity = PATTERNS[pattern]
            started = time.perf_counter()
            cache, fingerprint = self.pruned_cache(pattern), pruning_fingerprint(model, pattern, self.work)
            saved = cache.load(fingerprint)
            if saved is None:
                report = self.wanda(model, pattern)
                cache.save(fingerprint, {name: linear.weight.detach().clone()
                                         for name, linear in projection_linears(model).items()}, report)
                source = "pruned"
            else:
                weights, report = saved
                for name, linear in projection_linears(model).items():
                    linear.weight.data.copy_(weights[name])
                source = f"read from {cache.path.name}"
            print(f"[{pattern}] Wanda {spec} {sparsity or ''}: sparsity {report.sparsity:.2%}, {source} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
            self.pruned[pattern] = (model, report)
        model, report = self.pruned[pattern]
        return copy.deepcopy(model), report

    def pruned_cache(self, pattern: str) -> PrunedCache:
        """Named after the workload's calibration, so regimes that prune alike (long, narrow) share the file."""
        calibration = hashlib.sha256("\n\n".join(self.work.calibration_texts).encode()).hexdigest()[:12]
        name = f"pruned_{file_tag(pattern)}_{calibration}.pt"
        return PrunedCache(self.runs_path.parent / "partial" / name)

    def teacher(self) -> nn.Module:
        """The dense model, the parent of every pattern's pruned model: loaded once, never trained."""
        if self._teacher is None:
            self._teacher = self.work.load_model().requires_grad_(False).eval()
        return self._teacher

    def wanda(self, model: nn.Module, pattern: str) -> SparsityReport:
        return wanda(model, pattern, self.work)

    def evaluate(self, model: nn.Module) -> tuple[float, float, str | None]:
        """Validation and test perplexity, and those of the workload's extra texts as a run-log cell."""
        work = self.work

        def ppl(ids: torch.Tensor) -> float:
            return perplexity(model, None, ids, seqlen=min(work.eval_seqlen, len(ids)), progress=False)

        extra = {name: round(ppl(ids), 4) for name, ids in work.extra_evals.items()}
        return ppl(work.val_ids), ppl(work.test_ids), json.dumps(extra, sort_keys=True) if extra else None

    def result(self, pattern: str, method: str, lr: float, seed: int = 0) -> RunResult:
        """The run's result, from the log or by running it now; Pending when it may not run now."""
        key = (pattern, method, lr, seed)
        if key not in self.runs:
            trained = trained_name(method)  # a LoRA run yields both lora and lora*
            elsewhere = self.patterns is not None and pattern not in self.patterns and method not in EVALUATION_ONLY
            if trained not in self.runnable or elsewhere:
                raise Pending(key)
            checkpoint = self.checkpoint((pattern, trained, lr, seed))
            if checkpoint.out_of_time() or not (checkpoint.path.exists() or self.fits_before_deadline(trained)):
                raise OutOfTime(f"{method} at {pattern} (lr {lr:g}, seed {seed}) not started")
            claim = RunClaim(checkpoint.path.with_suffix(".claim"))
            if not claim.acquire():
                raise Claimed(key)
            try:
                logged = read_runs(self.runs_path)  # another process may have run it meanwhile
                self.runs.update(self.current_runs({k: run for k, run in logged.items() if k not in self.runs}))
                if key not in self.runs:
                    for run in self.execute(pattern, trained, lr, seed):
                        self.runs[run.key] = run
                        append_run(self.runs_path, run)
                    checkpoint.remove()
            finally:
                claim.release()
        return self.runs[key]

    def fits_before_deadline(self, method: str) -> bool:
        """Whether a new run of ``method`` is expected to end before the deadline.

        ``partial/`` is not committed, so a run paused at the end of a session is lost with its
        checkout. The expectation is the median logged wall time of the method in this regime (of
        any trained method when it has none yet; no expectation before the first run). With
        ``start_any`` (a workspace that keeps ``partial/`` between sessions) every run may start.
        """
        if self.deadline is None or self.start_any:
            return True
        timed = [run for run in self.runs.values() if run.train_s > 0 and math.isfinite(run.wall_s)]
        walls = [run.wall_s for run in timed if run.method == method] or [run.wall_s for run in timed]
        expected = statistics.median(walls) if walls else 0.0
        return time.monotonic() + expected <= self.deadline

    def checkpoint(self, key: RunKey) -> RunCheckpoint:
        """Where the run ``key`` keeps its state while it trains: ``partial/`` beside the run log."""
        pattern, method, lr, seed = key
        name = f"{self.regime.name}_{file_tag(pattern)}_{method}_{lr:g}_{seed}.pt"
        return RunCheckpoint(self.runs_path.parent / "partial" / name, self.checkpoint_every, self.deadline)

    def execute(self, pattern: str, method: str, lr: float, seed: int) -> list[RunResult]:
        if method == "dense":
            return [self.evaluate_only(self.work.load_model(), pattern, method, None)]
        model, before = self.pruned_copy(pattern)
        if method == "pruned":
            return [self.evaluate_only(model, pattern, method, before)]
        return self.train_run(model, before, pattern, method, lr, seed)

    def evaluate_only(self, model: nn.Module, pattern: str, method: str, pruned: SparsityReport | None) -> RunResult:
        started = time.perf_counter()
        val, test, extra = self.evaluate(model)
        sparsity = pruned.sparsity if pruned else sparsity_report(model).sparsity
        print(f"[{pattern}] {method}: val {val:8.2f}  test {test:8.2f}  {extra or ''}", flush=True)
        return RunResult(pattern=pattern, method=method, lr=0.0, seed=0, val_ppl=val, test_ppl=test,
                         sparsity=sparsity, sparsity_kept=pruned is not None, trainable=0, revived=0,
                         final_loss=float("nan"), train_s=0.0, wall_s=time.perf_counter() - started, evals=extra)

    def train_run(self, model: nn.Module, before: SparsityReport, pattern: str, method: str, lr: float,
                  seed: int) -> list[RunResult]:
        started = time.perf_counter()
        base, suffix = split_method(method)
        teaching = self.regime.teaching(method)
        teacher = None if teaching is None and base != "ebft" else self.teacher()
        reset_peak_memory(torch.device("cpu"))  # the teacher counts: it stays resident for the run
        checkpoint = self.checkpoint((pattern, method, lr, seed))
        if base == "ebft":  # block by block against the dense model's hidden states: a loop of its own
            torch.manual_seed(seed)
            notes, count, setup_s = {}, surviving_count(model), time.perf_counter() - started
            losses, train_s = blockwise_train(model, teacher, self.work.batches(seed), lr, checkpoint)
        else:
            adapter, count = make_adapter(method, model, self.work, seed, self.regime, parent=teacher)
            setup_s = time.perf_counter() - started
            loss_function = causal_lm_loss if teaching is None else distilled_loss(teacher, teaching.loss)
            losses, train_s = train(model, adapter, self.work.batches(seed), lr, checkpoint, loss_function=loss_function)
            notes = adapter.notes
        peak_mb = peak_memory(torch.device("cpu")) / 2**20
        trained = time.perf_counter()
        if base != "ebft":
            model = adapter.finish()
        final_loss = statistics.mean(losses[-max(1, len(losses) // 8):])
        variants = [(method, model)]
        if base == "lora":
            variants.append(("lora*" + (f"+{suffix}" if suffix else ""), copy.deepcopy(model)))
            self.wanda(variants[1][1], pattern)
        growth = notes.get("nonzero_growth")
        measured = []
        for name, variant in variants:
            after = sparsity_report(variant, pattern=PATTERNS[pattern][0])
            measured.append((name, *self.evaluate(variant), after))
        wall_s = setup_s + train_s + time.perf_counter() - trained  # a resumed run's earlier training included
        results = []
        for name, val, test, extra, after in measured:
            results.append(RunResult(
                pattern=pattern, method=name, lr=lr, seed=seed, val_ppl=val, test_ppl=test, sparsity=after.sparsity,
                sparsity_kept=kept(before, after), trainable=count, revived=int(notes.get("revived", 0)),
                final_loss=final_loss, train_s=train_s, wall_s=wall_s,
                nonzero_growth=None if growth is None or name == "lora*" else int(growth),
                swapped=count_note(notes, "swapped"), refused=count_note(notes, "refused"),
                options=run_record(name, self.work, self.regime, seed), evals=extra, peak_rss_mb=peak_mb,
            ))
            print(f"[{pattern}] {name:17s} lr {lr:.2e} seed {seed}: val {val:8.2f}  test {test:8.2f}  {extra or ''}  "
                  f"sparsity {after.sparsity:.2%} kept {results[-1].sparsity_kept}  ({train_s:.0f} s train, "
                  f"{wall_s:.0f} s run)", flush=True)
        return results

    # -------------------------------------------------------------------------- choices
    def validation(self, method: str, lr: float) -> float:
        """Seed 0's validation perplexity at FIRST_PATTERN: from the log, or by running it now."""
        return self.result(FIRST_PATTERN, method, lr).val_ppl

    def grid(self, method: str) -> list[float]:
        return extended_grid(self.regime, method, self.validation, self.rates, self.quick)

    def best_lr(self, method: str) -> float:
        return best_rate(self.regime, method, self.validation, self.rates, self.quick)

    def lr_of(self, method: str) -> float:
        return rate_of(self.regime, method, self.validation, self.rates, self.quick)

    def best_baseline(self, pattern: str) -> str:
        """The sparsity-preserving baseline with the best validation perplexity at ``pattern`` (seed 0)."""
        return min(SPARSE_BASELINES, key=lambda m: self.result(pattern, m, self.lr_of(m)).val_ppl)

    def seed_runs(self, pattern: str, method: str) -> list[RunResult]:
        """Every seed's run of ``method`` at ``pattern`` at its chosen rate (Pending while the rate is)."""
        lr = self.lr_of(method)
        return [run for (p, m, r, _), run in sorted(self.runs.items()) if (p, m, r) == (pattern, method, lr)]

    # ----------------------------------------------------------------------------- plan
    def run_plan(self) -> None:
        """Grids at FIRST_PATTERN, then the other patterns, the extra seeds and the ablations.

        The order puts the decisions later runs depend on (learning rates, the headline baseline)
        first, and the ablations last (those at fixed support's rate after those at SEFT's); a step
        that waits on a method outside ``--methods`` is skipped.
        """
        self.result(UNPRUNED, "dense", 0.0)
        self.result(FIRST_PATTERN, "pruned", 0.0)
        later = {step.method for step in self.regime.plan}  # tuned when their turn in the plan comes
        for method in self.planned([m for m in self.regime.tuned if m not in later]):
            self.attempt(f"the {method} grid", lambda: self.best_lr(method))
        for pattern in list(PATTERNS)[1:]:
            self.result(pattern, "pruned", 0.0)
            everywhere = [m for m in self.regime.tuned if m not in later] if self.regime.tuned_everywhere else []
            for method in self.planned(everywhere):
                self.attempt(f"{method} at {pattern}", lambda: self.result(pattern, method, self.lr_of(method)))
        for step in self.regime.plan:
            for pattern in step.patterns:
                for seed in range(step.seeds):
                    if self.planned([step.method]):
                        self.attempt(f"{step.method} at {pattern} (seed {seed})",
                                     lambda: self.result(pattern, step.method, self.lr_of(step.method), seed))
        for pattern in PATTERNS if self.regime.extra_seeds else ():
            self.attempt(f"the extra seeds at {pattern}", lambda: self.extra_seeds(pattern))
        for pattern in PATTERNS:
            for method in self.planned(self.regime.ablations_at(pattern)):
                self.attempt(f"{method} at {pattern}", lambda: self.result(pattern, method, self.lr_of(method)))
        for method in self.planned(self.regime.at_fixed_rate):
            self.attempt(f"{method} at fixed support's rate",
                         lambda: self.result(FIRST_PATTERN, method, self.best_lr(fixed_support_of(method))))

    def planned(self, methods: tuple[str, ...] | list[str]) -> list[str]:
        return [m for m in methods if trained_name(m) in self.runnable]

    def extra_seeds(self, pattern: str) -> None:
        """Seeds 1.. of SEFT and of the pattern's best baseline (which needs every baseline's seed 0)."""
        for method in self.planned(["seft"]):
            for seed in range(1, self.seeds):
                self.result(pattern, method, self.lr_of(method), seed)
        baseline = self.best_baseline(pattern)
        for method in self.planned([baseline]):
            for seed in range(1, self.seeds):
                self.result(pattern, method, self.lr_of(method), seed)

    @staticmethod
    def attempt(what: str, step: Callable[[], object]) -> None:
        try:
            step()
        except Claimed as running:
            print(f"skipped {what} for now: it needs {running}, which another benchmark process is running", flush=True)
        except Pending as missing:
            print(f"skipped {what}: it needs {missing}, which is outside --methods or --patterns", flush=True)
