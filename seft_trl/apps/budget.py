"""``seft-trl memory``: what each repair method needs to train a model, and the SEFT density a GPU fits.

Reads only the model's ``config.json`` (a local folder, or a hub name when online) and projects a
training step with :mod:`seft_trl.memory`: no weight is loaded, so it answers for a 70B model on a laptop.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..memory import Method, ModelShape, Workload, largest_density, per_device_bytes, training_memory
from ..patterns import SparsityPattern
from .options import option

GB = 1e9
# The optimizers' names in TRL / transformers, by the state they keep.
OPTIMIZERS = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_8bit": "adamw_8bit",
              "adamw_bnb_8bit": "adamw_8bit", "paged_adamw_8bit": "adamw_8bit", "adamw_torch_8bit": "adamw_8bit"}


@dataclass
class MemoryArguments:
    """The model, the GPU and the training workload to project (seft-trl memory)."""

    model_name_or_path: str | None = option(None, "A local model folder or a hub name: only its config.json is read.")
    gpu_memory_gb: float = option(24.0, "Memory of one GPU, in GB (1e9 bytes).")
    num_gpus: int = option(1, "GPUs to shard over with FSDP2 (weights and training state divide; activations do not).")
    optim: str = option("adamw_8bit", f"The optimizer: {', '.join(OPTIMIZERS)}.")
    per_device_train_batch_size: int = option(4, "Sequences per GPU and step.")
    max_length: int = option(2048, "Tokens per sequence.")
    gradient_checkpointing: bool = option(True, "Recompute each decoder layer's activations in the backward.")
    sparsity: float = option(0.5, "The pruned model's sparsity: the most deltas a layer can hold is its nonzeros.")
    sparsity_pattern: str = option("unstructured", "The pruned model's pattern, 'unstructured' or 'N:M' (e.g. 2:4): in "
                                                   "N:M models SEFT grows inside the pattern by default, so its windows "
                                                   "hold no removal candidates.")
    seft_window_groups: int = option(1, "SEFT's seft_window_groups: groups of layers taking turns at updates, so "
                                        "that 1/groups of them hold an accumulation window at a time.")

    def __post_init__(self) -> None:
        if self.optim not in OPTIMIZERS:
            raise ValueError(f"optim={self.optim!r}: seft-trl memory knows {', '.join(OPTIMIZERS)}.")
        if self.gpu_memory_gb <= 0 or self.num_gpus < 1 or self.per_device_train_batch_size < 1 or self.max_length < 1:
            raise ValueError("gpu_memory_gb, num_gpus, per_device_train_batch_size and max_length must be positive.")
        if self.seft_window_groups < 1:
            raise ValueError(f"seft_window_groups={self.seft_window_groups}: give at least 1 (every layer at once).")
        if not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity={self.sparsity}: give the pruned fraction, in [0, 1).")
        SparsityPattern.parse(self.sparsity_pattern)  # raises with the accepted forms

    @property
    def revives(self) -> bool:
        """Whether SEFT revives pruned weights in this model at its defaults (unstructured models only)."""
        return not SparsityPattern.parse(self.sparsity_pattern).is_nm


MEMORY_ARGUMENTS = (MemoryArguments,)
# The budgets the table shows: sparse deltas at densities, the LoRA family at ranks, masked full fine-tuning.
TABLE = (*(Method("seft", density=d) for d in (0.003, 0.01, 0.025, 0.05, 0.1)),
         *(Method(kind, rank=r) for kind in ("masked_lora", "spp") for r in (8, 64)), Method("masked_full"))


def memory_table(shape: ModelShape, args: MemoryArguments) -> tuple[list[list[str]], float | None]:
    """Rows (method, trainable, per-GPU step GB, fits) and the largest SEFT density that fits."""
    work = Workload(batch=args.per_device_train_batch_size, seqlen=args.max_length,
                    gradient_checkpointing=args.gradient_checkpointing)
    optimizer = OPTIMIZERS[args.optim]
    rows = []
    for method in TABLE:
        if method.kind == "masked_full":
            method = Method("masked_full", sparsity=args.sparsity)
        elif method.kind == "seft":
            method = Method("seft", density=method.density, window_groups=args.seft_window_groups,
                            regrow_pruned=args.revives)
        estimate = training_memory(shape, method, work, optimizer)
        step = per_device_bytes(estimate, args.num_gpus)
        rows.append([method.label, f"{estimate.trainable / 1e6:,.1f} M",
                     f"{step / GB:.1f}", "yes" if step <= args.gpu_memory_gb * GB else "no"])
    density = largest_density(shape, args.gpu_memory_gb * GB, work, optimizer, args.num_gpus,
                              window_groups=args.seft_window_groups, regrow_pruned=args.revives)
    return rows, None if density is None else min(density, 1 - args.sparsity)


def memory_command(args: MemoryArguments) -> dict:
    """Print the projection for the model and the GPU, and return it."""
    from transformers import AutoConfig

    if not args.model_name_or_path:
        raise ValueError("memory needs --model_name_or_path: a model folder or hub name (only config.json is read).")
    shape = ModelShape.from_config(AutoConfig.from_pretrained(args.model_name_or_path))
    rows, density = memory_table(shape, args)
    width = [max(len(row[i]) for row in [["method", "trainable", "GB per GPU", "fits"], *rows]) for i in range(4)]
    lines = [f"{args.model_name_or_path}: {shape.parameters / 1e9:.2f} B parameters; bf16 weights, {args.optim}, "
             f"{args.per_device_train_batch_size} x {args.max_length} tokens per GPU, gradient checkpointing "
             f"{'on' if args.gradient_checkpointing else 'off'}, {args.num_gpus} GPU(s) of {args.gpu_memory_gb:g} GB "
             "(projected by seft_trl.memory, not measured)"]
    for row in [["method", "trainable", "GB per GPU", "fits"], *rows]:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, width)).rstrip())
    lines.append(f"largest seft_density that fits: {density:g}" if density is not None
                 else "no SEFT density fits: the weights, activations and logits alone exceed the GPU; "
                      "add GPUs, shorten max_length or lower the batch")
    print("\n".join(lines))
    return {"rows": rows, "largest_density": density}
