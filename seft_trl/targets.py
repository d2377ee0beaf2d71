"""Which linear layers a method may touch: the bottom floor that pruning, the engine and the report share.

The output embedding (``lm_head``, and any module tied to it) is never a target: pruning it or
giving it deltas changes every logit, and Wanda/SparseGPT leave it dense.
"""

from __future__ import annotations

import re

import torch
from torch import nn


def output_embedding_names(model: nn.Module) -> set[str]:
    """Names of the output embedding (lm_head) and any module sharing its weight."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    excluded = {name for name, module in model.named_modules() if name.split(".")[-1] == "lm_head"}
    if output is not None:
        excluded |= {name for name, module in model.named_modules() if module is output}
    return excluded


def find_target_linears(model: nn.Module, target_modules: list[str] | str | None) -> dict[str, nn.Linear]:
    """The nn.Linear modules that get deltas, by name; raises before anything is changed."""
    excluded = output_embedding_names(model)
    modules = dict(model.named_modules())
    linears = [name for name, module in modules.items() if isinstance(module, nn.Linear)]

    def matches(name: str) -> bool:
        if target_modules is None:
            return isinstance(modules[name], nn.Linear) and name not in excluded
        if isinstance(target_modules, str):
            return re.fullmatch(target_modules, name) is not None
        return any(name == target or name.endswith("." + target) for target in target_modules)

    matched = [name for name in modules if name and matches(name)]
    if not matched:
        kinds = sorted({name.split(".")[-1] for name in linears if name not in excluded})
        raise ValueError(
            f"target_modules={target_modules!r} matches no module. The model's linear layers are named: "
            f"{', '.join(kinds) or '(none)'}."
        )
    for name in matched:
        module = modules[name]
        if name in excluded:
            raise ValueError(f"{name!r} is the output embedding; lm_head and embeddings are never SEFT targets.")
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"Target {name!r} is a {type(module).__name__}, not an nn.Linear; SEFT only adapts linear layers. "
                "Name the linear projections inside it instead."
            )
        weight = module.weight
        if type(weight) not in (torch.Tensor, nn.Parameter) or not weight.is_floating_point():
            raise ValueError(
                f"Target {name!r} is a {type(module).__name__} whose weight is a {type(weight).__name__} of "
                f"{weight.dtype}: deltas and pruning write single weights in place, which quantized storage "
                "(bitsandbytes Linear4bit / Linear8bitLt, ...) does not allow. Load the model unquantized (for example "
                "dtype=torch.bfloat16) and save memory with an 8-bit optimizer instead (optim='adamw_8bit')."
            )
    return {name: modules[name] for name in matched}
