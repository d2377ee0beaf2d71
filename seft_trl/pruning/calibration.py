"""Calibration data for Wanda and SparseGPT: token windows [nsamples, seqlen] from ids or text.

Text sources (a list of texts, a local .txt / .jsonl file, a folder written by
``datasets.Dataset.save_to_disk``, or a ``datasets.Dataset``) are joined with blank lines, tokenized
once, and cut into ``nsamples`` windows of ``seqlen`` tokens at random offsets drawn from a seeded
generator: the same inputs always give the same windows. Nothing is ever downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence, Union

import datasets
import torch
from transformers import PreTrainedTokenizerBase

CalibrationSource = Union[torch.Tensor, Sequence[str], str, os.PathLike, datasets.Dataset]


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
    texts = _texts(source, text_field)
    if tokenizer is None:
        raise ValueError("Calibration text needs a tokenizer: pass tokenizer=AutoTokenizer.from_pretrained(...).")
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return random_windows(torch.tensor(ids, dtype=torch.long), nsamples, seqlen, seed)


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


def _texts(source: CalibrationSource, text_field: str) -> list[str]:
    """The texts of a list, a file or folder path, or a dataset."""
    if isinstance(source, datasets.Dataset):
        return _dataset_texts(source, text_field)
    if isinstance(source, (str, os.PathLike)):
        return _file_texts(Path(source), text_field)
    texts = list(source)
    if not texts or not all(isinstance(text, str) for text in texts):
        raise ValueError("Calibration texts must be a non-empty list of strings.")
    return texts


def _file_texts(path: Path, text_field: str) -> list[str]:
    if path.is_dir():
        dataset = datasets.load_from_disk(str(path))
        if not isinstance(dataset, datasets.Dataset):
            raise ValueError(f"{path} holds several splits ({', '.join(dataset)}); give the folder of one split.")
        return _dataset_texts(dataset, text_field)
    if not path.is_file():
        raise ValueError(
            f"Calibration file {str(path)!r} does not exist. Give a .txt or .jsonl file, a folder saved with "
            "datasets' save_to_disk, or pass the texts themselves as a list of strings."
        )
    if path.suffix == ".jsonl":
        lines = path.read_text(encoding="utf-8").splitlines()
        return [_json_text(line, text_field, path) for line in lines if line.strip()]
    return [path.read_text(encoding="utf-8")]


def _json_text(line: str, text_field: str, path: Path) -> str:
    record = json.loads(line)
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        raise ValueError(f"Every line of {path} must be a JSON object with a string field {text_field!r}.")
    return record[text_field]


def _dataset_texts(dataset: datasets.Dataset, text_field: str) -> list[str]:
    if text_field not in dataset.column_names:
        raise ValueError(
            f"The calibration dataset has no column {text_field!r} (columns: {', '.join(dataset.column_names)}); "
            "set text_field."
        )
    return list(dataset[text_field])
