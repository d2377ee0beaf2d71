"""Block-wise reconstruction from the dense parent, in the manner of EBFT (arXiv 2402.12419): the rival of
distillation that never looks at the LM loss.

One decoder layer at a time, in order, every surviving weight of its projections trains (masked, as
masked full fine-tuning) so that the layer maps the pruned model's hidden states, as the layers
before it already repaired them, onto the dense model's hidden states after the same layer (mean
squared error): each layer also corrects what the earlier ones could not. Every layer sees the run's
sequences once, in the run's order and batches, so the method uses the same tokens as the others,
with an optimizer holding one layer's weights at a time (about LoRA r=8's count on SmolLM2 at 50%).

The pruned and the dense hidden states of every sequence are kept on the CPU between layers
([sequences, seqlen, hidden] each: 0.6 GB apiece on SmolLM2's long runs).
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from baselines import projection_linears
from quality_runs import OutOfTime, RunCheckpoint
from seft_trl.pruning import capture_layer_inputs, decoder_and_layers
from seft_trl.pruning.sequential import LayerCall, run_layer


def _layer_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _states(model: nn.Module, ids: torch.Tensor, layers_done: int) -> tuple[torch.Tensor, list[LayerCall]]:
    """The inputs of decoder layer ``layers_done`` for ``ids`` [n, seqlen], and every layer's other arguments."""
    decoder, layers = decoder_and_layers(model)
    hidden, calls = capture_layer_inputs(decoder, layers, ids, torch.device("cpu"))
    for index in range(layers_done):
        run_layer(layers[index], hidden, calls[index])
    return hidden, calls


def surviving_count(model: nn.Module) -> int:
    """The most trainable weights at once: the surviving projection weights of the largest decoder layer."""
    _, layers = decoder_and_layers(model)
    return max(sum(int(torch.count_nonzero(m.weight)) for m in projection_linears(layer).values()) for layer in layers)


def blockwise_train(model: nn.Module, dense: nn.Module, batches: list[torch.Tensor], lr: float,
                    checkpoint: RunCheckpoint | None = None) -> tuple[list[float], float]:
    """Repair ``model`` in place layer by layer against ``dense``; returns the last layer's losses and the seconds.

    Each layer: AdamW (no weight decay) over its surviving projection weights, warm-up then cosine decay
    over the run's ``len(batches)`` steps, gradient clipping at 1.0, pruned weights held at zero. With a
    ``checkpoint`` the model is saved after every fourth layer and at the deadline (then
    :class:`~quality_runs.OutOfTime` is raised), and a saved run resumes at the next layer.
    """
    model.requires_grad_(False)
    _, layers = decoder_and_layers(model)
    _, dense_layers = decoder_and_layers(dense)
    ids = torch.cat(batches)  # [n, seqlen], in the run's order
    sizes = [len(batch) for batch in batches]
    saved = checkpoint.load() if checkpoint else None
    done, earlier_s, losses = 0, 0.0, []
    if saved is not None:
        model.load_state_dict(saved["model"])
        done, earlier_s, losses = saved["layers"], saved["train_s"], saved["losses"]
        print(f"  resumed after decoder layer {done} of {len(layers)}", flush=True)
    began = time.perf_counter()
    hidden, calls = _states(model, ids, done)
    with torch.no_grad():
        target, dense_calls = _states(dense, ids, done)
    for index in range(done, len(layers)):
        layer = layers[index]
        run_layer(dense_layers[index], target, dense_calls[index])  # the dense hidden states after this layer
        losses = _fit_layer(layer, hidden, target, calls[index], sizes, lr)
        run_layer(layer, hidden, calls[index])  # the repaired layer's outputs: the next layer's inputs
        print(f"  decoder layer {index + 1} of {len(layers)}: MSE {statistics.mean(losses[:8]):.4g} -> "
              f"{statistics.mean(losses[-8:]):.4g}", flush=True)
        last = index + 1 == len(layers)
        if checkpoint and not last and ((index + 1) % 4 == 0 or checkpoint.out_of_time()):
            checkpoint.save({"model": model.state_dict(), "layers": index + 1, "losses": losses,
                             "train_s": earlier_s + time.perf_counter() - began})
            if checkpoint.out_of_time():
                raise OutOfTime(f"stopped after decoder layer {index + 1} of {len(layers)}")
    return losses, earlier_s + time.perf_counter() - began


def _fit_layer(layer: nn.Module, hidden: torch.Tensor, target: torch.Tensor, call: LayerCall, sizes: list[int],
               lr: float) -> list[float]:
    """One pass over the sequences in batches of ``sizes``: the layer's masked projections fitted to ``target``."""
    linears = list(projection_linears(layer).values())
    masks = [linear.weight.detach() != 0 for linear in linears]
    weights = [linear.weight for linear in linears]
    for weight in weights:
        weight.requires_grad_(True)
    optimizer = torch.optim.AdamW(weights, lr=lr, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, len(sizes) // 16), len(sizes))
    args, kwargs = call
    losses, start = [], 0
    layer.train()
    for size in sizes:
        part = slice(start, start + size)
        start += size
        output = _layer_output(layer(hidden[part], *args, **kwargs))
        loss = torch.nn.functional.mse_loss(output, target[part])
        loss.backward()
        for weight, mask in zip(weights, masks):
            weight.grad.mul_(mask)
        torch.nn.utils.clip_grad_norm_(weights, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for weight, mask in zip(weights, masks):
                weight.mul_(mask)
        losses.append(loss.item())
    layer.eval()
    for weight in weights:
        weight.requires_grad_(False)
    return losses
