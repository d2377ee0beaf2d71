"""Moved-slot surgery on FSDP2-sharded deltas: each rank writes its chunk exactly as one process writes the whole.

Run by tests/test_ddp.py as ``torchrun --nproc_per_node 2 fsdp_optim_state.py OUTPUT_DIR``: each rank saves
``rank{r}.pt`` with, per optimizer, whether its chunk of the state equals the unsharded reference's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torchao.optim import AdamW8bit

from seft_trl.optim_state import seed_optimizer_slots
from seft_trl.sharding import local, own, row_range

K = 16384  # 8192 deltas a rank: torchao keeps 8-bit state for tensors of >= 4096 elements
SLOTS = torch.tensor([3, 700, 4095, 8191, 8192, 8500, 12000, 16383])  # on both ranks' chunks


class Deltas(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(K))


def stepped(optimizer_cls, sharded: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
    module = Deltas()
    if sharded:
        fully_shard(module)
    optimizer = optimizer_cls(module.parameters(), lr=1e-2)
    for step in range(3):
        grad = torch.randn(K, generator=torch.Generator().manual_seed(step))
        start, end = row_range(module.delta)
        module.delta.grad = (torch.distributed.tensor.DTensor.from_local(grad[start:end], module.delta.device_mesh,
                                                                          module.delta.placements) if sharded else grad)
        optimizer.step()
    return module, optimizer


def moments(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> dict[str, torch.Tensor]:
    state = optimizer.state[param]
    values = {}
    for key in ("exp_avg", "exp_avg_sq"):
        buffer = local(state[key])
        values[key] = buffer.dequantize() if hasattr(buffer, "dequantize") else buffer.clone()
    values["8bit"] = hasattr(local(state["exp_avg"]), "codes")
    return values


def main(output_dir: str) -> None:
    dist.init_process_group("gloo")
    mean_sq = torch.linspace(1e-4, 1e-2, SLOTS.numel())
    record = {}
    for name, optimizer_cls in (("adamw", torch.optim.AdamW), ("torchao_8bit", AdamW8bit)):
        reference, reference_optimizer = stepped(optimizer_cls, sharded=False)
        seed_optimizer_slots(reference_optimizer, reference.delta, SLOTS, mean_sq)
        module, optimizer = stepped(optimizer_cls, sharded=True)
        start, end = row_range(module.delta)
        mine, offsets = own(SLOTS, start, end)
        seed_optimizer_slots(optimizer, module.delta, offsets, mean_sq[mine])
        ours, expected = moments(optimizer, module.delta), moments(reference_optimizer, reference.delta)
        record[name] = {
            "8bit": ours["8bit"],
            "owned": int(mine.sum()),
            "equal": all(torch.equal(ours[key], expected[key][start:end]) for key in ("exp_avg", "exp_avg_sq")),
            "seeded": bool((ours["exp_avg_sq"][offsets] != 0).all()) and bool((ours["exp_avg"][offsets] == 0).all()),
        }
    torch.save(record, Path(output_dir) / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
