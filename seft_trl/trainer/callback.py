"""SEFTCallback: drives topology evolution from a transformers Trainer's optimizer steps."""

from __future__ import annotations

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..engine import SparsityEvolution
from ..report import SparsityReport, sparsity_report


class SEFTCallback(TrainerCallback):
    """Keeps a :class:`SparsityEvolution` in step with the Trainer.

    transformers 5 has no ``Trainer.optimizer_step`` to override, so the optimizer-step boundary
    is ``on_optimizer_step``. The engine counts steps from ``state.global_step`` (so resuming
    lands on the same schedule), skips an update when accelerate reports the optimizer step as
    skipped (fp16 overflow), passes fp16's loss scale on so the window statistics are free of it,
    and asks the Trainer to log at each update. Works with a plain
    ``transformers.Trainer`` too; :class:`SEFTSFTTrainer` adds the metrics to its logs.
    """

    def __init__(self, engine: SparsityEvolution) -> None:
        self.engine = engine
        self.pending_metrics: dict[str, float] = {}
        self.final_report: SparsityReport | None = None
        # Open windows to restore at the start of training (a resumed FSDP2 checkpoint keeps them apart).
        self.saved_windows: dict[str, torch.Tensor] | None = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.engine.attach(kwargs["optimizer"], total_steps=state.max_steps, start_step=state.global_step, step_hook=False)
        if self.saved_windows is not None:
            self.engine.load_window_state(self.saved_windows)
            self.saved_windows = None
        self.follow_loss_scale(kwargs["optimizer"])

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        skipped = bool(getattr(kwargs.get("optimizer"), "step_was_skipped", False))
        self.engine.after_optimizer_step(skipped=skipped)
        self.follow_loss_scale(kwargs.get("optimizer"))
        if self.engine.last_update:
            self.pending_metrics = self.update_metrics()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.pending_metrics:
            control.should_log = True

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.engine.detach()
        self.final_report = sparsity_report(self.engine.model)
        if not self.final_report.within_budget:  # must never happen: the engine enforces it at every step
            raise RuntimeError("SEFT sparsity budget violated after training:\n" + self.final_report.table())

    def follow_loss_scale(self, optimizer) -> None:
        """Tell the engine the fp16 loss scale of the coming backward (accelerate's GradScaler, updated at each step)."""
        scaler = getattr(optimizer, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            self.engine.set_loss_scale(float(scaler.get_scale()))

    def pop_metrics(self) -> dict[str, float]:
        metrics, self.pending_metrics = self.pending_metrics, {}
        return metrics

    @torch.no_grad()
    def update_metrics(self) -> dict[str, float]:
        """What the latest update did, summed over layers, and the measured sparsity of the targets."""
        stats = self.engine.last_update.values()
        nonzeros = sum(s.nonzeros for s in stats)  # counted by each layer's update, after its changes
        numel = sum(self.engine.layers[name].weight.numel() for name in self.engine.last_update)  # the updated layers
        return {
            "seft/drop_fraction": self.engine.scheduled_drop_fraction(self.engine.step_count),
            "seft/grown": float(sum(s.grown for s in stats)),
            "seft/revived": float(sum(s.revived for s in stats)),
            "seft/removed": float(sum(s.removed for s in stats)),
            "seft/refused": float(sum(s.refused for s in stats)),
            "seft/sparsity": 1.0 - nonzeros / numel,
            "seft/delta_norm": self.engine.delta_norm,
        }
