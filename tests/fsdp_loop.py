"""SEFT under FSDP2 in a plain PyTorch loop, as the README describes it; run by tests/test_ddp.py.

``torchrun --nproc_per_node 2 fsdp_loop.py OUTPUT_DIR MODE``: ``straight`` trains 8 steps; ``stop`` trains 6
(inside the accumulation window of the update at step 8) and saves a checkpoint with
torch.distributed.checkpoint plus ``seft.window_state()``; ``resume`` loads it and trains to step 8. Each
rank saves ``<mode>_rank{r}.pt`` with the whole final positions, deltas and weights and the losses.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).parent))

from seft_trl import SparsityEvolution, SparsityEvolutionConfig  # noqa: E402
from seft_trl.sharding import whole  # noqa: E402
from trainer_helpers import pruned_model  # noqa: E402

STEPS, STOP = 8, 6


def batch(step: int, rank: int, world: int) -> torch.Tensor:
    ids = torch.randint(3, 259, (4, 32), generator=torch.Generator().manual_seed(step % 3))
    return ids[rank * 4 // world:(rank + 1) * 4 // world]


def main(output_dir: Path, mode: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = pruned_model()
    config = SparsityEvolutionConfig(density=0.05, update_interval=4, accumulation_steps=3, update_end=1.0,
                                     drop_schedule="constant")
    seft = SparsityEvolution(model, config)  # first the deltas, then the sharding, then the optimizer
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(seft.parameters(), lr=3e-2)
    start = 0
    if mode == "resume":
        state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
        dcp.load(state, checkpoint_id=str(output_dir / "checkpoint"))
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
        start = STOP
    seft.attach(optimizer, total_steps=STEPS, start_step=start)
    if mode == "resume":
        seft.load_window_state(torch.load(output_dir / "checkpoint" / "seft_window.pt"))
    losses, revived = {}, 0
    for step in range(start + 1, (STOP if mode == "stop" else STEPS) + 1):
        ids = batch(step, rank, world)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses[step] = float(loss)
        revived += sum(stats.revived for stats in seft.last_update.values())
    if mode == "stop":
        windows = seft.window_state()
        assert windows, "the checkpoint must fall inside an accumulation window"
        state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
        dcp.save(state, checkpoint_id=str(output_dir / "checkpoint"))
        if rank == 0:
            torch.save(windows, output_dir / "checkpoint" / "seft_window.pt")
    final = {name: (layer.delta_index.clone(), whole(layer.delta.detach()).clone(), whole(layer.weight.detach()).clone())
             for name, layer in seft.layers.items()}
    torch.save({"losses": losses, "state": final, "revived": revived}, output_dir / f"{mode}_rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
