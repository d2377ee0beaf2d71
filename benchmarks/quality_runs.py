"""The quality benchmark's run log: one CSV row per finished run, read back to resume and to report.

Each regime keeps its own file. Columns added after a file was first written (``wall_s``,
``nonzero_growth``) read back with their defaults, and the first row appended with the new code
rewrites the file under the new header, so one file never mixes two headers. A run in progress
is checkpointed beside the log (:class:`RunCheckpoint`), so a killed or paused run resumes; a
pattern's pruned weights are kept there too (:class:`PrunedCache`). That folder is not committed: a
run that should survive the end of a session must finish within it (``--stop-after`` starts no run
that its method's median logged wall time would not finish). Two benchmark processes may share one log:
a run is claimed before it starts (:class:`RunClaim`), and the other process skips it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

RunKey = tuple[str, str, float, int]  # (pattern, method, lr, seed)


class Pending(Exception):
    """A result that is neither in the run log nor allowed to be run now (``--report-only``, ``--methods``)."""

    def __init__(self, key: RunKey) -> None:
        pattern, method, lr, seed = key
        super().__init__(f"{method} at {pattern} (lr {lr:g}, seed {seed})")
        self.key = key


@dataclass
class RunResult:
    """One row of the run log."""

    pattern: str
    method: str
    lr: float
    seed: int
    val_ppl: float
    test_ppl: float
    sparsity: float
    sparsity_kept: bool
    trainable: int
    revived: int
    final_loss: float
    train_s: float
    wall_s: float = math.nan  # the whole run: adapter, training, merge, evaluation
    # SEFT-engine methods: max over steps and layers of (nonzeros - nonzeros after pruning); <= 0 when kept.
    nonzero_growth: int | None = None
    # SEFT-engine methods: deltas moved over the run, and ranked swaps the swap test turned down.
    swapped: int | None = None
    refused: int | None = None
    # SEFT-engine methods: the engine options the run used (quality_plan.options_record); empty in rows
    # logged before they were recorded.
    options: str | None = None
    # Perplexities of the workload's extra held-out texts, as JSON {name: ppl}; empty where none were measured.
    evals: str | None = None
    # Peak resident memory of the benchmark process over the run (teacher included), in MiB.
    peak_rss_mb: float = math.nan

    @property
    def key(self) -> RunKey:
        return (self.pattern, self.method, self.lr, self.seed)

    def extra_ppl(self, name: str) -> float | None:
        """The perplexity of the extra held-out text ``name``; None where it was not measured."""
        return json.loads(self.evals).get(name) if self.evals else None


def _parse(row: dict[str, str | None]) -> RunResult:
    """A CSV row as a RunResult; a missing or empty cell takes the field's default."""
    values = {}
    for field in fields(RunResult):
        text = row.get(field.name)
        if text is None or text == "":
            continue
        if field.name == "sparsity_kept":
            values[field.name] = text == "True"
        elif field.name in ("seed", "trainable", "revived", "nonzero_growth", "swapped", "refused"):
            values[field.name] = int(text)
        elif field.name in ("pattern", "method", "options", "evals"):
            values[field.name] = text
        else:
            values[field.name] = float(text)
    return RunResult(**values)


def read_runs(path: Path) -> dict[RunKey, RunResult]:
    if not path.exists():
        return {}
    with path.open() as handle:
        runs = [_parse(row) for row in csv.DictReader(handle)]
    return {run.key: run for run in runs}


def append_run(path: Path, run: RunResult) -> None:
    """Append one row (header first if the file is new); a crash loses at most the current run.

    A file written before a column existed is first rewritten with the current header (atomically,
    through a temporary file), its old rows filled with the defaults.
    """
    header = [field.name for field in fields(RunResult)]
    if path.exists():
        with path.open() as handle:
            if next(csv.reader(handle), header) != header:
                _rewrite(path, list(read_runs(path).values()), header)
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        if new:
            writer.writeheader()
        writer.writerow(_cells(run))


def _rewrite(path: Path, runs: list[RunResult], header: list[str]) -> None:
    temporary = path.with_suffix(".tmp")
    with temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerows(_cells(run) for run in runs)
    os.replace(temporary, path)


def _cells(run: RunResult) -> dict[str, object]:
    return {name: "" if value is None else value for name, value in asdict(run).items()}


class OutOfTime(Exception):
    """The benchmark's ``--stop-after`` deadline passed; the run in progress was checkpointed."""


class Claimed(Pending):
    """A run that another benchmark process on this machine is running now (two lanes, one plan)."""


@dataclass
class RunClaim:
    """Which process runs a run: a file holding its pid, created exclusively, removed when the run is logged.

    Two benchmark processes (lanes of one thread each on a 2-core machine) may work through one plan:
    each skips the runs the other holds. A claim whose process is gone (killed) is taken over.
    """

    path: Path

    def acquire(self) -> bool:
        """Claim the run for this process; False while another live process holds it.

        The claim appears whole, pid inside, by one hard link of a file written first: a claim is never seen
        empty, so one whose process is gone can be taken over without mistaking a claim being written for it.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        written = self.path.with_name(f"{self.path.name}.{os.getpid()}")
        written.write_text(str(os.getpid()))
        try:
            for _ in range(2):
                try:
                    os.link(written, self.path)
                    return True
                except FileExistsError:
                    holder = self.holder()
                    if holder == os.getpid():
                        return True
                    if holder is not None and process_alive(holder):
                        return False
                    self.path.unlink(missing_ok=True)  # its process is gone
            return False
        finally:
            written.unlink(missing_ok=True)

    def holder(self) -> int | None:
        try:
            return int(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def release(self) -> None:
        if self.holder() == os.getpid():
            self.path.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence only (PermissionError: alive, another user's)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


@dataclass
class RunCheckpoint:
    """One run's training state, saved every ``every`` steps and at the deadline, so it resumes mid-run.

    A long-regime run takes half an hour to an hour: without this, a killed benchmark loses the run.
    The state is everything the shared loop changes (model and optimizer state, schedule, losses, the
    adapter's notes), so a resumed run computes what the uninterrupted one would have. The file is
    replaced atomically and removed once the run is in the log.
    """

    path: Path
    every: int
    deadline: float | None = None  # time.monotonic() after which the loop saves and stops

    def load(self) -> dict | None:
        return torch.load(self.path, weights_only=False) if self.path.exists() else None

    def save(self, state: dict) -> None:
        atomic_save(state, self.path)

    def due(self, done: int, total: int) -> bool:
        """Save after ``done`` of ``total`` steps? (Never after the last: the run is then complete.)"""
        return done < total and (done % self.every == 0 or self.out_of_time())

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


@dataclass
class PrunedCache:
    """One pattern's pruned weights, kept between invocations of the benchmark.

    Wanda gives the same weights every time for the same model, calibration and pruning code, and
    costs 3-11 minutes on the real model; a long-regime benchmark is invoked several times a
    session (``--stop-after``, one ``--methods`` group after another). The weights are saved once
    with a fingerprint of those inputs and reused only while it matches.
    """

    path: Path

    def load(self, fingerprint: str) -> tuple[dict[str, torch.Tensor], object] | None:
        """The saved (weights by layer name, sparsity report), or None when absent or made from other inputs."""
        if not self.path.exists():
            return None
        saved = torch.load(self.path, weights_only=False)
        return (saved["weights"], saved["report"]) if saved["fingerprint"] == fingerprint else None

    def save(self, fingerprint: str, weights: dict[str, torch.Tensor], report: object) -> None:
        atomic_save({"fingerprint": fingerprint, "weights": weights, "report": report}, self.path)


def atomic_save(state: dict, path: Path) -> None:
    """torch.save through a temporary file: a kill mid-save leaves the previous file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(descriptor)  # its own name: two lanes may save the same pruned model at once
    try:
        torch.save(state, name)
        os.replace(name, path)
    finally:
        Path(name).unlink(missing_ok=True)
