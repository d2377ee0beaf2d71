"""The dense parent in a training run: found, checked, loaded and placed before the student changes.

The parent (the model before pruning) serves twice: as the distillation teacher, loaded, frozen and
placed like the student (replicated on each rank under DDP, sharded the same way under FSDP2), and
as the source of revived weights' starting values, read from the loaded teacher or, when no loss
needs it loaded, lazily from its safetensors files.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from ..distillation import add_backbone_forward
from ..locations import HUB_ID
from ..parent import DenseParent, ModuleParent, SafetensorsParent


@dataclass
class Teacher:
    """The dense parent of a run: the loaded model (None when no loss needs it) and its folder (None when unknown)."""

    model: nn.Module | None
    folder: Path | None

    def parent(self) -> DenseParent | None:
        """Where revived weights start: the loaded model's weights when they are plain tensors, else its files."""
        if self.model is not None and _plain_weights(self.model):
            return ModuleParent(self.model)
        if self.folder is not None:
            return SafetensorsParent(self.folder)
        if self.model is not None:
            warnings.warn(
                "The teacher's weights are quantized and its folder is unknown, so revived weights start at zero: pass "
                "the teacher as its folder (teacher_model_name_or_path) for them to start at the dense values.",
                stacklevel=3,
            )
        return None


def _plain_weights(model: nn.Module) -> bool:
    """Whether every linear weight is a floating-point tensor (not bitsandbytes' quantized storage)."""
    return all(module.weight.is_floating_point() for module in model.modules() if isinstance(module, nn.Linear))


def teacher_folder(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """The local folder of the parent: itself, or its copy in the hub cache (fetched when online)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if not HUB_ID.fullmatch(str(name_or_path)):
        raise ValueError(
            f"teacher_model_name_or_path={str(name_or_path)!r} does not exist. Give the folder of the dense model this "
            "one was pruned from (seft-trl prune records it in config.json as pruning_config.parent)."
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name_or_path), revision=revision,
                                      allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"]))
    except Exception as error:  # noqa: BLE001 - offline, unknown repo, no access: one message for all
        reason = f"{type(error).__name__}: {error}".splitlines()[0]
        raise ValueError(
            f"teacher_model_name_or_path={str(name_or_path)!r} is not a local folder and could not be fetched from the "
            f"hub ({reason}). Give the folder of the dense model this one was pruned from."
        ) from None


def load_teacher(folder: Path, init_kwargs: dict[str, Any] | None, default_dtype: torch.dtype | str,
                 device: torch.device | str = "cpu") -> nn.Module:
    """The parent as a frozen causal LM in eval mode (``init_kwargs`` as for ``from_pretrained``; dtype default given).

    A ``quantization_config`` given as a dict (YAML, the command line) is bitsandbytes': 8-bit
    (``{"load_in_8bit": true}``) or 4-bit (``{"load_in_4bit": true, "bnb_4bit_quant_type": "nf4"}``)
    weights, quantized as they load onto ``device`` (where the run computes).
    """
    kwargs = dict(init_kwargs or {})
    dtype = kwargs.get("dtype", default_dtype)
    kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    if isinstance(kwargs.get("quantization_config"), dict):
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(**kwargs["quantization_config"])
    if kwargs.get("quantization_config") is not None:
        kwargs.setdefault("device_map", {"": str(device)})
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    return model.requires_grad_(False).eval()


def vocabulary_size(model: nn.Module) -> int:
    return model.get_output_embeddings().weight.shape[0]


def check_vocabulary(teacher: nn.Module | None, student: nn.Module) -> None:
    """Raise unless the teacher predicts over the student's vocabulary."""
    if teacher is not None and vocabulary_size(teacher) != vocabulary_size(student):
        raise ValueError(
            f"The teacher's vocabulary has {vocabulary_size(teacher)} entries, the student's {vocabulary_size(student)}: "
            "distillation compares next-token distributions entry by entry, so the teacher must be the student's dense "
            "parent (same tokenizer and vocabulary)."
        )


def check_tokenizer(folder: Path | None, tokenizer: PreTrainedTokenizerBase | None) -> None:
    """Raise unless the tokenizer saved with the teacher (if any) gives the student's tokenizer's ids."""
    if folder is None or tokenizer is None or not any(folder.glob("tokenizer*")):
        return
    own = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps its tokenizer
    if own.get_vocab() != AutoTokenizer.from_pretrained(folder).get_vocab():
        raise ValueError(
            f"The teacher's tokenizer ({folder}) maps tokens to other ids than the student's: distillation compares "
            "next-token distributions id by id. Use the dense model this one was pruned from, with its tokenizer."
        )


def prepare_teacher(teacher: nn.Module, accelerator, fsdp2: bool) -> nn.Module:
    """Place the frozen teacher as the trainer places the student: sharded under FSDP2, else on each rank's device.

    accelerate prepares a model for evaluation without sharding it; FSDP2 would then hold a whole
    teacher on every rank, so the teacher goes through the same ``fully_shard`` wrapping as the student.
    """
    add_backbone_forward(teacher)
    if fsdp2:
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        teacher = fsdp2_prepare_model(accelerator, teacher)
        # No backward follows the teacher's forward to reshard what accelerate keeps gathered after it (the
        # root and the LM head's group): every group gives its gathered weights back when its forward ends.
        teacher.set_reshard_after_forward(True)
        return teacher
    return accelerator.prepare_model(teacher, evaluation_mode=True)
