"""seft_trl: Sparsity Evolution Fine-Tuning (SEFT, arXiv 2505.24037) for Hugging Face TRL.

Every public name loads on first use (PEP 562): ``import seft_trl`` imports neither torch nor
TRL, so ``seft-trl --help`` answers at once and a script that needs only the engine does not pay
for importing TRL. ``from seft_trl import SparsityEvolution`` works as before.
"""

from importlib import import_module

# Public name -> the submodule that defines it.
_HOME = {
    "NonFiniteError": ".engine",
    "SEFTCallback": ".trainer",
    "SEFTConfig": ".trainer",
    "SEFTSFTTrainer": ".trainer",
    "SparseDeltaLinear": ".layer",
    "SparsityEvolution": ".engine",
    "SparsityEvolutionConfig": ".config",
    "SparsityPattern": ".patterns",
    "SparsityReport": ".report",
    "UpdateStats": ".layer",
    "detect_pattern": ".patterns",
    "find_target_linears": ".targets",
    "keep_freed_memory": ".allocator",
    "merge": ".engine",
    "merged_state_dict": ".engine",
    "reset_optimizer_slots": ".optim_state",
    "sparsity_report": ".report",
}

__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name in _HOME:
        return getattr(import_module(_HOME[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
