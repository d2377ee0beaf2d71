"""Trains a tiny pruned model with SEFTSFTTrainer and saves each rank's SEFT state.

Run by tests/test_ddp.py as 2 CPU processes under `accelerate launch` (DDP or FSDP2) and alone:
``ddp_train.py OUTPUT_DIR PER_DEVICE_BATCH [SEFTConfig field=JSON value ...]``; four more keys: ``stop_at`` (stop
after that step, as an interrupted run would), ``resume`` (a checkpoint to resume from), ``final_dir`` (where
``save_model`` writes the merged model) and ``teacher`` (true: distil from the dense parent, revive at its values).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).parent))

from seft_trl import SEFTConfig, SEFTSFTTrainer  # noqa: E402
from seft_trl.sharding import is_sharded, whole  # noqa: E402
from seft_trl.testing import tiny_model  # noqa: E402
from trainer_helpers import byte_tokenizer, pruned_model, seft_args, text_dataset  # noqa: E402


class StepRecord(TrainerCallback):
    """Per optimizer step: sampling patterns built, whether the step changed the topology, budget violations
    (layers' groups over budget: the whole layer is checked, gathered under FSDP2) and whether weights are sharded."""

    def __init__(self, trainer: SEFTSFTTrainer) -> None:
        self.trainer, self.steps, self.violations, self.sharded = trainer, [], [], []

    def on_step_end(self, args, state, control, **kwargs):
        layers = self.trainer.seft.layers.values()
        self.steps.append((sum(layer.pattern_builds for layer in layers), bool(self.trainer.seft.last_update)))
        self.violations.append(sum(layer.budget_violations() for layer in layers))
        self.sharded.append(all(is_sharded(layer.weight) and is_sharded(layer.delta) for layer in layers))


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step


def main(output_dir: str, per_device_batch: int, overrides: dict) -> None:
    stop_at, resume, final_dir, teacher = (overrides.pop(key, None) for key in ("stop_at", "resume", "final_dir", "teacher"))
    options = {"per_device_train_batch_size": per_device_batch, "seft_accumulation_steps": 2, **overrides}
    args = SEFTConfig(**seft_args(output_dir, **options))
    parent = tiny_model() if teacher else None  # the model pruned_model() prunes
    trainer = SEFTSFTTrainer(model=pruned_model(), args=args, train_dataset=text_dataset(), processing_class=byte_tokenizer(),
                             teacher_model=parent)
    steps = StepRecord(trainer)
    trainer.add_callback(steps)
    if stop_at is not None:
        trainer.add_callback(StopAt(stop_at))
    trainer.train(resume_from_checkpoint=resume)
    if final_dir is not None:
        trainer.save_model(final_dir)
    rank = trainer.args.process_index
    # Whole tensors (gathered from every rank under FSDP2, where each holds a chunk).
    state = {name: (layer.delta_index, whole(layer.delta.detach()), whole(layer.weight.detach()))
             for name, layer in trainer.seft.layers.items()}
    losses = {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}
    revived = sum(entry.get("seft/revived", 0) for entry in trainer.state.log_history)
    reduced = all(layer.stats_all_reduce is not None for layer in trainer.seft.layers.values())
    # The buffers DDP broadcasts from rank 0 before every forward (broadcast_buffers=True).
    synced = {id(buffer) for buffer in getattr(trainer.model_wrapped, "modules_buffers", [])}
    seft_buffers = [buffer for layer in trainer.seft.layers.values() for buffer in layer.buffers(recurse=False)]
    record = {"state": state, "losses": losses, "revived": revived, "world_size": args.world_size, "reduced": reduced,
              "pattern_builds": steps.steps, "violations": steps.violations, "sharded": steps.sharded, "broadcast_buffers": len(synced),
              "broadcast_seft_buffers": sum(id(buffer) in synced for buffer in seft_buffers)}
    if parent is not None:  # the teacher as each rank holds it, and whole: it must be the parent, untouched
        record["teacher_sharded"] = all(is_sharded(p) for p in parent.parameters())
        record["teacher"] = {name: whole(p.detach()) for name, p in parent.named_parameters()}
        record["divergence"] = [entry["distill/divergence"] for entry in trainer.state.log_history
                                if "distill/divergence" in entry]
    torch.save(record, Path(output_dir) / f"rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), {key: json.loads(value) for key, value in (a.split("=", 1) for a in sys.argv[3:])})
