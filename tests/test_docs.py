"""The front door and the documentation: examples run, the site builds strictly, numbers come from results."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXAMPLES = [
    pytest.param(code, id=f"{page.name}-{index}")
    for page in PAGES
    for index, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S))
]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "docs"))
import headline  # noqa: E402  (benchmarks/headline.py)
import hooks  # noqa: E402  (docs/hooks.py)

# A measured-looking number: two or more decimals, or thousands separators.
NUMBER = re.compile(r"(?<![\w.,])(\d{1,3}(?:,\d{3})+|\d+\.\d{2,})(?![\d.,]\d)")


def test_the_docs_show_the_trainer_the_engine_and_pruning_at_work():
    codes = [example.values[0] for example in EXAMPLES]
    for call in ("SEFTSFTTrainer(", "SparsityEvolution(", "prune(", "perplexity("):
        assert any(call in code for code in codes), call


@pytest.mark.parametrize("code", EXAMPLES)
def test_python_example_runs(code, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # examples write their outputs to the working folder
    exec(compile(code, "documentation example", "exec"), {})
    assert "OVER BUDGET" not in capsys.readouterr().out  # examples that print a sparsity report stay within it


def test_the_readme_is_a_short_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for section in ("## The two commands", "## The swap", "## Results"):
        assert section in text
    assert not re.search(r"\bcommit [0-9a-f]{7}\b|\bat [0-9a-f]{7}\b", text), "no commit hashes in the README"


def test_the_readme_headline_tables_are_the_run_logs():
    text = (ROOT / "README.md").read_text()
    assert len(headline.MARKERS.findall(text)) == 3
    assert headline.updated_readme(text) == text, "run `python benchmarks/headline.py --write`"


def test_the_headline_picks_each_methods_rate_on_validation(tmp_path):
    header = "pattern,method,lr,seed,val_ppl,test_ppl,sparsity,sparsity_kept,trainable,revived,final_loss,train_s\n"
    rows = [
        "unpruned,dense,0,0,10,20,0,False,0,0,nan,0",
        "50%,pruned,0,0,40,50,0.5,True,0,0,nan,0",
        # The long regime's grid for SEFT is 1.5e-3, 3e-3, 6e-3; for SPP 3e-3, 6e-3, 1.2e-2.
        "50%,seft,0.0015,0,31,33,0.5,True,1,0,1,1",
        "50%,seft,0.003,0,30,34,0.5,True,1,0,1,1",  # best validation: its test perplexity is reported
        "50%,seft,0.006,0,32,32,0.5,True,1,0,1,1",
        "50%,seft,0.003,1,30,35,0.5,True,1,0,1,1",
        "70%,seft,0.003,0,60,70,0.7,True,1,0,1,1",
        "70%,seft,0.0015,0,50,50,0.7,True,1,0,1,1",  # not the chosen rate: never reported
        "50%,seft+kd,0.003,0,29,31,0.5,True,1,0,1,1",  # a variant takes its method's rate
        "50%,spp,0.003,0,31,33,0.5,True,1,0,1,1",  # best at the grid's edge: it waits for the extension (2.4e-2)
        "50%,spp,0.006,0,30.5,32,0.5,True,1,0,1,1",
        "50%,spp,0.012,0,30,32,0.5,True,1,0,1,1",
    ]
    (tmp_path / "quality_long_runs.csv").write_text(header + "\n".join(rows) + "\n")
    table = headline.headline_table("long", tmp_path)
    seft = next(line for line in table.splitlines() if line.startswith("| **SEFT** |"))
    assert seft == "| **SEFT** | 34.50 ± 0.50 | pending | 70.00 |"
    assert "| **SEFT + dense parent** (seft_trl's default when the parent is known) | 31.00 | pending | pending |" in table
    assert "| SPP-style low-rank scaling | pending | pending | pending |" in table
    assert "| dense model, before pruning | 20.00 | 20.00 | 20.00 |" in table


def _prose(text: str) -> str:
    """What a reader takes as statements of fact: code, generated tables and link targets removed."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"`[^`]*`", "", text)
    text = headline.MARKERS.sub("", text)
    text = re.sub(r"\(https?://[^)]*\)|\[\d{4}\.\d{5}\]", "", text)  # urls, arXiv ids
    return re.sub(r"^!\w+ .*$", "", text, flags=re.M)  # the site's include directives


def _result_numbers() -> set[str]:
    """Every number of the committed results files, also rounded to 1-3 decimals as the pages quote them."""
    numbers: set[str] = set()
    for path in (ROOT / "benchmarks" / "results").iterdir():
        if path.suffix not in (".md", ".csv", ".json"):
            continue
        text = path.read_text()
        numbers.update(m.group(1).replace(",", "") for m in NUMBER.finditer(text))
        numbers.update(re.findall(r"(?<![\w.])\d{4,}(?![\w.])", text))
        for match in re.finditer(r"(?<![\w.])\d+\.\d+(?:e-?\d+)?", text):
            numbers.update(f"{float(match.group(0)):.{digits}f}" for digits in (1, 2, 3))
    return numbers


def test_every_measured_number_in_the_readme_and_docs_is_in_a_results_file():
    known = _result_numbers()
    missing = [
        f"{page.relative_to(ROOT)}: {match.group(1)}"
        for page in PAGES
        for match in NUMBER.finditer(_prose(page.read_text()))
        if match.group(1).replace(",", "") not in known
    ]
    assert not missing, missing


def test_a_results_table_is_quoted_by_its_heading_and_a_missing_one_fails():
    table = hooks.results_table("quality_long.md", "Learning-rate grid at 50%")
    assert table.startswith("| method |") and "seft" in table
    with pytest.raises(ValueError, match="no heading"):
        hooks.results_table("quality_long.md", "No such heading")
    with pytest.raises(ValueError, match="asked for number 9"):
        hooks.results_table("quality_long.md", "Learning-rate grid at 50%", 9)


def test_the_options_tables_are_the_dataclasses():
    table = hooks.options_table("seft_trl.config.SparsityEvolutionConfig")
    assert "| `density` |" in table and "| `update_interval` | `int` | `20` |" in table


def test_the_site_builds_offline_in_strict_mode(tmp_path):
    # --strict: a broken link or anchor, a page missing from the docs, an unresolved API reference or a
    # results table that is not there fails the build.
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for page in ("index.html", "api/index.html", "benchmarks/index.html", "results/quality_long/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
    assert "<table>" in (tmp_path / "site" / "benchmarks" / "index.html").read_text()
