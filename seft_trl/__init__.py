"""seft_trl: Sparsity Evolution Fine-Tuning (SEFT, arXiv 2505.24037) for Hugging Face TRL."""

from .callback import SEFTCallback
from .config import SparsityEvolutionConfig
from .engine import SparsityEvolution, find_target_linears, merge, merged_state_dict
from .layer import SparseDeltaLinear, UpdateStats
from .optim_state import reset_optimizer_slots
from .patterns import SparsityPattern, detect_pattern
from .report import SparsityReport, sparsity_report
from .sft_config import SEFTConfig
from .sft_trainer import SEFTSFTTrainer

__all__ = [
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
    "merge",
    "merged_state_dict",
    "reset_optimizer_slots",
    "sparsity_report",
]
