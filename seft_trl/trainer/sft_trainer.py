"""SEFTSFTTrainer: TRL's SFTTrainer with sparse deltas and topology evolution instead of adapters."""

from __future__ import annotations

import inspect
import os
import warnings
from concurrent.futures import Future
from dataclasses import asdict
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, ModelCard
import torch
from torch import nn
from transformers import PreTrainedModel, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, HubStrategy, SaveStrategy
from transformers.utils import strtobool
from transformers.utils.hub import hf_api
from trl import SFTConfig, SFTTrainer

from ..distillation import add_backbone_forward, distillation_loss
from ..engine import SparsityEvolution, merged_state_dict
from ..optim_state import check_optimizer_supported
from ..report import SparsityReport, sparsity_report
from ..saving import published_files, save_checkpoint
from .checkpoints import check_checkpoint, newest_complete_checkpoint
from .callback import SEFTCallback
from .model_card import final_metrics, hub_model_id, seft_model_card
from .sft_config import SEFTConfig
from .teacher import Teacher, check_tokenizer, check_vocabulary, load_teacher, prepare_teacher, teacher_folder


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


def sharding_engine(args: SEFTConfig) -> str | None:
    """'deepspeed', 'fsdp1', 'fsdp2' or None, from the arguments or from ``accelerate launch``'s environment.

    Read before the Trainer builds its accelerator, so that a refusal comes before anything is built.
    """
    if args.deepspeed or strtobool(os.environ.get("ACCELERATE_USE_DEEPSPEED", "false")):
        return "deepspeed"
    if args.fsdp:  # transformers' own FSDP options: version 2 unless fsdp_config says otherwise
        return f"fsdp{int((args.fsdp_config or {}).get('version', 2))}"
    if strtobool(os.environ.get("ACCELERATE_USE_FSDP", "false")):
        return f"fsdp{int(os.environ.get('FSDP_VERSION', '1'))}"  # accelerate's default version is 1
    return None


def _reject_unsupported(args: SEFTConfig) -> None:
    """Raise, before anything is built or created on the hub, on options SEFT cannot honour."""
    engine = sharding_engine(args)
    if engine in ("deepspeed", "fsdp1"):
        raise ValueError(
            f"SEFTSFTTrainer does not support {'DeepSpeed' if engine == 'deepspeed' else 'FSDP version 1'}: it flattens "
            "parameters and shards optimizer state in ways SEFT cannot write slot by slot. To shard a model over "
            "GPUs use FSDP2: `accelerate launch --config_file recipes/accelerate/fsdp2.yaml` (fsdp_version: 2), or "
            "fsdp_config={'version': 2}; DDP (--multi_gpu) when the model fits one GPU."
        )
    if args.push_to_hub and args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
        raise ValueError(
            f"hub_strategy={args.hub_strategy.value!r} uploads the periodic checkpoints, which hold SEFT's unmerged "
            "deltas, buffers and optimizer state; SEFTSFTTrainer pushes only the merged model. Use "
            "hub_strategy='end' (or 'every_save', which acts the same) and keep checkpoints local to resume."
        )
    if args.push_to_hub and args.hub_strategy == HubStrategy.EVERY_SAVE and args.save_strategy != SaveStrategy.NO:
        warnings.warn(
            "push_to_hub: SEFTSFTTrainer uploads only the merged model, from save_model() and push_to_hub(); the "
            "checkpoints saved during training hold SEFT's unmerged state and stay local, so hub_strategy="
            "'every_save' acts as 'end'. Set hub_strategy='end' to silence this warning.",
            stacklevel=3,
        )
    optimizer_cls, _ = SEFTSFTTrainer.get_optimizer_cls_and_kwargs(args)
    try:
        check_optimizer_supported(optimizer_cls)
    except TypeError as error:
        raise ValueError(f"optim={args.optim!r}: {error}") from None
    if engine == "fsdp2" and optimizer_cls.__module__.startswith("bitsandbytes"):
        raise ValueError(
            f"optim={args.optim!r}: bitsandbytes optimizers do not accept the sharded (DTensor) parameters of FSDP2. "
            "For 8-bit optimizer state under FSDP2 use optim='adamw_torch_8bit' (torchao's AdamW8bit, which shards "
            "with FSDP2), or optim='adamw_torch'."
        )


class SEFTSFTTrainer(SFTTrainer):
    """Drop-in replacement for ``trl.SFTTrainer`` that repairs a pruned model with SEFT.

    Only the deltas train; every ``SFTTrainer`` feature works as before. The model is exactly as
    sparse at the end as at the start (checked at the end of ``train()``), ``save_model()`` writes
    a merged plain checkpoint, and periodic checkpoints keep the SEFT state to resume exactly.
    ``push_to_hub`` uploads the merged folder only; checkpoints are never pushed.

    ``teacher_model`` (or ``args.teacher_model_name_or_path``): the dense parent, the model before
    pruning, as a model or a folder. Training then minimises ``(1 - distillation_weight) * CE +
    distillation_weight * divergence`` from the teacher's next-token distribution (plus the optional
    hidden-state term; see :mod:`seft_trl.distillation`), and revived weights start at the parent's
    values (``seft_dense_revival``). Evaluation losses stay plain CE, comparable with any model's.
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
        teacher_model: str | os.PathLike | PreTrainedModel | None = None,
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
        teacher = self._find_teacher(teacher_model, args, model, processing_class)
        super().__init__(
            model,
            args,
            data_collator,
            train_dataset,
            eval_dataset,
            processing_class,
            **kwargs,
        )
        if sharding_engine(args) == "fsdp2" and not self.is_fsdp_enabled:
            warnings.warn(
                "FSDP2 was asked for, but accelerate did not enable it (accelerate runs FSDP only on GPUs and other "
                "accelerators; CPU processes fall back to DDP): every rank holds the whole model.",
                stacklevel=2,
            )
        check_vocabulary(teacher.model, self.model)  # a student given as a path is known only now
        self.seft = SparsityEvolution(self.model, engine_config, parent=teacher.parent())
        self.seft_callback = SEFTCallback(self.seft)
        self.add_callback(self.seft_callback)
        self.distillation = args.distillation_loss()
        self.teacher = None  # the teacher to call (prepared by accelerate); None: the loss is plain CE
        if teacher.model is not None and self.distillation.uses_teacher:
            add_backbone_forward(self.model)
            self._teacher_model = teacher.model
            self.teacher = prepare_teacher(teacher.model, self.accelerator, self.is_fsdp_enabled)

    @staticmethod
    def _find_teacher(teacher_model, args: SEFTConfig, model, processing_class) -> Teacher:
        """The dense parent, checked and (when a loss needs it) loaded before the student changes."""
        source = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
        if source is None:
            return Teacher(None, None)
        if isinstance(source, nn.Module):
            teacher = Teacher(source.requires_grad_(False).eval(), None)
        else:
            folder = teacher_folder(source, getattr(args, "teacher_model_revision", None))
            wanted = args.distillation_loss().uses_teacher
            dtype = model.dtype if isinstance(model, PreTrainedModel) else "auto"
            loaded = load_teacher(folder, args.teacher_model_init_kwargs, dtype, args.device) if wanted else None
            teacher = Teacher(loaded, folder)
        check_tokenizer(teacher.folder, processing_class)
        if isinstance(model, nn.Module):
            check_vocabulary(teacher.model, model)
        return teacher

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """With a teacher, training steps take the distillation loss; evaluation (and no teacher) SFTTrainer's CE."""
        if self.teacher is None or not self.model.training or return_outputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        parts = distillation_loss(
            model, self.teacher, inputs, self.distillation, num_items_in_batch,
            student_head=self.accelerator.unwrap_model(model), teacher_head=self._teacher_model,
        )
        loss = parts.loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as SFTTrainer: DDP averages the ranks' gradients
        gathered = self.accelerator.gather_for_metrics(torch.stack([
            parts.tokens.float(), parts.ce_sum, parts.divergence_sum, parts.hidden_sum, parts.entropy_sum, parts.correct,
        ]).detach().reshape(1, -1)).sum(0)
        tokens = float(gathered[0].clamp(min=1))
        metrics = self._metrics["train"]
        for name, value in zip(("distill/ce", "distill/divergence", "distill/hidden", "entropy", "mean_token_accuracy"),
                               gathered[1:]):
            metrics[name].append(float(value) / tokens)
        # SFTTrainer's running count of the tokens trained on, as its own loss path keeps it
        counted = inputs["attention_mask"].sum() if "attention_mask" in inputs else torch.tensor(inputs["position_ids"].size(1))
        self._total_train_tokens += int(self.accelerator.gather_for_metrics(counted.to(loss.device)).sum()) // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        return loss

    def create_optimizer(self, model: nn.Module | None = None):
        # transformers does not forward `min_8bit_size` to bitsandbytes; without it, delta tensors
        # under 4096 elements would silently get 32-bit state.
        if self.optimizer is None and self.optimizer_cls_and_kwargs is None:
            optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model or self.model)
            if "min_8bit_size" in inspect.signature(optimizer_cls.__init__).parameters:
                kwargs = {**kwargs, "min_8bit_size": self.args.seft_min_8bit_size}
            self.optimizer_cls_and_kwargs = (optimizer_cls, kwargs)
        return super().create_optimizer(model)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        if resume_from_checkpoint is True:  # as transformers resolves it, passing over interrupted saves
            resume_from_checkpoint = newest_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No complete checkpoint found in output directory ({self.args.output_dir}) to "
                                 "resume from: start without resume_from_checkpoint.")
        if resume_from_checkpoint:
            check_checkpoint(resume_from_checkpoint)
        self.seft_callback.saved_windows = self._saved_windows(resume_from_checkpoint)
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        report = self.seft_callback.final_report
        self.log({"seft/final_sparsity": report.sparsity, "seft/final_nonzeros": float(report.nonzeros)})
        return output

    # Under FSDP2 the open accumulation windows cannot travel in the sharded model checkpoint
    # (SparseDeltaLinear's checkpoint notes), so each checkpoint gets them in a file of their own.
    WINDOW_FILE = "seft_window.pt"

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        if self.is_fsdp_enabled:
            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            windows = self.seft.window_state()  # the same on every rank
            if self.args.should_save:
                folder.mkdir(parents=True, exist_ok=True)
                partial = folder / (self.WINDOW_FILE + ".tmp")
                torch.save(windows, partial)
                os.replace(partial, folder / self.WINDOW_FILE)
        super()._save_checkpoint(model, trial)

    def _saved_windows(self, checkpoint: str | None) -> dict[str, torch.Tensor] | None:
        """The windows a sharded checkpoint keeps beside the model (None: unsharded, they are in the model's state)."""
        if checkpoint is None or not self.is_fsdp_enabled:
            return None
        path = Path(checkpoint) / self.WINDOW_FILE
        if not path.is_file():
            raise ValueError(
                f"{checkpoint} has no {self.WINDOW_FILE}: it was not written by SEFTSFTTrainer under FSDP2, which "
                "keeps SEFT's open topology window there. Resume it under the launch that wrote it."
            )
        return torch.load(path, map_location="cpu", weights_only=True)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training:
            logs.update(self.seft_callback.pop_metrics())
        super().log(logs, start_time)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Checkpoints (``_internal_call``) stay unmerged; the final save is a merged plain checkpoint.

        The merged folder loads with ``AutoModelForCausalLM.from_pretrained`` without seft_trl,
        holds exact zeros outside the support, the tokenizer, ``sparsity_report.json`` and a
        ``README.md`` model card, and is written atomically. With ``args.push_to_hub`` (as in
        transformers) it is then uploaded, and only the files this save wrote: see ``push_to_hub``.
        """
        if _internal_call:
            super().save_model(output_dir, _internal_call=True)
            return
        output_dir = output_dir or self.args.output_dir
        written = self._save_merged(output_dir)
        if self.args.push_to_hub:
            self._upload_merged(output_dir, written, "Model save", self.args.hub_revision)

    def _save_merged(self, output_dir: str | os.PathLike, **card_kwargs: Any) -> list[str]:
        """Write the merged folder (on every process, as saves are collective); return the files written.

        The file list lets an upload take exactly this save: ``output_dir`` is usually the trainer's
        output folder, which also holds the unmerged ``checkpoint-*`` folders, logs and older files.
        """
        state_dict = merged_state_dict(self.model, keep=self.args.should_save)
        report = sparsity_report(self.model)  # on every process: under FSDP2 it gathers each layer
        written: list[str] = []
        if self.args.should_save:
            card = self.seft_model_card(report, **card_kwargs)
            files = {"sparsity_report.json": report.as_dict(), "README.md": str(card)}
            model = self.accelerator.unwrap_model(self.model)
            save_checkpoint(model, self.processing_class, output_dir, files, state_dict=state_dict)
            written = published_files(output_dir)
        self.accelerator.wait_for_everyone()
        return written

    def _upload_merged(
        self, folder: str | os.PathLike, files: list[str], commit_message: str | None, revision: str | None,
        token: str | None = None, blocking: bool = True,
    ) -> CommitInfo | Future[CommitInfo] | None:
        """Upload only ``files`` of ``folder`` (``allow_patterns``) to ``self.hub_model_id``, from process 0."""
        if not self.is_world_process_zero():
            return None
        self._finish_current_push()
        return hf_api().upload_folder(
            repo_id=self.hub_model_id,
            folder_path=folder,
            commit_message=commit_message,
            token=token if token is not None else self.args.hub_token,
            run_as_future=not blocking,
            allow_patterns=files,
            revision=revision if revision is not None else self.args.hub_revision,
        )

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs: Any,
    ) -> CommitInfo | Future[CommitInfo] | None:
        """Save the merged model into ``args.output_dir`` and upload exactly the files that save wrote.

        What is pushed: config, weights with exact zeros, tokenizer, SEFT's ``README.md`` card (with
        ``kwargs``: ``model_name``, ``dataset_name``, ``tags``) and ``sparsity_report.json``. Not
        pushed: the ``checkpoint-*`` folders (SEFT's deltas, positions and optimizer state, useful only
        to resume), logs, ``training_args.bin``, or any other file in ``output_dir``. transformers'
        version would save the unmerged model there (SEFT's deltas and buffers included) and upload
        the whole folder. Returns the commit (a ``Future`` if not ``blocking``), ``None`` off process 0.
        """
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        if self.hub_model_id is None:
            self.init_hf_repo(token=token if token is not None else self.args.hub_token, private=private)
        tags = kwargs.pop("tags", None)
        tags = [*([tags] if isinstance(tags, str) else tags or []), *(getattr(self.model, "model_tags", None) or [])]
        written = self._save_merged(self.args.output_dir, tags=tags, **kwargs)
        return self._upload_merged(self.args.output_dir, written, commit_message, revision, token, blocking)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Never push periodic checkpoints (transformers does with ``push_to_hub``, at every save).

        transformers would copy the checkpoint's weights (unmerged: they carry SEFT's deltas and
        buffers) into ``output_dir`` and upload it, and with ``hub_strategy`` "checkpoint" /
        "all_checkpoints" (refused at construction) the checkpoint folder itself, optimizer included.
        Checkpoints stay local for resuming; the merged model goes up from ``push_to_hub``/``save_model``.
        """

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
        """TRL writes a card into ``output_dir`` with every checkpoint; SEFT's says what SEFT did.

        Called on every process (TRL does): under FSDP2 the card's sparsity report gathers each layer.
        """
        report = sparsity_report(self.model)
        if self.is_world_process_zero():
            self.seft_model_card(report, model_name=model_name, dataset_name=dataset_name, tags=tags).save(
                os.path.join(self.args.output_dir, "README.md")
            )
