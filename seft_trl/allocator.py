"""Keep freed memory in glibc's heap while training on the CPU.

glibc's malloc serves a block above its mmap threshold (128 KiB, rising by itself to at most 32 MiB)
with a fresh anonymous mapping and unmaps it when the block is freed. A training step allocates and
frees activations, logits and gradients of tens to hundreds of MiB, so every step faults all their
pages in again, and inside a virtual machine a page fault costs whatever the host's load makes it.
On this project's 2-core VM ``make demo`` spent 174 s of its 434 s in the kernel (55.8 million minor
page faults); with freed memory kept in the heap it ran in 309 s, 17 s of them in the kernel (1.3
million faults), and printed the same results. The price is a higher resident peak (5.4 GB against
4.8 GB there): the heap keeps its high-water mark.

The same effect comes from the environment variables in :data:`ENVIRONMENT`, set before Python
starts (``benchmarks/speed.py`` runs its workers so);
:func:`keep_freed_memory` does it from inside a running process, and leaves a process alone whose
environment already sets either.
"""

from __future__ import annotations

import ctypes
import os

# mallopt takes a C int, so 1 GiB is the largest power of two it can set: blocks up to it come from
# the heap (a step's largest, the logits of a batch, are far smaller on a CPU), and up to 2 GiB of
# free memory at the heap's top stays mapped.
MMAP_THRESHOLD = 2**30
TRIM_THRESHOLD = 2**31 - 1
# The same for a process about to start: its environment may hold the larger values mallopt cannot
# (4 GiB and 64 GiB), which glibc reads before the first allocation.
ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**36)}
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers in glibc's malloc.h


def is_glibc() -> bool:
    """Whether this process runs on glibc, whose ``mallopt`` parameters the thresholds are."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (AttributeError, ValueError, OSError):  # not a GNU C library, or no confstr on this system
        return False


def keep_freed_memory() -> bool:
    """Make glibc's malloc serve blocks up to 1 GiB from its heap and keep what is freed there, for the
    rest of this process. Returns whether it changed anything: False off glibc, and False where the
    environment already sets either threshold (the user's choice stands)."""
    if not is_glibc() or any(name in os.environ for name in ENVIRONMENT):
        return False
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    # A glibc that refuses this mmap threshold (mallopt returns 0) must not get the trim
    # threshold alone: setting either stops glibc from raising its mmap threshold by itself.
    if not libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(MMAP_THRESHOLD)):
        return False
    return bool(libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(TRIM_THRESHOLD)))
