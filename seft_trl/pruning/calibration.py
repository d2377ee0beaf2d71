"""Calibration data for Wanda and SparseGPT: token windows [nsamples, seqlen] from ids or text.

Text sources (see :mod:`seft_trl.text`: texts, a ``Path`` of a .txt / .jsonl / .json file or of a
folder written by ``datasets.Dataset.save_to_disk``, or a ``datasets.Dataset``) are joined with
blank lines, tokenized once, and cut into ``nsamples`` windows of ``seqlen`` tokens at random
offsets drawn from a seeded generator: the same inputs always give the same windows.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from ..text import TextSource, token_ids

CalibrationSource = torch.Tensor | TextSource


def calibration_windows(
    source: CalibrationSource,
    tokenizer: PreTrainedTokenizerBase | None = None,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    text_field: str = "text",
) -> torch.LongTensor:
    """Token ids [n, seqlen] to calibrate on. A tensor of ids is used as it is (its own n and seqlen)."""
    if isinstance(source, torch.Tensor):
        return _checked_ids(source)
    if tokenizer is None:
        raise ValueError("Calibration text needs a tokenizer: pass tokenizer=AutoTokenizer.from_pretrained(...).")
    ids = token_ids(tokenizer, source, text_field, add_special_tokens=False)
    return random_windows(ids, nsamples, seqlen, seed)


def random_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.LongTensor:
    """``nsamples`` windows of ``seqlen`` consecutive tokens of ``ids`` [T] at seeded random offsets -> [n, seqlen]."""
    if ids.numel() < seqlen:
        raise ValueError(
            f"The calibration text is {ids.numel()} tokens long, shorter than one window of seqlen={seqlen} tokens. "
            "Give more text or a smaller seqlen."
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=generator)  # [n]
    return ids[starts.unsqueeze(1) + torch.arange(seqlen)]  # [n, seqlen]


def _checked_ids(ids: torch.Tensor) -> torch.LongTensor:
    if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.numel() == 0:
        raise ValueError(
            f"Calibration token ids must be a non-empty integer tensor [nsamples, seqlen]; got {ids.dtype} "
            f"of shape {tuple(ids.shape)}."
        )
    return ids.long()
