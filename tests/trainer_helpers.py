"""Shared pieces of the trainer tests (also used by the 2-process DDP script)."""

from __future__ import annotations

import torch
from datasets import Dataset

from conftest import prune_linears
from seft_trl.testing import byte_tokenizer, tiny_model


def text_dataset(n: int = 48) -> Dataset:
    return Dataset.from_list([{"text": f"Item {i} comes before item {i + 1}, and {i + 2} after it."} for i in range(n)])


def pruned_model(arch: str = "llama", pattern: str = "layer"):
    return prune_linears(tiny_model(arch), pattern)


def seft_args(output_dir, **overrides) -> dict:
    """Fast SEFTConfig keyword arguments for the trainer tests (on the GPU when there is one: make gpu-check)."""
    args = dict(
        output_dir=str(output_dir),
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        max_length=48,
        seed=0,
        seft_density=0.05,
        seft_update_interval=2,
        seft_accumulation_steps=1,
        seft_update_end=1.0,
        dataloader_num_workers=0,
    )
    args.update(overrides)
    return args


__all__ = ["byte_tokenizer", "pruned_model", "seft_args", "text_dataset"]
