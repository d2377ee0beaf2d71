"""Shared fixtures: tiny random LLaMA / Mistral models built from configs (no downloads) and pruning helpers."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

VOCAB = 96


def tiny_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, vocab_size: int = VOCAB) -> nn.Module:
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = MistralForCausalLM(MistralConfig(sliding_window=64, **common))
    return model.to(dtype).eval()


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


def byte_tokenizer():
    """A byte-level tokenizer built in memory (no download) with a small chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = (
        "{% for message in messages %}<s>{{ message['role'] }}: {{ message['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant: {% endif %}"
    )
    return tokenizer


TOKENIZER_VOCAB = 3 + 256


@pytest.fixture
def pruned_llama() -> nn.Module:
    return prune_linears(tiny_model("llama"))
