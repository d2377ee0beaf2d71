"""Tiny random models and an in-memory tokenizer, for examples and tests that must run offline.

Nothing here downloads: models are built from configs with random weights, and the tokenizer is
a byte-level BPE without merges built in memory.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

BYTE_VOCAB_SIZE = 3 + 256  # <pad>, <s>, </s> and the 256 byte symbols


def tiny_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, vocab_size: int = BYTE_VOCAB_SIZE) -> nn.Module:
    """A 2-layer LLaMA or Mistral (hidden 64, MLP 128, grouped-query attention) with random weights."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=64, **common))
    else:
        raise ValueError(f"Unknown tiny architecture {arch!r}: use 'llama' or 'mistral'.")
    return model.to(dtype).eval()


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with a small chat template (matches ``tiny_model``'s default vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

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
