"""Text to token ids, one way for every caller: evaluation, calibration, the recipes, the demo, the benchmarks.

A source is texts (a ``str`` is always text, never a path), a file or folder given as a
``pathlib.Path`` (``.txt``: the whole file; ``.jsonl``: one record a line; ``.json``: a list of
records; a folder written by ``datasets.Dataset.save_to_disk``), or a ``datasets.Dataset``.
Texts are joined with a blank line and tokenized once, as the pruning papers measure perplexity
over a concatenated corpus. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import datasets
import torch
from transformers import PreTrainedTokenizerBase

TextSource = str | Sequence[str] | os.PathLike | datasets.Dataset
SEPARATOR = "\n\n"


def read_texts(source: TextSource, text_field: str = "text") -> list[str]:
    """The texts of ``source``; records (``.jsonl``, ``.json``, datasets) give their ``text_field``."""
    if isinstance(source, str):
        if "\n" not in source and len(source) < 4096 and Path(source).is_file():
            # Reading it as text would silently train or measure on a file name.
            raise ValueError(
                f"{source!r} is a str, which is read as text, and it names a file: pass pathlib.Path({source!r}) "
                "to read the file."
            )
        return [source]
    if isinstance(source, datasets.Dataset):
        return _column(source, text_field, "the dataset")
    if isinstance(source, os.PathLike):
        return _file_texts(Path(source), text_field)
    if isinstance(source, Sequence) and all(isinstance(text, str) for text in source):
        if not source:
            raise ValueError("No text: pass a non-empty list of strings.")
        return list(source)
    raise TypeError(
        f"Cannot read text from {type(source).__name__} {_preview(source)}: pass a str (text), a non-empty list of "
        "strings, a pathlib.Path of a .txt/.jsonl/.json file or a saved dataset folder, or a datasets.Dataset."
    )


def token_ids(
    tokenizer: PreTrainedTokenizerBase | None,
    source: TextSource,
    text_field: str = "text",
    add_special_tokens: bool = True,
) -> torch.LongTensor:
    """The texts of ``source`` joined and tokenized once -> ids [T].

    ``add_special_tokens``: the tokenizer's BOS at the start (perplexity scores text as a model
    reads a document); calibration windows cut at random offsets take none.
    """
    texts = read_texts(source, text_field)
    if tokenizer is None:
        raise ValueError("Text needs a tokenizer: pass the model's tokenizer (or token ids instead of text).")
    # verbose=False: the corpus is one long sequence on purpose; do not warn that it exceeds max length.
    encoded = tokenizer(SEPARATOR.join(texts), add_special_tokens=add_special_tokens, verbose=False)
    return torch.tensor(encoded["input_ids"], dtype=torch.long)


def training_chunks(tokenizer: PreTrainedTokenizerBase, source: TextSource, seqlen: int) -> datasets.Dataset:
    """The texts joined and cut into consecutive pieces of ``seqlen`` tokens, as a ``text`` dataset.

    Every token of the corpus is trained on once an epoch (the tail shorter than ``seqlen`` aside),
    with no padding; each piece is decoded back to text because TRL's SFTTrainer tokenizes itself.
    """
    ids = token_ids(tokenizer, source).tolist()
    pieces = [tokenizer.decode(ids[start : start + seqlen]) for start in range(0, len(ids) - seqlen + 1, seqlen)]
    return datasets.Dataset.from_dict({"text": pieces})


def _file_texts(path: Path, text_field: str) -> list[str]:
    if path.is_dir():
        dataset = datasets.load_from_disk(str(path))
        if not isinstance(dataset, datasets.Dataset):
            raise ValueError(f"{path} holds several splits ({', '.join(dataset)}); give the folder of one split.")
        return _column(dataset, text_field, str(path))
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} does not exist. Give a .txt, .jsonl or .json file or a folder saved with datasets' "
            "save_to_disk (a str is read as text, not as a path)."
        )
    if path.suffix in (".jsonl", ".json"):
        return [_record_text(record, text_field, path, number) for number, record in enumerate(json_records(path), 1)]
    return [path.read_text(encoding="utf-8")]


def json_records(path: Path) -> list[dict]:
    """The records of a file holding a JSON list of objects or JSON lines (whatever its extension, as datasets
    reads them); a syntax error names the file and the line, a record that is not an object its number."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text (byte {error.start}): save it as UTF-8 JSON.") from None
    try:
        whole = json.loads(text)
        records = whole if isinstance(whole, list) else [whole]
    except json.JSONDecodeError as error:
        if text.lstrip().startswith("["):  # one JSON list: its own error has the line
            raise ValueError(f"{path}: invalid JSON at line {error.lineno}, column {error.colno} ({error.msg}).") from None
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as bad:
                raise ValueError(f"{path}: line {number} is not valid JSON ({bad.msg} at column {bad.colno}).") from None
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise ValueError(f"{path}: record {number} is a JSON {type(record).__name__}, not an object with fields.")
    return records


def _record_text(record: dict, text_field: str, path: Path, number: int) -> str:
    if not isinstance(record.get(text_field), str):
        raise ValueError(f"{path}: record {number} has no string field {text_field!r}; every record needs one.")
    return record[text_field]


def _column(dataset: datasets.Dataset, text_field: str, where: str) -> list[str]:
    if text_field not in dataset.column_names:
        raise ValueError(
            f"{where} has no column {text_field!r} (columns: {', '.join(dataset.column_names)}); "
            "pass text_field= with the column that holds the text."
        )
    return list(dataset[text_field])


def _preview(source: object) -> str:
    text = repr(source)
    return text if len(text) <= 40 else text[:37] + "..."
