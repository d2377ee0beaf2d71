"""SEFTConfig: TRL's SFTConfig plus one ``seft_*`` field per engine option."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Literal

from trl import SFTConfig

from ..config import SparsityEvolutionConfig

_ENGINE_FIELDS = {f.name: f for f in fields(SparsityEvolutionConfig)}


def _engine_option(name: str):
    """A field with the engine option's default and help text, so both are defined once."""
    option = _ENGINE_FIELDS[name]
    assert option.default is not MISSING
    return field(default=option.default, metadata={"help": option.metadata["help"]})


@dataclass
class SEFTConfig(SFTConfig):
    """Configuration of :class:`SEFTSFTTrainer`: every ``SFTConfig`` field plus the SEFT options.

    The ``seft_*`` fields map one to one to :class:`SparsityEvolutionConfig` (see its docstring for
    the defaults and why); the engine's seed is ``seed``. They parse from the command line and YAML
    through ``TrlParser`` like any TRL option (``--seft_density 0.01``).

    One ``SFTConfig`` default is overridden: ``learning_rate`` is 3e-3 instead of 2e-5. TRL's value
    suits full fine-tuning, where every weight moves; a delta is one of a few trainable weights per
    row, and Adam moves it by about the learning rate a step, so at 2e-5 it travels at most 0.005 in
    256 steps. In the short quality benchmark (Wanda 50%) SEFT recovered 29% of the log-perplexity gap
    at 2e-4 and 56% at 7.83e-3; 3e-3 was its best in the long one (``benchmarks/results/quality_long.md``).
    """

    # Parameters whose default values are overridden from SFTConfig
    learning_rate: float = field(
        default=3e-3,
        metadata={
            "help": "The initial learning rate for the deltas. The default is SEFT's best on the long quality "
            "benchmark (SmolLM2-135M at Wanda 50%%, 256 steps of 4 x 256 tokens; val perplexity 24.77 at 1.5e-3, "
            "24.58 at 3e-3, 25.23 at 6e-3). Start near 1e-3 on 7B models and runs of thousands of steps."
        },
    )

    seft_density: float | None = _engine_option("density")
    seft_num_deltas: int | None = _engine_option("num_deltas")
    seft_target_modules: list[str] | None = _engine_option("target_modules")
    seft_update_interval: int = _engine_option("update_interval")
    seft_accumulation_steps: int = _engine_option("accumulation_steps")
    seft_drop_fraction: float = _engine_option("drop_fraction")
    seft_drop_schedule: Literal["cosine", "linear", "constant"] = _engine_option("drop_schedule")
    seft_update_end: float = _engine_option("update_end")
    seft_regrow_pruned: bool | None = _engine_option("regrow_pruned")
    seft_growth_criterion: str = _engine_option("growth_criterion")
    seft_removal_criterion: str = _engine_option("removal_criterion")
    seft_swap_test: str = _engine_option("swap_test")
    seft_gain_estimate: str = _engine_option("gain_estimate")
    seft_seed_moments: bool = _engine_option("seed_moments")
    seft_sparsity_scope: Literal["layer", "row"] = _engine_option("sparsity_scope")
    seft_sparsity_pattern: str = _engine_option("sparsity_pattern")
    seft_drop_mode: Literal["freeze", "revert"] = _engine_option("drop_mode")
    seft_candidate_factor: float = _engine_option("candidate_factor")
    seft_column_cap: float | None = _engine_option("column_cap")
    seft_min_8bit_size: int = field(
        default=0,
        metadata={
            "help": "Forwarded to bitsandbytes optimizers (transformers does not): tensors with fewer elements keep "
            "32-bit state. bitsandbytes defaults to 4096, which would leave small delta tensors in 32-bit."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.seft_engine_config()  # validate the SEFT options now, not when training starts

    def seft_engine_config(self) -> SparsityEvolutionConfig:
        """The engine configuration these arguments describe."""
        options = {name: getattr(self, f"seft_{name}") for name in _ENGINE_FIELDS if name != "seed"}
        return SparsityEvolutionConfig(**options, seed=self.seed)
