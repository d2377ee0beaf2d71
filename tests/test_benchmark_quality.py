"""benchmarks/quality.py --quick in both regimes, and the benchmark's own checks: run log and nonzero guard."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import prune_linears, random_batch
from seft_trl import SparsityEvolutionConfig
from seft_trl.testing import tiny_model

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "quality.py"
sys.path.insert(0, str(SCRIPT.parent))  # the benchmark modules import each other by bare name

from baselines import NonzeroBudgetError, masked_full_adapter, peft_lora_adapter, seft_adapter  # noqa: E402
from quality_plan import Benchmark, count_note, options_record, pruning_fingerprint, seft_config, train  # noqa: E402
from quality_regimes import LONG, NARROW  # noqa: E402
from quality_runs import OutOfTime, Pending, RunCheckpoint, RunResult, append_run, read_runs  # noqa: E402
from quality_workloads import quick_workload  # noqa: E402

# Every short method but seft_revert, which stays out to show how a run outside --methods is reported.
SHORT_METHODS = ["lora", "masked_lora", "spp", "masked_full", "fixed_deltas", "seft", "seft_no_revival",
                 "seft_revival", "seft_no_swap_test", "seft_zero_moments", "seft_magnitude"]
LONG_BASELINES = ["lora", "masked_lora", "spp", "masked_full"]
LONG_METHODS = [*LONG_BASELINES, "fixed_deltas", "seft", "seft_no_revival", "seft_revival", "seft_no_swap_test",
                "seft_drop0.4"]
ENGINE_METHODS = {"fixed_deltas", "seft", "seft_no_revival", "seft_revival", "seft_no_swap_test", "seft_drop0.4"}
# Where each ablation of LONG_METHODS runs: most at 50% only; revival's flips with the pattern's default.
LONG_ABLATION_PATTERNS = {"seft_drop0.4": {"50%"}, "seft_no_swap_test": {"50%"}, "seft_no_revival": {"50%", "70%"},
                          "seft_revival": {"2:4"}}
PATTERNS = {"50%": 0.5, "2:4": 0.5, "70%": 0.7}


def run_quality(output: Path, *options: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--output-dir", str(output), *options],
                          cwd=SCRIPT.parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_quality_quick_runs_every_method_and_keeps_sparsity(tmp_path: Path) -> None:
    run_quality(tmp_path, "--methods", ",".join(SHORT_METHODS))

    runs = {(row["pattern"], row["method"]): row for row in csv_rows(tmp_path / "quality_runs.csv")}
    revival_ablation = {"50%": "seft_no_revival", "2:4": "seft_revival", "70%": "seft_no_revival"}
    sparse_methods = set(SHORT_METHODS) - {"lora", "seft_no_revival", "seft_revival"} | {"lora*"}
    assert float(runs[("unpruned", "dense")]["sparsity"]) < 0.05
    for pattern, target in PATTERNS.items():
        pruned = runs[(pattern, "pruned")]
        assert float(pruned["sparsity"]) >= target - 0.01
        # An ablation that would repeat the defaults is not run: revival flips per pattern.
        assert {m for p, m in runs if p == pattern} & {"seft_no_revival", "seft_revival"} == {revival_ablation[pattern]}
        for method in sparse_methods | {revival_ablation[pattern]}:
            row = runs[(pattern, method)]
            assert row["sparsity_kept"] == "True", (pattern, method)
            assert float(row["sparsity"]) >= float(pruned["sparsity"]) - 1e-9, (pattern, method)
            assert float(row["test_ppl"]) > 1.0
        # Merging LoRA densifies the model: the reference row must show the sparsity loss.
        assert runs[(pattern, "lora")]["sparsity_kept"] == "False"
        assert float(runs[(pattern, "lora")]["sparsity"]) < 0.05
        # Revival happens with the defaults in unstructured models only, and its ablation does the reverse.
        revives = pattern != "2:4"
        assert (int(runs[(pattern, "seft")]["revived"]) > 0) == revives
        assert (int(runs[(pattern, revival_ablation[pattern])]["revived"]) > 0) != revives
        # Engine runs log how much evolution moved and what the swap test held back; others log nothing.
        seft = runs[(pattern, "seft")]
        assert int(seft["swapped"]) >= max(1, int(seft["revived"])) and int(seft["refused"]) >= 0
        assert int(runs[(pattern, "fixed_deltas")]["swapped"]) == 0
        assert int(runs[(pattern, "seft_no_swap_test")]["refused"]) == 0
        assert runs[(pattern, "masked_lora")]["swapped"] == runs[(pattern, "masked_lora")]["refused"] == ""
        # Every method trains the same number of parameters except masked full fine-tuning.
        counts = {int(runs[(pattern, m)]["trainable"]) for m in sparse_methods - {"masked_full"}}
        assert len(counts) == 1 and int(runs[(pattern, "masked_full")]["trainable"]) > counts.pop()

    report = (tmp_path / "quality.md").read_text()
    assert "## Goal" in report and "| 2:4 | seft |" in report and "gap recovered" in report
    assert "| 50% | seft_revert | pending |" in report  # not in --methods: shown, never invented
    assert (tmp_path / "quality.png").stat().st_size > 1000


def test_quality_quick_long_regime_runs_baselines_first_then_resumes(tmp_path: Path) -> None:
    # Session 1: only the engine-independent baselines; the headline seeds wait for fixed_deltas.
    (tmp_path / "quality_long_notes.md").write_text("Kept from an earlier session.\n")
    run_quality(tmp_path, "--regime", "long", "--methods", ",".join(LONG_BASELINES))
    first = csv_rows(tmp_path / "quality_long_runs.csv")
    assert {row["method"] for row in first} == {"dense", "pruned", "lora", "lora*", *LONG_BASELINES}
    assert {row["seed"] for row in first} == {"0"}
    assert "| 50% | seft | pending |" in (tmp_path / "quality_long.md").read_text()

    # Session 2: everything of today's engine; the first session's rows are reused, not rerun.
    run_quality(tmp_path, "--regime", "long", "--methods", ",".join(LONG_METHODS))
    rows = csv_rows(tmp_path / "quality_long_runs.csv")
    assert rows[: len(first)] == first
    keys = [(row["pattern"], row["method"], row["lr"], row["seed"]) for row in rows]
    assert len(keys) == len(set(keys))
    runs = {(row["pattern"], row["method"], row["seed"]): row for row in rows}
    for pattern, target in PATTERNS.items():
        assert float(runs[(pattern, "pruned", "0")]["sparsity"]) >= target - 0.01
        for method in ENGINE_METHODS:
            if pattern not in LONG_ABLATION_PATTERNS.get(method, PATTERNS):
                assert (pattern, method, "0") not in runs, (pattern, method)
                continue
            row = runs[(pattern, method, "0")]
            assert row["sparsity_kept"] == "True" and int(row["nonzero_growth"]) <= 0, (pattern, method)
        # The scaled quick cadence updates the topology: SEFT revives where that is its default.
        assert (int(runs[(pattern, "seft", "0")]["revived"]) > 0) == (pattern != "2:4")
        assert runs[(pattern, "masked_lora", "0")]["nonzero_growth"] == ""  # only SEFT-engine runs are checked
        # Two seeds for SEFT and for the best-validation sparsity-preserving baseline.
        seeded = {method for (p, method, seed) in runs if p == pattern and seed == "1"}
        assert "seft" in seeded and len(seeded) == 2 and seeded - {"seft"} <= {"lora*", *LONG_METHODS}

    report = (tmp_path / "quality_long.md").read_text()
    for heading in ("## Setup", "## Goal: SEFT beats every", "## Goal: SEFT beats the same deltas",
                    "## Learning-rate grid", "## Ablations"):
        assert heading in report
    assert "| unpruned | dense |" in report and "(n=2)" in report and "one epoch" in report
    assert "| 50% | seft_zero_moments | seed_moments=False | pending |" in report
    # Quick grids hold one rate, so fixed support's rate is SEFT's: the ablation run there is reused.
    assert "## At fixed support's learning rate" in report
    assert "| seft_no_revival | regrow_pruned=False | 0.003 | pending |" not in report
    assert "| seft_drop0.1 | drop_fraction=0.1 | 0.003 | pending |" in report
    assert "Kept from an earlier session." in report  # the notes file outlives the invocation that wrote it
    assert "| 2:4 | seft_drop0.4 |" not in report and "| 70% | seft_no_swap_test |" not in report
    assert (tmp_path / "quality_long.png").stat().st_size > 1000


def test_quality_quick_narrow_regime_distils_every_method_alike_and_measures_the_repair_domain_too(tmp_path: Path) -> None:
    run_quality(tmp_path, "--regime", "narrow", "--methods", "seft+kd,seft+kd0,masked_full,masked_lora+kd,ebft")
    runs = {(row["pattern"], row["method"], row["seed"]): row for row in csv_rows(tmp_path / "quality_narrow_runs.csv")}
    for pattern in PATTERNS:
        for method in ("seft+kd", "seft+kd0", "masked_full", "masked_lora+kd", "ebft"):
            row = runs[(pattern, method, "0")]
            assert row["sparsity_kept"] == "True" and float(row["peak_rss_mb"]) > 0, (pattern, method)
            assert set(json.loads(row["evals"])) == {"news_val", "news_test"}  # the repair's own domain, held out
        for method in ("seft+kd", "masked_lora+kd"):  # one loss for every distilled method, logged with the run
            assert json.loads(runs[(pattern, method, "0")]["options"])["distillation"]["weight"] == 0.5
        assert "distillation" not in (runs[(pattern, "masked_full", "0")]["options"] or "")
        for method in ("seft+kd", "seft+kd0"):  # revival (at the parent's values or at zero) where it is the default
            row = runs[(pattern, method, "0")]
            assert (int(row["revived"]) > 0) == (pattern != "2:4") and int(row["nonzero_growth"]) <= 0
        assert json.loads(runs[(pattern, "seft+kd0", "0")]["options"])["dense_revival"] is False
    assert ("50%", "seft+kd", "1") in runs  # the headline's second seed
    report = (tmp_path / "quality_narrow.md").read_text()
    assert "## With the dense parent" in report and "| 50% | seft | pending |" in report  # CE runs not in --methods
    assert "news_test ppl" in report and "G1: vs best CE baseline" in report


def test_blockwise_reconstruction_fits_each_layer_to_the_dense_one_keeps_zeros_and_resumes_exactly(tmp_path: Path) -> None:
    from blockwise import blockwise_train

    dense = tiny_model()
    batches = [random_batch(2, 16, seed=seed) for seed in range(24)]

    def layer_errors(model) -> list[float]:
        ids = torch.cat(batches)
        with torch.no_grad():
            ours = model(input_ids=ids, output_hidden_states=True).hidden_states[1:]
            theirs = dense(input_ids=ids, output_hidden_states=True).hidden_states[1:]
        return [float((a - b).pow(2).mean()) for a, b in zip(ours, theirs)]

    straight = prune_linears(tiny_model())
    zeros = {name: p == 0 for name, p in straight.named_parameters()}
    before = layer_errors(straight)
    blockwise_train(straight, dense, batches, lr=1e-3)
    assert all(after < 0.8 * start for after, start in zip(layer_errors(straight), before))
    assert all(bool((p[zeros[name]] == 0).all()) for name, p in straight.named_parameters())

    interrupted = prune_linears(tiny_model())
    checkpoint = RunCheckpoint(tmp_path / "ebft.pt", every=16, deadline=time.monotonic() - 1)  # stop at once
    with pytest.raises(OutOfTime, match="after decoder layer 1 of 2"):
        blockwise_train(interrupted, dense, batches, lr=1e-3, checkpoint=checkpoint)
    resumed = prune_linears(tiny_model())
    blockwise_train(resumed, dense, batches, lr=1e-3, checkpoint=RunCheckpoint(tmp_path / "ebft.pt", every=16))
    assert all(torch.equal(p, resumed.state_dict()[name]) for name, p in straight.state_dict().items())


def test_pruned_weights_are_reused_across_invocations_only_while_their_inputs_match(tmp_path: Path) -> None:
    work = quick_workload(8, long=True)
    calls = []

    def benchmark(work) -> Benchmark:  # one invocation of the benchmark script, counting its Wanda runs
        bench = Benchmark(LONG, work, tmp_path / "runs.csv", seeds=1, quick=True, runnable=frozenset())
        wanda = bench.wanda
        bench.wanda = lambda model, pattern: calls.append(pattern) or wanda(model, pattern)
        return bench

    fresh, fresh_report = benchmark(work).pruned_copy("2:4")
    reused, reused_report = benchmark(work).pruned_copy("2:4")
    assert calls == ["2:4"]  # the second invocation read the first one's weights
    assert reused_report == fresh_report and reused_report.pattern_holds
    assert all(torch.equal(reused.state_dict()[key], value) for key, value in fresh.state_dict().items())

    other = dataclasses.replace(work, calibration={**work.calibration, "nsamples": 2})
    assert pruning_fingerprint(work.load_model(), "2:4", other) != pruning_fingerprint(work.load_model(), "2:4", work)
    benchmark(other).pruned_copy("2:4")
    assert calls == ["2:4", "2:4"]  # another calibration prunes afresh


def test_no_run_starts_that_its_methods_logged_wall_time_would_not_finish_before_the_deadline(tmp_path: Path) -> None:
    # partial/ is not committed: a run paused at the end of a session would be lost with its checkout
    def logged(method: str, lr: float, wall_s: float) -> RunResult:
        return RunResult(pattern="50%", method=method, lr=lr, seed=0, val_ppl=1.0, test_ppl=1.0, sparsity=0.5,
                         sparsity_kept=True, trainable=1, revived=0, final_loss=1.0, train_s=wall_s - 1, wall_s=wall_s)

    for run in (logged("seft", 1e-3, 3000.0), logged("seft", 2e-3, 4000.0), logged("lora", 1e-3, 600.0)):
        append_run(tmp_path / "runs.csv", run)
    work = quick_workload(8, long=True)

    def bench(seconds_left: float, start_any: bool = False) -> Benchmark:
        return Benchmark(LONG, work, tmp_path / "runs.csv", seeds=1, quick=True, runnable=frozenset({"seft", "spp"}),
                         deadline=time.monotonic() + seconds_left, start_any=start_any)

    assert bench(3600.0).fits_before_deadline("seft") and not bench(3400.0).fits_before_deadline("seft")  # median 3500
    assert bench(60.0, start_any=True).fits_before_deadline("seft")  # a workspace that keeps partial/ starts it anyway
    assert bench(3600.0).fits_before_deadline("spp") and not bench(2900.0).fits_before_deadline("spp")  # all: 3000
    with pytest.raises(OutOfTime, match="not started"):
        bench(3400.0).result("50%", "seft", 4e-3)
    assert not (tmp_path / "partial").exists()  # refused before anything was written


def sparse_run(pattern: str) -> tuple:
    """A tiny pruned LLaMA under SEFT with the benchmark's enforced nonzero guard."""
    model = prune_linears(tiny_model("llama"), pattern=pattern)
    adapter = seft_adapter(model, SparsityEvolutionConfig(density=0.05, seed=0))
    return model, adapter


def test_nonzero_guard_stops_a_run_whose_layer_gains_a_nonzero() -> None:
    model, adapter = sparse_run("layer")
    adapter.after_step()
    assert adapter.notes["nonzero_growth"] == 0
    weight = model.model.layers[0].mlp.down_proj.weight
    with torch.no_grad():
        weight.view(-1)[torch.nonzero(weight.view(-1) == 0)[0]] = 1.0
    with pytest.raises(NonzeroBudgetError, match="mlp.down_proj.*1 more than"):
        adapter.after_step()


def test_nonzero_guard_checks_the_nm_pattern_when_the_model_is_merged() -> None:
    model, adapter = sparse_run("2:4")
    weight = model.model.layers[0].self_attn.q_proj.weight
    with torch.no_grad():  # move one nonzero into a full group: the count holds, the 2:4 pattern does not
        groups = weight.view(-1, 4)
        groups[0, (groups[0] == 0).nonzero()[0]] = 1.0
        groups[1, groups[1].nonzero()[0]] = 0.0
    adapter.after_step()  # no topology update at this step: nonzeros are counted, the pattern is not
    with pytest.raises(NonzeroBudgetError, match="q_proj.*no longer holds 2:4"):
        adapter.finish()


def test_run_log_reads_old_rows_with_defaults_and_rewrites_them_under_the_new_header(tmp_path: Path) -> None:
    log = tmp_path / "runs.csv"
    old_header = "pattern,method,lr,seed,val_ppl,test_ppl,sparsity,sparsity_kept,trainable,revived,final_loss,train_s"
    log.write_text(old_header + "\n50%,seft,0.003,0,42.5,46.1,0.5,True,2442240,329280,3.9,92.0\n")
    old = read_runs(log)[("50%", "seft", 0.003, 0)]
    assert old.test_ppl == 46.1 and old.nonzero_growth is None and math.isnan(old.wall_s)

    new = RunResult("unpruned", "dense", 0.0, 0, 30.0, 31.1, 0.0, False, 0, 0, math.nan, 0.0, wall_s=12.0)
    append_run(log, new)
    assert log.read_text().splitlines()[0] == old_header + ",wall_s,nonzero_growth,swapped,refused,options,evals,peak_rss_mb"
    runs = read_runs(log)
    assert runs[old.key].revived == 329280 and math.isnan(runs[old.key].wall_s) and runs[old.key].nonzero_growth is None
    assert runs[old.key].swapped is None and runs[old.key].refused is None
    assert runs[new.key].wall_s == 12.0 and runs[new.key].nonzero_growth is None


def test_an_engine_run_logged_with_other_options_than_the_plan_now_gives_is_set_aside(tmp_path: Path, capsys) -> None:
    work = quick_workload(8, long=True)
    current = options_record(seft_config("seft", work, LONG, seed=0))

    def logged(method: str, lr: float, options: str | None) -> RunResult:
        return RunResult(pattern="50%", method=method, lr=lr, seed=0, val_ppl=1.0, test_ppl=1.0, sparsity=0.5,
                         sparsity_kept=True, trainable=1, revived=0, final_loss=1.0, train_s=1.0, wall_s=2.0,
                         options=options)

    stale = json.dumps({**json.loads(current), "column_cap": 2.0}, sort_keys=True)  # as if the default had changed
    # Logged before the engine had dense_revival: at its default the option changes nothing, so the run stands.
    older = json.dumps({key: value for key, value in json.loads(current).items() if key != "dense_revival"})
    for run in (logged("seft", 1e-3, current), logged("seft", 2e-3, stale), logged("seft", 4e-3, None),
                logged("lora", 1e-3, None), logged("seft", 8e-3, older)):
        append_run(tmp_path / "runs.csv", run)
    bench = Benchmark(LONG, work, tmp_path / "runs.csv", seeds=1, quick=True, runnable=frozenset())
    assert set(bench.runs) == {("50%", "seft", 1e-3, 0), ("50%", "seft", 4e-3, 0), ("50%", "lora", 1e-3, 0),
                               ("50%", "seft", 8e-3, 0)}
    assert "set aside: seft at 50% (lr 0.002" in capsys.readouterr().out
    with pytest.raises(Pending):  # the stale run is missing again, and seft may not run here
        bench.result("50%", "seft", 2e-3)
    assert json.loads(current)["column_cap"] is None and "seed" not in json.loads(current)


def test_runs_start_only_at_the_chosen_patterns_and_the_rest_of_the_plan_waits(tmp_path: Path) -> None:
    work = quick_workload(8, long=True)
    bench = Benchmark(LONG, work, tmp_path / "runs.csv", seeds=1, quick=True, runnable=frozenset({"seft"}),
                      patterns=frozenset({"2:4"}))
    bench.execute = lambda *key: pytest.fail(f"{key} ran outside --patterns")
    with pytest.raises(Pending):
        bench.result("50%", "seft", 3e-3)
    assert not (tmp_path / "runs.csv").exists() and not (tmp_path / "partial").exists()


def test_narrow_regime_borrows_rates_but_checks_the_ce_leaders_at_lower_ones_on_its_own_validation(tmp_path: Path) -> None:
    def logged(method: str, lr: float, val_ppl: float) -> RunResult:
        return RunResult(pattern="50%", method=method, lr=lr, seed=0, val_ppl=val_ppl, test_ppl=val_ppl, sparsity=0.5,
                         sparsity_kept=True, trainable=1, revived=0, final_loss=1.0, train_s=1.0, wall_s=2.0)

    def bench() -> Benchmark:
        narrow = Benchmark(NARROW, quick_workload(8, long=True, narrow=True), tmp_path / "runs.csv", seeds=1,
                           quick=False, runnable=frozenset())
        narrow.rates = {"masked_lora": 4e-3, "spp": 1e-2, "seft": 3e-3}.__getitem__  # the long regime's choices
        return narrow

    for run in (logged("masked_lora", 4e-3, 60.0), logged("masked_lora", 2e-3, 40.0), logged("masked_lora", 1e-3, 50.0)):
        append_run(tmp_path / "runs.csv", run)
    assert NARROW.first_grid("masked_lora", bench().rates) == [1e-3, 2e-3, 4e-3]
    assert bench().lr_of("masked_lora") == 2e-3  # the best of the check on this regime's validation
    assert bench().lr_of("masked_lora+kd") == 4e-3 and bench().lr_of("spp") == 1e-2  # the rest keep the borrowed rate
    assert bench().lr_of("seft+kd") == 3e-3

    append_run(tmp_path / "runs.csv", logged("masked_lora", 1e-3, 30.0))  # now best at the low edge: one more point
    with pytest.raises(Pending) as missing:
        bench().lr_of("masked_lora")
    assert missing.value.key == ("50%", "masked_lora", 5e-4, 0)


RESUMABLE_ADAPTERS = {
    # interval 2, window 2: the pause after step 1 falls inside an open accumulation window
    "seft": lambda model: seft_adapter(model, SparsityEvolutionConfig(
        density=0.05, update_interval=2, accumulation_steps=2, update_end=1.0, seed=0)),
    "lora": lambda model: peft_lora_adapter(model, rank=4, alpha=8),
    "masked_full": masked_full_adapter,
}


@pytest.mark.parametrize("method", sorted(RESUMABLE_ADAPTERS))
def test_a_run_paused_at_the_deadline_resumes_mid_run_to_the_uninterrupted_result(method: str, tmp_path: Path) -> None:
    batches = [random_batch(2, 16, seed=step) for step in range(6)]

    def run(checkpoint: RunCheckpoint | None) -> tuple[list[float], dict, dict]:
        model = prune_linears(tiny_model("llama"))
        adapter = RESUMABLE_ADAPTERS[method](model)
        losses, _ = train(model, adapter, batches, 1e-2, checkpoint)
        return losses, adapter.finish().state_dict(), adapter.notes

    whole_losses, whole_weights, whole_notes = run(None)
    path = tmp_path / "partial" / "run.pt"
    with pytest.raises(OutOfTime, match="after step 1 of 6"):
        run(RunCheckpoint(path, every=4, deadline=-math.inf))  # the deadline has passed: one step, then pause
    assert torch.load(path, weights_only=False)["steps"] == 1
    losses, weights, notes = run(RunCheckpoint(path, every=4))
    assert losses == whole_losses
    assert weights.keys() == whole_weights.keys()
    assert all(torch.equal(weights[key], whole_weights[key]) for key in weights)
    assert notes == whole_notes
    if method == "seft":
        assert notes["revived"] > 0  # the resumed window led to an update that revived weights
    assert torch.load(path, weights_only=False)["steps"] == 4  # the periodic save; the last step saves nothing


def test_a_count_the_checkpoint_lacks_is_unknown_after_resuming_not_zero(tmp_path: Path) -> None:
    batches = [random_batch(2, 16, seed=step) for step in range(4)]
    path = tmp_path / "partial" / "run.pt"

    def run(checkpoint: RunCheckpoint) -> dict[str, float]:
        model = prune_linears(tiny_model("llama"))
        adapter = RESUMABLE_ADAPTERS["seft"](model)
        train(model, adapter, batches, 1e-2, checkpoint)
        return adapter.notes

    with pytest.raises(OutOfTime):
        run(RunCheckpoint(path, every=4, deadline=-math.inf))
    saved = torch.load(path, weights_only=False)
    del saved["notes"]["swapped"]  # as a checkpoint written before moves were counted
    torch.save(saved, path)
    notes = run(RunCheckpoint(path, every=4))
    assert count_note(notes, "swapped") is None
    assert count_note(notes, "refused") == int(notes["refused"]) >= 0 and count_note(notes, "revived") > 0


def test_swap_probe_measures_every_update_and_none_for_fixed_support() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    probe = [sys.executable, str(SCRIPT.parent / "swap_probe.py"), "--quick", "--pattern", "50%"]  # 50%: SEFT revives
    done = subprocess.run([*probe, '{"drop_fraction": 0.0}', "{}"],
                          cwd=SCRIPT.parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    fixed, seft = [json.loads(line[len("RESULT "):]) for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert fixed["updates"] == [] and math.isfinite(fixed["held_loss"])
    assert [u["step"] for u in seft["updates"]] == [2, 4]  # quick cadence: every 2 steps until 80% of 8
    assert all(u["grown"] > 0 and math.isfinite(u["loss_after"] - u["loss_before"]) for u in seft["updates"])
    assert sum(u["revived"] for u in seft["updates"]) > 0
    assert all(0.05 <= u["busy_column_share"] <= 1.0 for u in seft["updates"])


def test_swap_probe_freeze_holds_moved_slots_at_zero() -> None:
    """Frozen, the slots an update moved never step; the others still do."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    probe = [sys.executable, str(SCRIPT.parent / "swap_probe.py"), "--quick", "--pattern", "50%", "--freeze-moved", "{}"]
    done = subprocess.run(probe, cwd=SCRIPT.parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (seft,) = [json.loads(line[len("RESULT "):]) for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert seft["freeze_moved"] and len(seft["updates"]) == 2
    first = seft["updates"][0]  # its period runs to the second update: moved slots held, the others trained
    assert first["moved_step"] == 0.0 and first["kept_step"] > 0.0


def test_a_budget_sets_the_deltas_density_or_the_low_rank_factors_rank():
    from quality_plan import make_adapter
    from quality_regimes import SHORT, split_budget

    work = quick_workload(8, long=False)
    model = tiny_model("llama")
    prune_linears(model)
    adapter, count = make_adapter("seft@d0.25", model, work, 0, SHORT)
    projections = [m for n, m in model.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj",
                                                                         "gate_proj", "up_proj", "down_proj"))]
    weights = sum(m.weight.numel() for m in projections)
    assert count == sum(p.numel() for p in adapter.parameters) == pytest.approx(0.25 * weights, abs=len(projections))
    model = tiny_model("llama")
    prune_linears(model)
    adapter, count = make_adapter("spp@r16", model, work, 0, SHORT)
    assert count == sum(p.numel() for p in adapter.parameters) == 16 * sum(
        m.in_features + m.out_features for n, m in model.named_modules() if n.endswith(".base"))
    assert split_budget("masked_lora@r32") == ("masked_lora", None, 32)
    with pytest.raises(ValueError, match="@d<density>"):
        split_budget("masked_lora@d0.1")


def test_an_ablation_at_a_budget_runs_at_that_budget_with_seft_s_rate_there(tmp_path: Path) -> None:
    from quality_regimes import SHORT, logged_rates, split_budget

    method = "seft_no_revival@d0.25"
    assert method in SHORT.methods and split_budget(method) == ("seft_no_revival", 0.25, None)
    assert SHORT.seft_options(method) == {"drop_fraction": 0.2, "revival_cap": None, "regrow_pruned": False}
    runs = tmp_path / "quality_runs.csv"
    grid = sorted(SHORT.grids["seft@d0.25"])
    for lr, val in zip(grid, (50.0, 40.0, 45.0)):  # an interior optimum: the middle rate
        append_run(runs, RunResult(pattern="50%", method="seft@d0.25", lr=lr, seed=0, val_ppl=val, test_ppl=val,
                                   sparsity=0.5, sparsity_kept=True, trainable=1, revived=0, final_loss=1.0,
                                   train_s=1.0))
    assert logged_rates(SHORT, tmp_path)(method) == grid[1]
    with pytest.raises(Pending):  # the plain ablation waits on SEFT's own grid, not the budget's
        logged_rates(SHORT, tmp_path)("seft_no_revival")


def test_an_ablation_at_a_budget_also_runs_at_fixed_support_s_rate_at_that_budget(tmp_path: Path) -> None:
    from quality_regimes import SHORT, UNPRUNED, fixed_support_of

    method = "seft_no_revival@d0.25"
    assert method in SHORT.at_fixed_rate and fixed_support_of(method) == "fixed_deltas@d0.25"
    assert fixed_support_of("seft_no_revival") == "fixed_deltas"

    def logged(pattern: str, name: str, lr: float, val: float = 1.0) -> RunResult:
        return RunResult(pattern=pattern, method=name, lr=lr, seed=0, val_ppl=val, test_ppl=val, sparsity=0.5,
                         sparsity_kept=True, trainable=1, revived=0, final_loss=1.0, train_s=1.0)

    runs = tmp_path / "quality_runs.csv"
    logs = [logged(UNPRUNED, "dense", 0.0), *(logged(pattern, "pruned", 0.0) for pattern in ("50%", "2:4", "70%"))]
    seft_grid, fixed_grid = sorted(SHORT.grids["seft@d0.25"]), sorted(SHORT.grids["fixed_deltas@d0.25"])
    logs += [logged("50%", "seft@d0.25", lr, val) for lr, val in zip(seft_grid, (50.0, 40.0, 45.0))]
    fixed_grid = [float(f"{fixed_grid[0] / SHORT.grid_factor:.3g}"), *fixed_grid]  # its best is below SEFT's:
    logs += [logged("50%", "fixed_deltas@d0.25", lr, val) for lr, val in zip(fixed_grid, (25.0, 20.0, 30.0, 35.0))]
    for run in logs:
        append_run(runs, run)
    bench = Benchmark(SHORT, quick_workload(8, long=False), runs, seeds=1, quick=False, runnable=frozenset({method}))
    ran = []

    def execute(pattern: str, name: str, lr: float, seed: int) -> list[RunResult]:
        ran.append((pattern, name, lr))
        return [logged(pattern, name, lr)]

    bench.execute = execute
    bench.run_plan()
    assert ran == [("50%", method, seft_grid[1]), ("50%", method, fixed_grid[1])]  # SEFT's rate, then fixed support's


def test_two_benchmark_processes_share_one_grid_each_skipping_the_run_the_other_holds(tmp_path: Path) -> None:
    """Two lanes on one plan: a run another live process has claimed is skipped, not run twice; the rest of
    its grid still runs; a claim left by a killed process is taken over; a run the other logged meanwhile
    is read, not rerun."""
    from quality_regimes import SHORT, UNPRUNED
    from quality_runs import Claimed, RunClaim

    def logged(pattern: str, name: str, lr: float, val: float = 1.0) -> RunResult:
        return RunResult(pattern=pattern, method=name, lr=lr, seed=0, val_ppl=val, test_ppl=val, sparsity=0.5,
                         sparsity_kept=True, trainable=1, revived=0, final_loss=1.0, train_s=1.0)

    runs = tmp_path / "quality_runs.csv"
    for run in [logged(UNPRUNED, "dense", 0.0), *(logged(p, "pruned", 0.0) for p in ("50%", "2:4", "70%"))]:
        append_run(runs, run)
    method = "fixed_deltas@d0.1"
    grid = sorted(SHORT.grids[method])
    bench = Benchmark(SHORT, quick_workload(8, long=False), runs, seeds=1, quick=False, runnable=frozenset({method}))
    ran = []

    def execute(pattern: str, name: str, lr: float, seed: int) -> list[RunResult]:
        assert RunClaim(bench.checkpoint((pattern, name, lr, seed)).path.with_suffix(".claim")).holder() == os.getpid()
        ran.append((pattern, lr))
        return [logged(pattern, name, lr, val={grid[0]: 41.0, grid[1]: 40.0, grid[2]: 42.0}[lr])]

    bench.execute = execute
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # the other lane, alive
    try:
        claim = bench.checkpoint(("50%", method, grid[0], 0)).path.with_suffix(".claim")
        claim.parent.mkdir(parents=True)
        claim.write_text(str(other.pid))
        with pytest.raises(Claimed):
            bench.result("50%", method, grid[0])
        bench.run_plan()
        assert ran == [("50%", lr) for lr in grid[1:]]  # the held rate skipped, the others run
        assert (claim.exists(), [p.name for p in claim.parent.glob("*.claim")]) == (True, [claim.name])
    finally:
        other.kill()
        other.wait()
    # The other lane logged its run and was killed before removing its claim: the run is read, not rerun.
    append_run(runs, logged("50%", method, grid[0], 41.0))
    bench.run_plan()
    assert ran == [*(("50%", lr) for lr in grid[1:]), ("2:4", grid[1]), ("70%", grid[1])]  # then the other patterns
    assert bench.best_lr(method) == grid[1] and not claim.exists()


def test_seft_is_the_published_method_whatever_the_engine_defaults_become(monkeypatch):
    """The run log keys runs by method name: a change of seft_trl's defaults must not turn "seft" into another
    method, nor make an ablation of it a no-op (its logged runs would then be set aside or mislabelled)."""
    import dataclasses

    import quality_regimes
    from quality_regimes import SHORT, same_as_defaults

    changed = dataclasses.make_dataclass(
        "Changed", [("drop_fraction", float, dataclasses.field(default=0.0)),
                    ("revival_cap", float, dataclasses.field(default=0.005))], bases=(quality_regimes.SparsityEvolutionConfig,))
    monkeypatch.setattr(quality_regimes, "SparsityEvolutionConfig", changed)
    assert SHORT.seft_options("seft") == {"drop_fraction": 0.2, "revival_cap": None}
    assert SHORT.seft_options("seft_no_revival@d0.25") == {"drop_fraction": 0.2, "revival_cap": None,
                                                            "regrow_pruned": False}
    assert SHORT.seft_options("seft_revival_cap0.001") == {"drop_fraction": 0.2, "revival_cap": 0.001}
    assert not same_as_defaults({"revival_cap": 0.005}, "50%") and same_as_defaults({"revival_cap": None}, "50%")


def test_budget_grids_scale_the_rate_down_as_the_density_grows():
    from quality_regimes import BUDGET_LR_EXPONENT, budget_grid

    low, mid, high = budget_grid(8e-3, 0.02, 0.08)
    assert low == pytest.approx(mid / 2, rel=1e-2) and high == pytest.approx(mid * 2, rel=1e-2)
    assert mid == pytest.approx(8e-3 * 4 ** -BUDGET_LR_EXPONENT, rel=1e-2)


def test_the_frontier_places_each_method_at_its_chosen_rate_and_marks_who_no_cheaper_run_beats(tmp_path: Path) -> None:
    import frontier

    def logged(pattern: str, method: str, lr: float, val_ppl: float, test_ppl: float, trainable: int) -> RunResult:
        return RunResult(pattern=pattern, method=method, lr=lr, seed=0, val_ppl=val_ppl, test_ppl=test_ppl,
                         sparsity=0.5, sparsity_kept=True, trainable=trainable, revived=0, final_loss=1.0, train_s=1.0)

    count, surviving = 2_442_240, 53_084_160
    # The short regime's grids: SEFT 2e-4, 5e-4, 1.25e-3; masked full 2e-5, 5e-5, 1.25e-4 (interior optima here).
    for lr, val in ((2e-4, 41.0), (5e-4, 40.0), (1.25e-3, 42.0)):
        append_run(tmp_path / "quality_runs.csv", logged("50%", "seft", lr, val, val + 5, count))
    for lr, val in ((2e-5, 40.0), (5e-5, 38.0), (1.25e-4, 39.0)):
        append_run(tmp_path / "quality_runs.csv", logged("50%", "masked_full", lr, val, val + 5, surviving))
    append_run(tmp_path / "quality_runs.csv", logged("2:4", "seft", 5e-4, 60.0, 60.0, count))
    append_run(tmp_path / "quality_runs.csv", logged("2:4", "seft", 2e-4, 50.0, 50.0, count))  # not its rate
    append_run(tmp_path / "quality_runs.csv", logged("2:4", "masked_full", 5e-5, 70.0, 70.0, surviving))
    # masked LoRA's grid (4e-4, 1e-3, 2.5e-3) is best at its edge and waits for an extension: no point yet.
    for lr, val in ((4e-4, 45.0), (1e-3, 44.0), (2.5e-3, 30.0)):
        append_run(tmp_path / "quality_runs.csv", logged("50%", "masked_lora", lr, val, val, count))
    # SPP's (the same grid) was extended twice, the regime's limit: its best, at the last edge, is its rate.
    for lr, val in ((4e-4, 45.0), (1e-3, 44.0), (2.5e-3, 43.0), (6.25e-3, 42.0), (1.56e-2, 41.0)):
        append_run(tmp_path / "quality_runs.csv", logged("50%", "spp", lr, val, val + 10, count))

    # A SEFT variant at a budget ran at two rates: the better on validation is its point.
    append_run(tmp_path / "quality_runs.csv", logged("50%", "seft_no_revival@d0.25", 2.6e-3, 39.0, 41.5, 26_542_080))
    append_run(tmp_path / "quality_runs.csv", logged("50%", "seft_no_revival@d0.25", 6.5e-4, 38.0, 42.5, 26_542_080))

    report = frontier.report("short", tmp_path)
    assert "| seft_no_revival@d0.25 | 26,542,080 | " in report and "| 42.50 |" in report and "| 41.50 |" not in report
    def memory(method: str, trainable: int, pattern: str = "50%") -> float:
        method = frontier.projected(method, trainable, pattern, frontier.REGIMES["short"].ablations)
        return frontier.training_memory(frontier.LLAMA2_7B, method, frontier.Workload(), frontier.OPTIMIZER).total / frontier.GB

    seft_memory = memory("seft", count)
    # SEFT's window holds removal candidates only where it revives: not without revival, not at 2:4.
    assert memory("seft_no_revival@d0.25", 26_542_080) < memory("seft@d0.25", 26_542_080)
    assert f"| seft_no_revival@d0.25 | 26,542,080 | {memory('seft_no_revival@d0.25', 26_542_080):.1f} |" in report
    assert memory("seft", count, "2:4") < seft_memory == memory("seft", count, "70%")
    assert f"| seft | 2,442,240 | {seft_memory:.1f} | 45.00 | **yes** |" in report  # cheaper than masked full
    assert "| masked_full | 53,084,160 | 51.9 | 43.00 | **yes** |" in report  # lower perplexity, more memory
    assert f"| seft | 2,442,240 | {memory('seft', count, '2:4'):.1f} | 60.00 | **yes** |" in report.split("## Wanda 2:4")[1]
    assert "| masked_full | 53,084,160 | 51.9 | 70.00 |  |" in report  # beaten by a run that needs less memory
    assert "masked_lora" not in report and "## Wanda 70%\n\nNo run logged yet." in report
    assert "| spp | 2,442,240 | " in report and "| 51.00 | **yes** |" in report  # the least memory
    assert (tmp_path / "quality_frontier.png").stat().st_size > 1000


def test_the_benchmark_help_lists_every_pattern():
    """argparse %-formats help text, so a pattern written ``70%`` once crashed ``quality.py --help``."""
    from quality import build_parser
    from quality_regimes import PATTERNS

    text = build_parser().format_help()
    assert all(pattern in text for pattern in PATTERNS)
