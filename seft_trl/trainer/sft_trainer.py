"""SEFTSFTTrainer: TRL's SFTTrainer with sparse deltas and topology evolution instead of adapters."""

from __future__ import annotations

import inspect
import os
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard

from torch import nn
from transformers import PreTrainedModel, TrainingArguments
from trl import SFTConfig, SFTTrainer

from ..engine import SparsityEvolution, merged_state_dict
from ..optim_state import check_optimizer_supported
from ..report import SparsityReport, sparsity_report
from ..saving import save_checkpoint
from .callback import SEFTCallback
from .model_card import final_metrics, hub_model_id, seft_model_card
from .sft_config import SEFTConfig


# The learning rates a plain config carries when its user never chose one (TRL's and transformers').
_FULL_FINE_TUNING_RATES = (SFTConfig.learning_rate, TrainingArguments.learning_rate)


def _as_seft_config(args: TrainingArguments | None, model: str | nn.Module) -> SEFTConfig:
    """Accept a SEFTConfig, a plain SFTConfig/TrainingArguments (SEFT defaults added), or None."""
    if isinstance(args, SEFTConfig):
        return args
    if args is None:
        name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model") or "model"
        return SEFTConfig(output_dir=f"{name.rstrip('/').split('/')[-1]}-SEFT")
    values = args.to_dict()
    values.update({name: getattr(args, name) for name in values if name.endswith("_token")})  # to_dict masks them
    if args.learning_rate in _FULL_FINE_TUNING_RATES:
        warnings.warn(
            f"learning_rate={args.learning_rate:g} is a full fine-tuning default of TRL or transformers, at which sparse "
            f"deltas barely move; SEFTConfig defaults to {SEFTConfig.learning_rate:g}. Pass a SEFTConfig, or set learning_rate.",
            stacklevel=3,
        )
    return SEFTConfig(**values)


def _reject_unsupported(args: SEFTConfig) -> None:
    if args.deepspeed or args.fsdp:
        raise ValueError(
            "SEFTSFTTrainer supports one device and DDP (accelerate launch --multi_gpu). DeepSpeed and FSDP shard "
            "weights and optimizer state, which SEFT writes in place slot by slot; remove `deepspeed`/`fsdp`."
        )
    if args.push_to_hub:
        raise ValueError(
            "push_to_hub is not supported yet: it would upload unmerged checkpoints. Call trainer.save_model() "
            "(a merged, plain checkpoint) and upload that folder."
        )
    optimizer_cls, _ = SEFTSFTTrainer.get_optimizer_cls_and_kwargs(args)
    try:
        check_optimizer_supported(optimizer_cls)
    except TypeError as error:
        raise ValueError(f"optim={args.optim!r}: {error}") from None


class SEFTSFTTrainer(SFTTrainer):
    """Drop-in replacement for ``trl.SFTTrainer`` that repairs a pruned model with SEFT.

    Only the deltas train; every ``SFTTrainer`` feature works as before. The model is exactly as
    sparse at the end as at the start (checked at the end of ``train()``), ``save_model()`` writes
    a merged plain checkpoint, and periodic checkpoints keep the SEFT state to resume exactly.
    """

    _tag_names = ["trl", "sft", "seft"]
    _name = "SEFT"

    def __init__(
        self,
        model: str | PreTrainedModel,
        args: SEFTConfig | TrainingArguments | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        *,
        peft_config=None,
        **kwargs: Any,
    ) -> None:
        if peft_config is not None:
            raise ValueError(
                "SEFTSFTTrainer trains sparse deltas in place of adapters; remove `peft_config` (merging LoRA into a "
                "pruned model would densify it)."
            )
        args = _as_seft_config(args, model)
        _reject_unsupported(args)
        engine_config = args.seft_engine_config()
        if train_dataset is not None and hasattr(train_dataset, "__len__") and len(train_dataset) == 0:
            raise ValueError("train_dataset is empty: SEFT needs at least one training example.")
        super().__init__(
            model,
            args,
            data_collator,
            train_dataset,
            eval_dataset,
            processing_class,
            **kwargs,
        )
        self.seft = SparsityEvolution(self.model, engine_config)
        self.seft_callback = SEFTCallback(self.seft)
        self.add_callback(self.seft_callback)

    def create_optimizer(self, model: nn.Module | None = None):
        # transformers does not forward `min_8bit_size` to bitsandbytes; without it, delta tensors
        # under 4096 elements would silently get 32-bit state.
        if self.optimizer is None and self.optimizer_cls_and_kwargs is None:
            optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model or self.model)
            if "min_8bit_size" in inspect.signature(optimizer_cls.__init__).parameters:
                kwargs = {**kwargs, "min_8bit_size": self.args.seft_min_8bit_size}
            self.optimizer_cls_and_kwargs = (optimizer_cls, kwargs)
        return super().create_optimizer(model)

    def train(self, *args: Any, **kwargs: Any):
        output = super().train(*args, **kwargs)
        report = self.seft_callback.final_report
        self.log({"seft/final_sparsity": report.sparsity, "seft/final_nonzeros": float(report.nonzeros)})
        return output

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training:
            logs.update(self.seft_callback.pop_metrics())
        super().log(logs, start_time)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Checkpoints (``_internal_call``) stay unmerged; the final save is a merged plain checkpoint.

        The merged folder loads with ``AutoModelForCausalLM.from_pretrained`` without seft_trl,
        holds exact zeros outside the support, the tokenizer, ``sparsity_report.json`` and a
        ``README.md`` model card, and is written atomically.
        """
        if _internal_call:
            super().save_model(output_dir, _internal_call=True)
            return
        output_dir = output_dir or self.args.output_dir
        state_dict = merged_state_dict(self.model)
        if self.args.should_save:
            report = sparsity_report(self.model)
            files = {"sparsity_report.json": report.as_dict(), "README.md": str(self.seft_model_card(report))}
            model = self.accelerator.unwrap_model(self.model)
            save_checkpoint(model, self.processing_class, output_dir, files, state_dict=state_dict)
        self.accelerator.wait_for_everyone()

    def seft_model_card(
        self, report: SparsityReport | None = None, model_name: str | None = None, dataset_name: str | None = None,
        tags: str | list[str] | None = None,
    ) -> ModelCard:
        """The card of the merged model: base model, pruning, SEFT options, final sparsity, metrics, versions."""
        config = getattr(self.accelerator.unwrap_model(self.model), "config", None)
        args = self.args
        if model_name is None:
            model_name = args.hub_model_id.split("/")[-1] if args.hub_model_id else Path(args.output_dir).name
        training = {
            "learning_rate": args.learning_rate,
            "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
            "optim": str(getattr(args.optim, "value", args.optim)),
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "steps": self.state.global_step,
        }
        return seft_model_card(
            report or sparsity_report(self.model),
            model_name=model_name,
            base_model=hub_model_id(getattr(config, "_name_or_path", None)),
            pruning=getattr(config, "pruning_config", None),
            seft_options=asdict(self.seft.config),
            training=training,
            metrics=final_metrics(self.state.log_history),
            dataset_name=dataset_name,
            tags=[*self._tag_names, *([tags] if isinstance(tags, str) else tags or [])],
        )

    def create_model_card(
        self, model_name: str | None = None, dataset_name: str | None = None, tags: str | list[str] | None = None
    ) -> None:
        """TRL writes a card into ``output_dir`` with every checkpoint; SEFT's says what SEFT did."""
        if self.is_world_process_zero():
            self.seft_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags).save(
                os.path.join(self.args.output_dir, "README.md")
            )
