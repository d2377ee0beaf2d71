"""Drop the notices that third-party packages log while transformers imports them.

Importing transformers' model code imports torchao (for its quantizer) and, through the trainer,
bitsandbytes; both log at import time about optional kernels that seft_trl never runs, so every
command would start with lines a user can do nothing about. Each notice is dropped by a filter on
the one logger that emits it, matching its message only: other records of that logger, every other
logger, and all ``warnings.warn`` calls (seft_trl's and transformers' own) pass untouched.

The front ends (``seft-trl``, the recipes, the demo) call :func:`silence_import_noise` before they
import transformers; the library never does, so an application that uses it keeps its own say over
other packages' logging.
"""

from __future__ import annotations

import logging
import re
from typing import Callable

# torchao ships extensions built for one Python and one GPU architecture (cp310, sm90a); elsewhere
# it skips them and logs the failure. seft_trl uses torchao only for its low-bit AdamW, pure PyTorch.
_TORCHAO_EXTENSION = re.compile(r"^Failed to load .*[/\\]torchao[/\\]_C[^/\\]*\.so: ")
# torch deprecates registering an Enum as a pytree constant, which torchao does for its own enums on
# import: a message for torchao's developers, logged through torch's handler ("W1207 ... _pytree.py").
_ENUM_CONSTANT = "%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type."
# On CPUs with AVX512-BF16, bitsandbytes loads a 4-bit CPU matmul kernel from the hub's
# kernels-community at import, and logs when it cannot (no ``kernels`` package, offline); seft_trl
# runs no 4-bit matmul.
_BNB_CPU_KERNEL = "Failed to load CPU gemm_4bit_forward from kernels-community"


def is_torchao_extension_failure(record: logging.LogRecord) -> bool:
    return bool(_TORCHAO_EXTENSION.match(record.getMessage()))


def is_torchao_enum_deprecation(record: logging.LogRecord) -> bool:
    """torch's deprecation notice, for an Enum of torchao only (anyone else's still shows)."""
    if not str(record.msg).startswith(_ENUM_CONSTANT) or not isinstance(record.args, tuple) or not record.args:
        return False
    return getattr(record.args[0], "__module__", "").startswith("torchao.")


def is_bitsandbytes_cpu_kernel_failure(record: logging.LogRecord) -> bool:
    return str(record.msg).startswith(_BNB_CPU_KERNEL)


# The logger that emits each notice (the module's ``logging.getLogger(__name__)``) -> the notice.
NOISE: dict[str, Callable[[logging.LogRecord], bool]] = {
    "torchao": is_torchao_extension_failure,
    "torch.utils._pytree": is_torchao_enum_deprecation,
    "bitsandbytes.backends.cpu.ops": is_bitsandbytes_cpu_kernel_failure,
}


class DropNotice(logging.Filter):
    """A logger filter that drops the records ``notice`` recognizes and passes every other one."""

    def __init__(self, notice: Callable[[logging.LogRecord], bool]) -> None:
        super().__init__()
        self.notice = notice

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.notice(record)


def silence_import_noise() -> None:
    """Attach a :class:`DropNotice` for each of :data:`NOISE` to its logger; calling it again adds none.

    Call it before transformers is imported: the notices are logged once, at import. A logger's
    filters outlive torch's logging set-up, which replaces handlers but keeps filters.
    """
    for name, notice in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropNotice) and f.notice is notice for f in logger.filters):
            logger.addFilter(DropNotice(notice))
