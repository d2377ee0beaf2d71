"""Sequential calibration, as in the Wanda and SparseGPT reference code: the inputs of decoder layer i
come from layers < i already pruned, so each layer is fitted to the errors its predecessors made.

Only one decoder layer's inputs [n, seqlen, hidden] are held at a time, and only the layer being
pruned is moved to the execution device: a 7B model prunes on one 24 GB GPU, small models on CPU.
Samples go through a layer one at a time, so activation memory is that of one window.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

LayerCall = tuple[tuple[Any, ...], dict[str, Any]]  # what a decoder layer receives besides its hidden states


def working_dtype(weight: torch.Tensor) -> torch.dtype:
    """fp32 for half-precision weights, the weight's own dtype when it is wider."""
    return torch.promote_types(weight.dtype, torch.float32)


class InputStatistics:
    """Sums over calibration tokens of one linear layer's input x [in]: Σ x_j² (Wanda) or Σ x xᵀ (SparseGPT).

    Accumulated in at least fp32 whatever the model's dtype, so that long calibration sets keep their precision.
    """

    def __init__(self, weight: torch.Tensor, full: bool) -> None:
        in_features = weight.shape[1]
        self.full = full
        self.tokens = 0
        shape = (in_features, in_features) if full else (in_features,)
        self.sums = torch.zeros(shape, dtype=working_dtype(weight), device=weight.device)

    def add(self, inputs: torch.Tensor) -> None:
        """Add a batch of inputs [..., in]."""
        x = inputs.reshape(-1, inputs.shape[-1]).to(self.sums.dtype)  # [tokens, in]
        self.tokens += x.shape[0]
        if self.full:
            self.sums.addmm_(x.T, x)
        else:
            self.sums.add_(x.pow(2).sum(dim=0))

    def column_sq_norms(self) -> torch.Tensor:
        """‖X_j‖₂² per input j [in]."""
        return self.sums.diagonal() if self.full else self.sums

    def hessian(self) -> torch.Tensor:
        """H = 2 XXᵀ / n [in, in], the Hessian of the layer's mean squared reconstruction error."""
        if not self.full:
            raise ValueError("These statistics hold column norms only; accumulate with full=True for a Hessian.")
        return self.sums * (2.0 / self.tokens)


def decoder_and_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """The decoder (the model without its LM head) and its list of decoder layers."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(
            f"Wanda and SparseGPT calibrate decoder layer by layer and need a transformers causal LM whose decoder "
            f"keeps its layers in `.layers` (LLaMA, Mistral, Qwen2, DeepSeek-LLaMA, ...); {type(model).__name__} "
            "has none. Magnitude pruning works on any model."
        )
    return decoder, layers


def targets_by_layer(layers: nn.ModuleList, targets: dict[str, nn.Linear]) -> list[dict[str, nn.Linear]]:
    """The target linears of each decoder layer; raises if a target lies outside every decoder layer."""
    owner = {id(module): index for index, layer in enumerate(layers) for module in layer.modules()}
    outside = [name for name, linear in targets.items() if id(linear) not in owner]
    if outside:
        raise ValueError(
            f"{', '.join(outside)} lie outside the decoder layers, which Wanda and SparseGPT calibrate one at a "
            "time. Leave them out of target_modules, or prune them with method='magnitude'."
        )
    groups: list[dict[str, nn.Linear]] = [{} for _ in layers]
    for name, linear in targets.items():
        groups[owner[id(linear)]][name] = linear
    return groups


class _Recorder(nn.Module):
    """Stands in for a decoder layer in the capture pass: records its call, returns the hidden states unchanged."""

    def __init__(self, keep_hidden: bool) -> None:
        super().__init__()
        self.keep_hidden = keep_hidden
        self.hidden: list[torch.Tensor] = []
        self.call: LayerCall | None = None

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.keep_hidden:
            self.hidden.append(hidden_states)
        if self.call is None:
            self.call = (args, kwargs)
        return hidden_states


@torch.no_grad()
def capture_layer_inputs(
    decoder: nn.Module, layers: nn.ModuleList, ids: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, list[LayerCall]]:
    """The first layer's inputs [n, seqlen, hidden] for ``ids`` [n, seqlen], and every layer's other arguments.

    The decoder runs with its layers swapped for recorders, so it builds exactly what each layer gets in
    a real forward (rotary embeddings, the causal or sliding-window mask of that layer, positions, cache
    off) without running any layer. Windows have one length and no padding, so these arguments are the
    same for every sample; they are recorded from the first one with batch size 1, which broadcasts.
    """
    originals = list(layers)
    recorders = [_Recorder(keep_hidden=index == 0) for index in range(len(layers))]
    home = next(decoder.parameters()).device
    try:
        for index, recorder in enumerate(recorders):
            layers[index] = recorder
        decoder.to(device)  # moves the embeddings and norms only: the layers are swapped out
        for row in ids:
            decoder(input_ids=row.unsqueeze(0).to(device), use_cache=False)
    finally:
        decoder.to(home)
        for index, layer in enumerate(originals):
            layers[index] = layer
    return torch.cat(recorders[0].hidden), [recorder.call for recorder in recorders]


@torch.no_grad()
def run_layer(layer: nn.Module, hidden: torch.Tensor, call: LayerCall, update: bool = True) -> None:
    """Run ``layer`` on ``hidden`` [n, seqlen, hidden] one sample at a time; ``update`` writes the outputs back."""
    args, kwargs = call
    for index in range(hidden.shape[0]):
        output = layer(hidden[index : index + 1], *args, **kwargs)
        if update:  # layers of remote-code models may still return (hidden_states, ...)
            hidden[index : index + 1] = output[0] if isinstance(output, tuple) else output


@contextmanager
def accumulating(linears: dict[str, nn.Linear], full: bool) -> Iterator[dict[str, InputStatistics]]:
    """Input statistics of ``linears``, accumulated by forward hooks while the context is open."""
    stats = {name: InputStatistics(linear.weight, full) for name, linear in linears.items()}
    handles = [
        linear.register_forward_hook(lambda _module, inputs, _output, s=stats[name]: s.add(inputs[0]))
        for name, linear in linears.items()
    ]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def prune_sequentially(
    decoder: nn.Module,
    layers: nn.ModuleList,
    groups: list[dict[str, nn.Linear]],
    ids: torch.Tensor,
    device: torch.device,
    prune_linear: Callable[[nn.Linear, InputStatistics], None],
    full_statistics: bool,
    progress: bool = False,
) -> None:
    """Prune the target linears ``groups[i]`` of every decoder layer i, in order, on ``device``.

    Per layer: one pass over the samples accumulates the input statistics of all its targets with the
    layer still dense (as the references do), then they are pruned, then a second pass through the
    pruned layer produces the next layer's inputs. Layers after the last one with targets are skipped.
    An error inside the loop (out of memory, say) leaves the layers before it pruned.
    """
    hidden, calls = capture_layer_inputs(decoder, layers, ids, device)
    last = max(index for index, group in enumerate(groups) if group)
    for index in tqdm(range(last + 1), desc="pruning", unit="layer", disable=not progress):
        layer, group = layers[index], groups[index]
        home = next(layer.parameters()).device
        layer.to(device)
        try:
            if group:
                with accumulating(group, full_statistics) as stats:
                    run_layer(layer, hidden, calls[index], update=False)
                for name, linear in group.items():
                    prune_linear(linear, stats[name])
            if index < last:
                run_layer(layer, hidden, calls[index])
        finally:
            layer.to(home)
