"""What SEFT's topology updates do to the loss at the start of a short-regime run, per engine variant.

A quality run says which variant ends better; this probe says why. It trains the first ``--steps``
steps of the short regime's run (same model, pruning, batches, schedule and cadence as
``quality.py``) and, around every topology update, measures the loss on held-out batches just
before and just after the swaps. A grown delta starts at zero and a dropped one keeps its value
(the default ``drop_mode``), so that jump is what the removals paying for revivals really cost,
before any training could earn it back. At the end it reports the held-out loss, to set beside
fixed support (``{"drop_fraction": 0.0}``, no updates at all).

    python benchmarks/swap_probe.py --pattern 2:4 '{"drop_fraction": 0.0}' '{}' '{"regrow_pruned": true}'
    python benchmarks/swap_probe.py --quick '{}'     # tiny random model, seconds
    python benchmarks/swap_probe.py --regime long --pattern 50% --lr 6e-3 --steps 60 '{"drop_fraction": 0.0}' '{}'

About 4 minutes a variant on 2 cores, after Wanda (~3 minutes, once).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from typing import Callable

import torch
from torch import nn

from baselines import PROJECTIONS, engine_adapter, lora_trainable_count
from quality_plan import train, wanda
from quality_regimes import PATTERNS
from quality_workloads import Workload, lee_workload, quick_workload, wikipedia_workload
from seft_trl import SparsityEvolution, SparsityEvolutionConfig


@torch.no_grad()
def held_loss(model: nn.Module, held: list[torch.Tensor]) -> float:
    return statistics.mean(model(input_ids=batch, labels=batch).loss.item() for batch in held)


def probe(pruned: nn.Module, work: Workload, options: dict, lr: float, steps: int, held: list[torch.Tensor],
          freeze_moved: bool = False) -> dict:
    """One variant: the loss jump of every update, the swap counts, and the held-out loss after ``steps``.

    Each update's entry also says how concentrated its grown deltas are: ``busy_column_share``, the
    median over layers of the share of the layer's grown deltas that land in its 5% busiest input
    columns (0.05 if spread evenly). ``freeze_moved`` holds the slots an update moved at zero until
    the next update: the dropped deltas stop training and the grown ones never start, which says
    whether the loss after a move is lost in the grown slots' training or in the dropped slots'.
    """
    model = copy.deepcopy(pruned)
    config = SparsityEvolutionConfig(num_deltas=lora_trainable_count(model, work.rank), target_modules=PROJECTIONS,
                                     seed=0, **{**work.cadence, **options})
    seft = SparsityEvolution(model, config)
    updates = []
    update = seft.update_topology

    # Per layer, the slots [k] (bool) whose position the latest update changed.
    moved = {name: torch.zeros_like(layer.delta, dtype=torch.bool) for name, layer in seft.layers.items()}

    def measured_update(names=None):  # the engine calls this inside the optimizer step that ends a window
        before = held_loss(model, held)
        positions = {name: layer.delta_index.clone() for name, layer in seft.layers.items()}
        stats = update(names)
        shares = []
        for name, layer in seft.layers.items():
            moved[name] = layer.delta_index != positions[name]
            if bool(moved[name].any()):
                shares.append(busy_column_share(layer.delta_index[moved[name]], layer.in_features))
        updates.append({"step": seft.step_count, "loss_before": before, "loss_after": held_loss(model, held),
                        **{key: sum(getattr(s, key) for s in stats.values()) for key in ("grown", "revived", "refused")},
                        "busy_column_share": statistics.median(shares) if shares else None})
        return stats

    seft.update_topology = measured_update
    adapter = engine_adapter(seft)
    mean_step = {"value": 0.0}
    adapter.after_step = step_sizes(seft, adapter.after_step, updates, moved, mean_step)
    if freeze_moved:
        adapter.after_step = holding_at_zero(seft, adapter.after_step, moved)
    train(model, adapter, work.batches(0), lr, stop=steps)
    return {"options": options, "lr": lr, "steps": steps, "held_loss": held_loss(model, held), "updates": updates,
            "mean_step": mean_step["value"], "freeze_moved": freeze_moved}


def busy_column_share(flat_index: torch.Tensor, in_features: int) -> float:
    """Share of the positions [n] that lie in the 5% of input columns holding the most of them."""
    per_column = torch.bincount(flat_index.long() % in_features, minlength=in_features)
    busiest = torch.sort(per_column, descending=True).values[: max(1, in_features // 20)]
    return float(busiest.sum()) / flat_index.numel()


def holding_at_zero(seft: SparsityEvolution, after_step: Callable[[], None],
                    moved: dict[str, torch.Tensor]) -> Callable[[], None]:
    """Wrap ``after_step`` to put the slots in ``moved`` (per layer, refilled by every update) back to zero."""

    @torch.no_grad()
    def hold_then_step() -> None:
        for name, slots in moved.items():
            layer = seft.layers[name]
            layer.delta[slots] = 0.0
            layer.materialize()
        after_step()

    return hold_then_step


def step_sizes(seft: SparsityEvolution, after_step: Callable[[], None], updates: list[dict],
               moved: dict[str, torch.Tensor], mean_step: dict[str, float]) -> Callable[[], None]:
    """Wrap ``after_step`` to measure how far the slots an update moved travel, against the others.

    Adam moves a weight by about lr × (signal-to-noise of its gradient) a step, so whether evolution's
    trainable set is "hotter" than fixed support's shows in the mean |Δδ| a step of the slots moved
    at the latest update over that of the slots that stayed. Each update's entry gains
    ``moved_step`` / ``kept_step`` (mean |Δδ| a step until the next update) and their ratio;
    ``mean_step["value"]`` is every slot's mean |Δδ| a step over the probe (fixed support too).
    ``moved``: per layer, the slots [k] (bool) the latest update moved (kept by the probe's update).
    """
    previous = {name: layer.delta.detach().clone() for name, layer in seft.layers.items()}
    sums = {"moved": 0.0, "kept": 0.0, "moved_n": 0, "kept_n": 0}
    whole = {"sum": 0.0, "n": 0}  # every slot over the whole probe, for fixed support as well

    def measured() -> None:
        after_step()
        if updates and updates[-1]["step"] == seft.step_count:  # this step ended with an update: a new period
            for name, layer in seft.layers.items():
                previous[name] = layer.delta.detach().clone()
            sums.update(moved=0.0, kept=0.0, moved_n=0, kept_n=0)
            return
        for name, layer in seft.layers.items():
            change = (layer.delta.detach() - previous[name]).abs()
            previous[name] = layer.delta.detach().clone()
            sums["moved"] += float(change[moved[name]].sum())
            sums["kept"] += float(change[~moved[name]].sum())
            sums["moved_n"] += int(moved[name].sum())
            sums["kept_n"] += int((~moved[name]).sum())
            whole["sum"] += float(change.sum())
            whole["n"] += change.numel()
        mean_step["value"] = whole["sum"] / max(1, whole["n"])
        if updates:  # the period's means so far, in the update that opened it
            moved_step, kept_step = sums["moved"] / max(1, sums["moved_n"]), sums["kept"] / max(1, sums["kept_n"])
            updates[-1].update(moved_step=moved_step, kept_step=kept_step,
                               step_ratio=moved_step / kept_step if kept_step else None)

    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", help="engine options as JSON objects, one per variant")
    parser.add_argument("--pattern", choices=sorted(PATTERNS), default="2:4")
    parser.add_argument("--lr", type=float, default=7.83e-3, help="default: SEFT's chosen short-regime rate")
    parser.add_argument("--steps", type=int, default=16, help="steps of the 32-step run to train")
    parser.add_argument("--held-batches", type=int, default=8, help="batches of seed 1's order to measure on")
    parser.add_argument("--regime", choices=("short", "long"), default="short",
                        help="whose run to probe the beginning of; long: Wikipedia, 256 × 4 × 256, the engine's "
                        "cadence (updates at steps 20, 40, ...)")
    parser.add_argument("--quick", action="store_true", help="tiny random model: a smoke test")
    parser.add_argument("--freeze-moved", action="store_true",
                        help="hold the slots each update moves at zero until the next update (every variant)")
    args = parser.parse_args()
    variants = [json.loads(text) for text in args.variants]

    long = args.regime == "long"
    if args.quick:
        work = quick_workload(8, long=long)
    elif long:
        work = wikipedia_workload(256, 4, 256, 512, 8)
    else:
        work = lee_workload(32, 4, 128, 512, 8, 24)
    steps = min(args.steps, work.steps)
    pruned = work.load_model()
    wanda(pruned, args.pattern, work)
    held = work.batches(1)[: args.held_batches]
    print(f"[{args.pattern}] pruned: held-out loss {held_loss(pruned, held):.4f}", flush=True)
    for options in variants:
        result = probe(pruned, work, options, args.lr, steps, held, args.freeze_moved)
        for u in result["updates"]:
            print(f"  update at step {u['step']}: held-out loss {u['loss_before']:.4f} -> {u['loss_after']:.4f} "
                  f"({u['loss_after'] - u['loss_before']:+.4f}); grown {u['grown']:,}, revived {u['revived']:,}, "
                  f"refused {u['refused']:,}; a step after it, moved slots {u.get('moved_step', 0):.2e}, "
                  f"others {u.get('kept_step', 0):.2e} (ratio {u.get('step_ratio') or 0:.2f}); grown in the 5% busiest "
                  f"columns {u['busy_column_share'] or 0:.0%}", flush=True)
        print(f"[{args.pattern}] {json.dumps(options)}: held-out loss {result['held_loss']:.4f} after {steps} steps, "
              f"mean |Δδ| a step {result['mean_step']:.2e}", flush=True)
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
