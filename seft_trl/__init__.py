"""seft_trl: Sparsity Evolution Fine-Tuning (SEFT, arXiv 2505.24037) for Hugging Face TRL.

The engine (plain PyTorch) imports eagerly; the TRL integration (``SEFTConfig``,
``SEFTSFTTrainer``, ``SEFTCallback``) loads on first use, so the engine, the pruning
CLI and the tests that need no trainer do not pay for importing TRL.
"""

from importlib import import_module

from .allocator import keep_freed_memory
from .config import SparsityEvolutionConfig
from .engine import NonFiniteError, SparsityEvolution, merge, merged_state_dict
from .layer import SparseDeltaLinear, UpdateStats
from .optim_state import reset_optimizer_slots
from .patterns import SparsityPattern, detect_pattern
from .report import SparsityReport, sparsity_report
from .targets import find_target_linears

_LAZY = {"SEFTCallback": ".trainer", "SEFTConfig": ".trainer", "SEFTSFTTrainer": ".trainer"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "NonFiniteError",
    "SEFTCallback",
    "SEFTConfig",
    "SEFTSFTTrainer",
    "SparseDeltaLinear",
    "SparsityEvolution",
    "SparsityEvolutionConfig",
    "SparsityPattern",
    "SparsityReport",
    "UpdateStats",
    "detect_pattern",
    "find_target_linears",
    "keep_freed_memory",
    "merge",
    "merged_state_dict",
    "reset_optimizer_slots",
    "sparsity_report",
]
