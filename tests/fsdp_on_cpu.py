"""Run a script with accelerate's FSDP2 path on CPU processes: ``fsdp_on_cpu.py SCRIPT ARGS...``.

accelerate 1.15 turns on FSDP only for accelerator devices: ``AcceleratorState`` picks
``DistributedType.FSDP`` from MULTI_GPU (and other device types) but never from MULTI_CPU, so a
CPU launch with an FSDP config silently runs DDP. FSDP2 itself runs on CPU over gloo. This shim
lets a CPU state that was given an FSDP plugin take accelerate's FSDP path, so the tests run the
code a GPU launch runs (accelerate's ``fsdp2_prepare_model``, its FSDP checkpointing, the Trainer's
FSDP branches) on the CPU machine. Nothing else is changed.
"""

from __future__ import annotations

import runpy
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_state_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, **kwargs):
    _state_init(self, *args, **kwargs)
    plugin = kwargs.get("fsdp_plugin")
    if self.distributed_type == DistributedType.MULTI_CPU and plugin is not None:
        self.distributed_type = DistributedType.FSDP
        if self._mixed_precision != "no":  # as accelerate does for GPUs
            plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = plugin
        PartialState._shared_state["distributed_type"] = self.distributed_type  # as accelerate does for GPUs


AcceleratorState.__init__ = _init_with_fsdp_on_cpu

if __name__ == "__main__":
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
