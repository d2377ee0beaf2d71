"""The package declares ranges, constraints.txt pins the tested set, and the test run uses that set."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def pins() -> dict[str, Version]:
    found = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, pinned = line.partition("==")
            assert pinned, f"constraints.txt pins exact versions only: {line!r}"
            found[canonical(name)] = Version(pinned)
    return found


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def extras_of(extra: str) -> set[str]:
    """``extra`` and every extra it pulls in through ``seft_trl[...]`` (what `make test` gets from ``dev``)."""
    found, pending = set(), [extra]
    while pending:
        name = pending.pop()
        if name not in found:
            found.add(name)
            pulled = [Requirement(r) for r in project()["optional-dependencies"][name] if r.startswith("seft_trl")]
            pending += [e for requirement in pulled for e in requirement.extras]
    return found


def declared(extras: set[str] | None = None) -> list[Requirement]:
    """The declared requirements: the dependencies and ``extras`` (default: every extra)."""
    table = project()
    requirements = [Requirement(r) for r in table["dependencies"]]
    for name, extra in table["optional-dependencies"].items():
        if extras is None or name in extras:
            requirements += [Requirement(r) for r in extra if not r.startswith("seft_trl")]
    return requirements


def test_dependencies_are_ranges_that_admit_the_pinned_set():
    pinned = pins()
    for requirement in declared():
        specifiers = list(requirement.specifier)
        assert not any(s.operator == "==" for s in specifiers), f"{requirement}: declare a range, pin in constraints.txt"
        assert any(s.operator == "<" for s in specifiers) or requirement.name in ("pytest", "matplotlib"), requirement
        name = canonical(requirement.name)
        assert name in pinned, f"{requirement.name} is declared but not pinned in constraints.txt"
        assert requirement.specifier.contains(pinned[name], prereleases=True), f"{pinned[name]} is outside {requirement}"


def test_this_environment_is_the_pinned_set():
    # make test installs with -c constraints.txt; a plain `pip install -e .` would drift from it.
    pinned = pins()
    for requirement in declared(extras_of("dev")):  # make test installs .[dev]
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        installed = Version(version(requirement.name))
        assert installed.public == pinned[canonical(requirement.name)].public, (requirement.name, installed)
