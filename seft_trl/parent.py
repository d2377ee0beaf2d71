"""The dense parent's weights, read only where SEFT revives a pruned weight.

A revival that starts at the parent's value (``dense_revival``) needs the dense weight at a few
thousand positions of a layer per update, never a copy of the model: :class:`ModuleParent` reads
them from a loaded model (the distillation teacher, often already on the accelerator), and
:class:`SafetensorsParent` from the parent's checkpoint files, one layer at a time on the CPU.
Layers are named as in the student (``model.layers.0.self_attn.q_proj``); the weight is the
``<name>.weight`` entry.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from .sharding import whole


class DenseParent(Protocol):
    """Where a revived weight's starting value comes from."""

    def shape(self, name: str) -> tuple[int, ...] | None:
        """The shape of layer ``name``'s weight, None when the parent has no such layer."""

    def values(self, name: str, flat_index: torch.Tensor) -> torch.Tensor:
        """The dense weight of layer ``name`` at flat positions [c] -> [c] (the parent's dtype, on its device)."""


class ModuleParent:
    """Dense values from a loaded model: the distillation teacher, or any module with the same layers.

    Under FSDP2 the teacher's weight is gathered for the read (a collective, one layer at a time:
    every rank reads the same layers in the same order, as topology updates do).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def _weight(self, name: str) -> torch.Tensor | None:
        try:
            weight = getattr(self.model.get_submodule(name), "weight", None)
        except AttributeError:
            return None
        return weight if isinstance(weight, torch.Tensor) and weight.is_floating_point() else None

    def shape(self, name: str) -> tuple[int, ...] | None:
        weight = self._weight(name)
        return None if weight is None else tuple(weight.shape)

    def values(self, name: str, flat_index: torch.Tensor) -> torch.Tensor:
        weight = whole(self._weight(name).detach())
        return weight.reshape(-1)[flat_index.to(weight.device, torch.long)]


class SafetensorsParent:
    """Dense values from a checkpoint folder's safetensors files (one file or an index of shards).

    A read loads the one layer's tensor on the CPU, takes the positions and drops the rest; the
    operating system's page cache keeps later reads of the same file cheap.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            self.files = {key: self.folder / file for key, file in json.loads(index.read_text())["weight_map"].items()}
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                raise ValueError(
                    f"{self.folder} holds no .safetensors weights: dense-value revival reads the parent's weights "
                    "from them. Give the folder of the dense model (saved with save_pretrained)."
                )
            self.files = {}
            for file in files:
                self.files.update(dict.fromkeys(_keys(file), file))

    def shape(self, name: str) -> tuple[int, ...] | None:
        file = self.files.get(f"{name}.weight")
        if file is None:
            return None
        from safetensors import safe_open

        with safe_open(file, framework="pt") as handle:
            return tuple(handle.get_slice(f"{name}.weight").get_shape())

    def values(self, name: str, flat_index: torch.Tensor) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.files[f"{name}.weight"], framework="pt") as handle:
            weight = handle.get_tensor(f"{name}.weight")
        return weight.reshape(-1)[flat_index.cpu().long()]


def _keys(file: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(file, framework="pt") as handle:
        return list(handle.keys())


def dense_parent(source: nn.Module | str | os.PathLike) -> DenseParent:
    """A module's weights, or a local checkpoint folder's files (it must exist)."""
    if isinstance(source, nn.Module):
        return ModuleParent(source)
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise ValueError(
            f"The dense parent {str(source)!r} is not a local folder: give the folder of the model before pruning "
            "(dense-value revival reads its weights), or load it and pass the model."
        )
    return SafetensorsParent(folder)


def check_parent_layers(parent: DenseParent, weights: dict[str, torch.Tensor]) -> None:
    """Raise unless ``parent`` has every layer of ``weights`` (name -> student weight) with the same shape."""
    wrong = []
    for name, weight in weights.items():
        shape = parent.shape(name)
        if shape != tuple(weight.shape):
            wrong.append(f"{name} ({'missing' if shape is None else 'x'.join(map(str, shape))} in the parent, "
                         f"{'x'.join(map(str, weight.shape))} here)")
    if wrong:
        raise ValueError(
            f"The dense parent does not match the model's layers: {'; '.join(wrong[:3])}{'; ...' if len(wrong) > 3 else ''}. "
            "Dense-value revival starts each revived weight at the parent's value, so the parent must be the model "
            "this one was pruned from; set dense_revival=False to revive at zero instead."
        )
