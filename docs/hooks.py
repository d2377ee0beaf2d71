"""mkdocs hooks: the benchmark results are part of the site, and pages quote their tables, never retype them.

The benchmark scripts write their reports to ``benchmarks/results/`` (markdown, charts, raw csv/json),
outside ``docs/``. ``on_files`` adds every one of them under ``results/`` in the site, so the reports are
pages as they stand and their chart links resolve. ``on_page_markdown`` replaces a line

    !results quality_long.md "With the dense parent" 2

with the second table under that heading of ``benchmarks/results/quality_long.md`` (the first without
a number), and a line

    !options seft_trl.trainer.sft_config.SEFTConfig

with a table of the options that class declares itself (name, type, default, help text), read from the
dataclass, so the documented options are always the code's. A missing file, heading, table or class
fails the build: a page never silently loses a number or an option.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
RESULT_SUFFIXES = (".md", ".png", ".csv", ".json")
DIRECTIVE = re.compile(r'^!results (?P<file>[\w.-]+) "(?P<heading>[^"]+)"(?: (?P<index>\d+))?[ \t]*$', re.M)
OPTIONS = re.compile(r"^!options (?P<path>[\w.]+)[ \t]*$", re.M)


def markdown_tables(text: str, heading: str) -> list[str]:
    """The tables (runs of lines starting with ``|``) in the section of ``text`` under the heading whose
    title starts with ``heading``, up to the next heading of the same or a higher level."""
    lines = text.splitlines()
    for start, line in enumerate(lines):
        match = re.match(r"^(#+)\s+(.*)$", line)
        if match and match.group(2).startswith(heading):
            level = len(match.group(1))
            break
    else:
        raise ValueError(f"no heading starting with {heading!r}")
    tables: list[list[str]] = []
    in_table = False
    for line in lines[start + 1:]:
        match = re.match(r"^(#+)\s", line)
        if match and len(match.group(1)) <= level:
            break
        if line.startswith("|"):
            if not in_table:
                tables.append([])
            tables[-1].append(line)
        in_table = line.startswith("|")
    return ["\n".join(table) for table in tables]


def results_table(file: str, heading: str, index: int = 1) -> str:
    """Table ``index`` (from 1) under ``heading`` in ``benchmarks/results/<file>``."""
    tables = markdown_tables((RESULTS / file).read_text(), heading)
    if not 1 <= index <= len(tables):
        raise ValueError(f"{file}: {len(tables)} table(s) under {heading!r}, asked for number {index}")
    return tables[index - 1]


def options_table(path: str) -> str:
    """The fields that the dataclass at ``path`` (module.Class) declares in its own body, as a markdown table."""
    from seft_trl.apps.noise import silence_import_noise

    silence_import_noise()  # the option classes import transformers: no third-party import notices in the build log
    module, _, name = path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    own = cls.__dict__.get("__annotations__", {})
    rows = ["| option | type | default | what it does |", "|---|---|---|---|"]
    for field in dataclasses.fields(cls):
        if field.name not in own:
            continue
        if field.default is not dataclasses.MISSING:
            default = repr(field.default)
        elif field.default_factory is not dataclasses.MISSING:
            default = repr(field.default_factory())
        else:
            default = "required"
        help_text = " ".join(str(field.metadata.get("help", "")).split()).replace("%%", "%").replace("|", "\\|")
        kind = str(field.type).replace(" | ", " or ")
        rows.append(f"| `{field.name}` | `{kind}` | `{default}` | {help_text} |")
    if len(rows) == 2:
        raise ValueError(f"{path} declares no fields of its own")
    return "\n".join(rows)


def on_files(files: Files, config: MkDocsConfig) -> Files:
    for path in sorted(RESULTS.iterdir()):
        if path.is_file() and path.suffix in RESULT_SUFFIXES:
            files.append(File.generated(config, f"results/{path.name}", abs_src_path=str(path)))
    return files


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    def table(match: re.Match) -> str:
        try:
            return results_table(match["file"], match["heading"], int(match["index"] or 1))
        except (OSError, ValueError) as error:
            raise ValueError(f"{page.file.src_uri}: {match.group(0)!r}: {error}") from error

    def options(match: re.Match) -> str:
        try:
            return options_table(match["path"])
        except (ImportError, AttributeError, TypeError, ValueError) as error:
            raise ValueError(f"{page.file.src_uri}: {match.group(0)!r}: {error}") from error

    return OPTIONS.sub(options, DIRECTIVE.sub(table, markdown))
