"""Loads a task's docs from a jsonl file beside this one, for the offline lm-eval tasks of tests/test_evaluation.py.

A YAML's ``data_files`` would be resolved against the working directory; a loader that reads relative to its
own file works wherever pytest runs, and keeps the docs in memory (no datasets cache, no Hub).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets


def load_jsonl(file: str, **metadata: Any) -> datasets.DatasetDict:
    """The docs of ``file`` as the task's ``test`` split (lm-eval passes the task metadata too; unused)."""
    lines = (Path(__file__).parent / file).read_text(encoding="utf-8").splitlines()
    docs = [json.loads(line) for line in lines if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})
