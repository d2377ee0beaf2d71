"""The README's python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

BLOCKS = re.findall(r"```python\n(.*?)```", (Path(__file__).parents[1] / "README.md").read_text(), flags=re.S)


def test_the_readme_has_the_quick_start_and_the_engine_example():
    assert any("SEFTSFTTrainer(" in block for block in BLOCKS)
    assert any("SparsityEvolution(" in block for block in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # examples write their outputs to the working folder
    exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), {})
    out = capsys.readouterr().out
    assert "holds" in out and "OVER BUDGET" not in out  # each example prints a sparsity report
