"""One-shot pruning (Wanda, SparseGPT, magnitude; unstructured or N:M), the starting point of SEFT.

``prune(model, ...)`` is the entry point; the tensor functions are exported for direct use and tests.
The command line is ``python -m seft_trl.prune``.
"""

from .api import METHODS, PruningOptions, dense_parent_of, prune, resolve_options
from .calibration import calibration_windows, random_windows
from .masks import (
    kept_count,
    lowest_in_layer,
    lowest_per_group,
    lowest_per_row,
    magnitude_score,
    select_pruned,
    wanda_score,
)
from .sequential import InputStatistics, capture_layer_inputs, decoder_and_layers
from .sparsegpt import sparsegpt_prune

__all__ = [
    "METHODS",
    "InputStatistics",
    "PruningOptions",
    "calibration_windows",
    "capture_layer_inputs",
    "decoder_and_layers",
    "dense_parent_of",
    "kept_count",
    "lowest_in_layer",
    "lowest_per_group",
    "lowest_per_row",
    "magnitude_score",
    "prune",
    "random_windows",
    "resolve_options",
    "select_pruned",
    "sparsegpt_prune",
    "wanda_score",
]
