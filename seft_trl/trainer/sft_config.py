"""SEFTConfig: TRL's SFTConfig plus one ``seft_*`` field per engine option."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal

from trl import SFTConfig

from ..config import SparsityEvolutionConfig
from ..distillation import DistillationLoss

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

    _VALID_DICT_FIELDS = SFTConfig._VALID_DICT_FIELDS + ["teacher_model_init_kwargs"]

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
    seft_window_groups: int = _engine_option("window_groups")
    seft_candidate_factor: float = _engine_option("candidate_factor")
    seft_column_cap: float | None = _engine_option("column_cap")
    seft_revival_cap: float | None = _engine_option("revival_cap")
    seft_dense_revival: bool | None = _engine_option("dense_revival")

    # The dense parent: distillation teacher and starting point of revived weights (TRL's DistillationConfig names)
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The dense model this one was pruned from (a local folder or a hub name): the distillation teacher, "
            "and where revived weights start (seft_dense_revival). `seft-trl repair` and the recipes take it from the "
            "pruned checkpoint's config (pruning_config.parent) when unset."
        },
    )
    teacher_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments of AutoModelForCausalLM.from_pretrained for the teacher (default dtype: the "
            "student's), e.g. a bitsandbytes quantization_config to hold a 7B teacher in 4 or 8 bits on CUDA."
        },
    )
    distillation_weight: float = field(
        default=DistillationLoss.weight,
        metadata={
            "help": "With a teacher: the loss is (1 - w) * CE + w * divergence from the teacher's next-token "
            "distribution (0: plain CE, the teacher only seeds revivals; 1: pure distillation)."
        },
    )
    beta: float = field(
        default=DistillationLoss.beta,
        metadata={"help": "The divergence, as TRL's DistillationTrainer: 0 forward KL(teacher || student), 1 reverse "
                          "KL, between them the generalized Jensen-Shannon divergence (0.5: JSD)."},
    )
    temperature: float = field(
        default=DistillationLoss.temperature,
        metadata={"help": "Temperature of both distributions in the divergence (the CE stays at 1)."},
    )
    hidden_state_weight: float = field(
        default=DistillationLoss.hidden_weight,
        metadata={"help": "Weight of SquareHead's per-layer loss ||h_s - h_t||^2 / ||h_t||^2 between the student's and "
                          "the teacher's decoder-layer outputs, averaged over layers (0: off)."},
    )

    seft_min_8bit_size: int = field(
        default=0,
        metadata={
            "help": "Forwarded to bitsandbytes optimizers (transformers does not): tensors with fewer elements keep "
            "32-bit state. bitsandbytes defaults to 4096, which would leave small delta tensors in 32-bit."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.seft_engine_config()  # validate the SEFT and distillation options now, not when training starts
        self.distillation_loss()

    def distillation_loss(self) -> DistillationLoss:
        """The loss these arguments describe when a teacher is given."""
        return DistillationLoss(self.distillation_weight, self.beta, self.temperature, self.hidden_state_weight)

    def seft_engine_config(self) -> SparsityEvolutionConfig:
        """The engine configuration these arguments describe."""
        options = {name: getattr(self, f"seft_{name}") for name in _ENGINE_FIELDS if name != "seed"}
        return SparsityEvolutionConfig(**options, seed=self.seed)
