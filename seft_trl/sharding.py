"""SEFT on weights sharded by FSDP2 (``fully_shard``): which rows and delta slots a rank holds.

FSDP2 splits every parameter of a wrapped module along dim 0 into one contiguous chunk per rank
(a DTensor placed ``Shard(0)``): a weight [out, in] by rows, the deltas [k] by slots. Inside
forward and backward FSDP2 gathers whole tensors, so the layer's math (the δ gradient, the
window's dense gradient and candidate choice) sees the whole weight, as without sharding. Between
optimizer steps a rank holds only its chunks, so what SEFT does there works on chunks:

* writing W' = base + δ: a rank needs δ at the positions in its own rows, which may lie in any
  rank's slot chunk, so the deltas are gathered (k floats: 2% of a bf16 weight's gather at 1%
  density) and each rank writes its rows;
* a topology update reads the whole layer (support, removal candidates): the weight is gathered
  one layer at a time, every rank takes the same decision (the statistics are summed over ranks,
  as under DDP) on the same whole weight, and each writes back its own rows;
* delta positions and base values are buffers, which FSDP2 leaves whole on every rank, so each
  rank knows every slot's position; the optimizer holds state only for its slot chunk.

Plain tensors pass through every function here unchanged, so the same layer code serves one
process, DDP and FSDP2.
"""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor, Shard


def is_sharded(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's chunk of a sharded tensor (a view of its storage); a plain tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor, gathered from every rank when sharded (a collective: every rank must call it)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def row_range(tensor: torch.Tensor) -> tuple[int, int]:
    """[start, end) along dim 0 of this rank's chunk; the whole range for a plain tensor.

    FSDP2 chunks dim 0 as ``torch.chunk`` does: ceil(n / ranks) per rank, the last ones shorter or
    empty. Only that layout is supported (not HSDP's 2-D mesh or a custom ``shard_placement_fn``).
    """
    if not isinstance(tensor, DTensor):
        return 0, tensor.shape[0]
    if tensor.device_mesh.ndim != 1 or tuple(tensor.placements) != (Shard(0),):
        raise NotImplementedError(
            f"SEFT supports FSDP2 sharding along dim 0 over a 1-D mesh (fully_shard's default); this parameter is "
            f"placed {tuple(tensor.placements)} over a {tensor.device_mesh.ndim}-D mesh. Use fully_shard without "
            "shard_placement_fn and without HSDP."
        )
    n, ranks = tensor.shape[0], tensor.device_mesh.size()
    chunk = math.ceil(n / ranks)
    start = min(tensor.device_mesh.get_local_rank() * chunk, n)
    end = min(start + chunk, n)
    if end - start != tensor.to_local().shape[0]:
        raise RuntimeError(f"Unexpected FSDP2 chunk: rows [{start}, {end}) but the local shard has {tensor.to_local().shape[0]}.")
    return start, end


def own(positions: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of ``positions`` [s] (along a dim-0-chunked tensor) lie in [start, end): (bool [s], offsets [s'])."""
    mine = (positions >= start) & (positions < end)
    return mine, positions[mine] - start
