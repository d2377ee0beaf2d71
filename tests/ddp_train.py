"""Trains a tiny pruned model with SEFTSFTTrainer and saves each rank's SEFT state.

Run by tests/test_ddp.py, once as 2 CPU processes under `accelerate launch` and once alone.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from seft_trl import SEFTConfig, SEFTSFTTrainer  # noqa: E402
from trainer_helpers import byte_tokenizer, pruned_model, seft_args, text_dataset  # noqa: E402


def main(output_dir: str, per_device_batch: int) -> None:
    args = SEFTConfig(**seft_args(output_dir, per_device_train_batch_size=per_device_batch, seft_accumulation_steps=2))
    trainer = SEFTSFTTrainer(model=pruned_model(), args=args, train_dataset=text_dataset(), processing_class=byte_tokenizer())
    trainer.train()
    rank = trainer.args.process_index
    state = {name: (layer.delta_index, layer.delta.detach(), layer.weight.detach()) for name, layer in trainer.seft.layers.items()}
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    revived = sum(entry.get("seft/revived", 0) for entry in trainer.state.log_history)
    reduced = all(layer.stats_all_reduce is not None for layer in trainer.seft.layers.values())
    record = {"state": state, "losses": losses, "revived": revived, "world_size": args.world_size, "reduced": reduced}
    torch.save(record, Path(output_dir) / f"rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
