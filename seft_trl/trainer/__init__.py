"""The TRL integration: ``SEFTConfig`` (an ``SFTConfig`` with SEFT's options), ``SEFTSFTTrainer`` and
the ``SEFTCallback`` that drives the engine from any ``transformers.Trainer``.

Only this subpackage and :mod:`seft_trl.apps` import TRL; the engine below them is plain PyTorch.
"""

from .callback import SEFTCallback
from .sft_config import SEFTConfig
from .sft_trainer import SEFTSFTTrainer

__all__ = ["SEFTCallback", "SEFTConfig", "SEFTSFTTrainer"]
