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

About 4 minutes a variant on 2 cores, after Wanda (~3 minutes, once).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics

import torch
from torch import nn

from baselines import PROJECTIONS, engine_adapter, lora_trainable_count
from quality_plan import PATTERNS, train, wanda
from quality_workloads import Workload, lee_workload, quick_workload
from seft_trl import SparsityEvolution, SparsityEvolutionConfig


@torch.no_grad()
def held_loss(model: nn.Module, held: list[torch.Tensor]) -> float:
    return statistics.mean(model(input_ids=batch, labels=batch).loss.item() for batch in held)


def probe(pruned: nn.Module, work: Workload, options: dict, lr: float, steps: int, held: list[torch.Tensor]) -> dict:
    """One variant: the loss jump of every update, the swap counts, and the held-out loss after ``steps``."""
    model = copy.deepcopy(pruned)
    config = SparsityEvolutionConfig(num_deltas=lora_trainable_count(model, work.rank), target_modules=PROJECTIONS,
                                     seed=0, **{**work.cadence, **options})
    seft = SparsityEvolution(model, config)
    updates = []
    update = seft.update_topology

    def measured_update():  # the engine calls this inside the optimizer step that ends a window
        before = held_loss(model, held)
        stats = update()
        updates.append({"step": seft.step_count, "loss_before": before, "loss_after": held_loss(model, held),
                        **{key: sum(getattr(s, key) for s in stats.values()) for key in ("grown", "revived", "refused")}})
        return stats

    seft.update_topology = measured_update
    train(model, engine_adapter(seft), work.batches(0), lr, stop=steps)
    return {"options": options, "lr": lr, "steps": steps, "held_loss": held_loss(model, held), "updates": updates}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", help="engine options as JSON objects, one per variant")
    parser.add_argument("--pattern", choices=sorted(PATTERNS), default="2:4")
    parser.add_argument("--lr", type=float, default=7.83e-3, help="default: SEFT's chosen short-regime rate")
    parser.add_argument("--steps", type=int, default=16, help="steps of the 32-step run to train")
    parser.add_argument("--held-batches", type=int, default=8, help="batches of seed 1's order to measure on")
    parser.add_argument("--quick", action="store_true", help="tiny random model: a smoke test")
    args = parser.parse_args()
    variants = [json.loads(text) for text in args.variants]

    work = quick_workload(8, long=False) if args.quick else lee_workload(32, 4, 128, 512, 8, 24)
    steps = min(args.steps, work.steps)
    pruned = work.load_model()
    wanda(pruned, args.pattern, work)
    held = work.batches(1)[: args.held_batches]
    print(f"[{args.pattern}] pruned: held-out loss {held_loss(pruned, held):.4f}", flush=True)
    for options in variants:
        result = probe(pruned, work, options, args.lr, steps, held)
        for u in result["updates"]:
            print(f"  update at step {u['step']}: held-out loss {u['loss_before']:.4f} -> {u['loss_after']:.4f} "
                  f"({u['loss_after'] - u['loss_before']:+.4f}); grown {u['grown']:,}, revived {u['revived']:,}, "
                  f"refused {u['refused']:,}", flush=True)
        print(f"[{args.pattern}] {json.dumps(options)}: held-out loss {result['held_loss']:.4f} after {steps} steps",
              flush=True)
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
