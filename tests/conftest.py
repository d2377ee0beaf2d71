"""Shared fixtures: tiny random LLaMA / Mistral models built from configs (no downloads) and pruning helpers."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest
import torch
from torch import nn

from seft_trl.testing import tiny_model

VOCAB = 96  # token ids of the random batches: below every tiny model's vocabulary


@torch.no_grad()
def prune_linears(model: nn.Module, pattern: str = "layer", sparsity: float = 0.5) -> nn.Module:
    """Magnitude-prune every decoder linear: per layer, per row, or 2:4 (a test helper, not seft_trl.pruning)."""
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name.endswith("lm_head"):
            continue
        w = module.weight
        if pattern == "2:4":
            groups = w.view(w.shape[0], -1, 4)
            drop = groups.abs().argsort(dim=-1)[..., :2]
            groups.scatter_(-1, drop, 0.0)
        elif pattern == "row":
            k = int(w.shape[1] * sparsity)
            drop = w.abs().argsort(dim=1)[:, :k]
            w.scatter_(1, drop, 0.0)
        else:
            k = int(w.numel() * sparsity)
            w.view(-1)[w.abs().view(-1).argsort()[:k]] = 0.0
    return model


def random_batch(batch: int = 4, seqlen: int = 24, seed: int | None = None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.randint(0, VOCAB, (batch, seqlen), generator=generator)



@pytest.fixture
def pruned_llama() -> nn.Module:
    return prune_linears(tiny_model("llama"))
