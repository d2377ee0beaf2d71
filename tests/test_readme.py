"""The README's engine example runs as written."""

from __future__ import annotations

import re
from pathlib import Path


def test_readme_engine_example_runs(capsys):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "the README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "revived" in out and "pattern unstructured: holds" in out
    assert type(namespace["model"].model.layers[0].mlp.up_proj).__name__ == "Linear"
