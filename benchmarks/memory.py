"""Training memory per repair method: measured on SmolLM2-135M's shape (CPU), projected to 7B and 70B.

Users pick a repair by what fits their GPU. ``seft_trl.memory`` projects a step's memory from a model's
shape; this script checks its accounting against what the methods' code really holds, and writes the
projection for LLaMA-2-7B and 70B over the budget axis of issue 41 (sparse deltas from LoRA r=8's
count to 25% of the surviving weights, LoRA-family ranks 8 to 128, masked full fine-tuning).

Measured: each method in its own process, on a model of SmolLM2-135M-Instruct's shape with random
weights magnitude-pruned to 50% (memory does not depend on the values), fp32, torch AdamW, a few
steps of 4 × 256 tokens: the bytes of every tensor the method keeps (trainable values, gradients,
optimizer state, its buffers: positions, base values, masks) read from the live objects, against the
projection; and the peak resident memory the training added over the loaded model.

    python benchmarks/memory.py                 # about 10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from common import RESULTS_DIR, machine_description, markdown_table, peak_memory, reset_peak_memory, status_bytes, write_report
from seft_trl.memory import (
    LLAMA2_7B, LLAMA2_70B, SMOLLM2_135M, Method, ModelShape, Workload, per_device_bytes, training_memory, window_bytes,
)

GB = 1e9
MIB = 2**20
STEPS = 3
BATCH, SEQLEN = 4, 256
GPUS = (24, 40, 80)
# The measured methods: (label, Method); each method at LoRA r=8's count on SmolLM2 and at the largest
# budget of the quality benchmark's budget axis (sparse deltas at 25% of each layer, rank 128).
SMOLLM2_LORA_DENSITY = 2_442_240 / SMOLLM2_135M.projection_weights
MEASURED = {
    "lora r=8": Method("lora", rank=8),
    "masked_lora r=8": Method("masked_lora", rank=8),
    "masked_lora r=128": Method("masked_lora", rank=128),
    "spp r=8": Method("spp", rank=8),
    "spp r=128": Method("spp", rank=128),
    "fixed_deltas (LoRA's count)": Method("fixed_deltas", density=SMOLLM2_LORA_DENSITY),
    "fixed_deltas 0.25": Method("fixed_deltas", density=0.25),
    "seft (LoRA's count)": Method("seft", density=SMOLLM2_LORA_DENSITY),
    "seft 0.1": Method("seft", density=0.1),
    "seft 0.25": Method("seft", density=0.25),
    "masked_full": Method("masked_full", sparsity=0.5),
}
# The budget axis projected: densities are fractions of each layer's weights (0.125 = 25% of the
# surviving ones at 50%); 0.0031 is LoRA r=8's count at 7B.
PROJECTED = [
    *(Method("seft", density=d) for d in (0.0031, 0.01, 0.025, 0.05, 0.1, 0.125)),
    *(Method("seft", density=d, window_groups=4) for d in (0.01, 0.05, 0.125)),  # update_interval 20 / 5 steps
    *(Method("seft", density=d, regrow_pruned=False) for d in (0.01, 0.05, 0.125)),  # N:M models' default
    *(Method("fixed_deltas", density=d) for d in (0.0031, 0.01, 0.05, 0.125)),
    *(Method(kind, rank=r) for kind in ("lora", "masked_lora", "spp") for r in (8, 32, 128)),
    Method("masked_full", sparsity=0.5),
]


def smollm2_shaped_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    from seft_trl.pruning import prune

    s = SMOLLM2_135M
    config = LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                         num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                         tie_word_embeddings=s.tied_embeddings)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    prune(model, method="magnitude", sparsity=0.5)
    return model


def adapter_for(label: str, model: torch.nn.Module):
    from baselines import PROJECTIONS, low_rank_adapter, masked_full_adapter, peft_lora_adapter, seft_adapter
    from seft_trl import SparsityEvolutionConfig

    method = MEASURED[label]
    if method.kind == "lora":
        return peft_lora_adapter(model, method.rank, 2 * method.rank)
    if method.kind in ("masked_lora", "spp"):
        return low_rank_adapter(model, method.rank, 2 * method.rank, "masked_add" if method.kind == "masked_lora" else "scale")
    if method.kind == "masked_full":
        return masked_full_adapter(model)
    # A window (steps 2-3) and an update (step 3) inside the measured steps.
    config = SparsityEvolutionConfig(density=method.density, target_modules=PROJECTIONS, update_interval=STEPS,
                                     accumulation_steps=2, drop_fraction=0.2 if method.kind == "seft" else 0.0)
    return seft_adapter(model, config)


def held_bytes(model: torch.nn.Module, parameters: list, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of what the method keeps, read from the live tensors."""
    values = sum(p.nbytes for p in parameters)
    gradients = sum(p.grad.nbytes for p in parameters if p.grad is not None)
    state = sum(t.nbytes for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    buffers = sum(b.nbytes for name, b in model.named_buffers()
                  if name.rsplit(".", 1)[-1] in ("delta_index", "delta_base", "mask"))
    return {"values": values, "gradients": gradients, "optimizer": state, "buffers": buffers}


def window_held(model: torch.nn.Module) -> dict[str, int]:
    """What SEFT's open accumulation windows hold between steps, read from the live tensors: the
    statistics and candidate positions, what ``window_bytes`` counts from their sizes, the sampled
    kernels' sorted layouts (none under the dense product), and the entries."""
    from seft_trl.layer import SparseDeltaLinear
    from seft_trl.window import WindowStatistics

    held = counted = layouts = entries = 0
    for layer in (m for m in model.modules() if isinstance(m, SparseDeltaLinear)):
        window = layer._window
        grow, remove = window.candidates.grow_index, window.candidates.remove_index
        held += sum(getattr(window, name).nbytes for name in WindowStatistics.TENSORS) + grow.nbytes + remove.nbytes
        counted += window_bytes(layer.delta.numel(), grow.numel(), remove.numel(), layer.out_features, layer.in_features,
                                in_step=False)
        pattern = window.pattern
        layouts += sum(getattr(pattern, name).nbytes for name in ("order", "col_indices", "crow_indices", "row_indices")
                       if getattr(pattern, name, None) is not None)
        entries += layer.delta.numel() + grow.numel() + remove.numel()
    return {"held": held, "counted": counted, "sampled_layouts": layouts, "entries": entries}


def worker(label: str) -> dict:
    torch.set_num_threads(1)
    model = smollm2_shaped_model().train()
    adapter = adapter_for(label, model)
    optimizer = torch.optim.AdamW(adapter.parameters, lr=1e-4)
    adapter.attach(optimizer, 100, 0)  # a long run: the update at step 3 falls before SEFT's freeze
    generator = torch.Generator().manual_seed(0)
    loaded = status_bytes("VmRSS")
    reset_peak_memory(torch.device("cpu"))
    window = None
    for step in range(1, STEPS + 1):
        ids = torch.randint(0, SMOLLM2_135M.vocab, (BATCH, SEQLEN), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        adapter.after_step()
        optimizer.zero_grad(set_to_none=False)  # the gradients stay allocated, as between steps of a run
        if step == STEPS - 1 and MEASURED[label].kind == "seft":  # the window opened at this step
            window = window_held(model)
    held = held_bytes(model, adapter.parameters, optimizer)
    trainable = sum(p.numel() for p in adapter.parameters)
    if MEASURED[label].kind == "masked_full":
        held["values"] = 0  # its trainable values are the model's own weights, which every method holds
        held["buffers"] = trainable  # its masks live in the adapter's closures, one bool per weight
        trainable = sum(int(torch.count_nonzero(p)) for p in adapter.parameters)
    return {"label": label, "trainable": trainable, "held": held, "window": window,
            "peak_increase": peak_memory(torch.device("cpu")) - loaded}


def measured_rows(results: list[dict]) -> list[list[str]]:
    rows = []
    work = Workload(batch=BATCH, seqlen=SEQLEN, weight_bytes=4, gradient_checkpointing=False)
    for result in results:
        estimate = training_memory(SMOLLM2_135M, MEASURED[result["label"]], work, "adamw")
        held = result["held"]
        measured_state = sum(held.values())
        projected_state = estimate.trainable_state + estimate.method_state
        rows.append([
            result["label"], f"{result['trainable']:,}",
            " + ".join(f"{held[k] / MIB:.1f}" for k in ("values", "gradients", "optimizer", "buffers")),
            f"{measured_state / MIB:.1f}", f"{projected_state / MIB:.1f}", f"{measured_state / projected_state:.3f}",
            f"{measured_state / result['trainable']:.1f}", f"{result['peak_increase'] / MIB:.0f}",
        ])
    return rows


def window_rows(results: list[dict]) -> list[list[str]]:
    work = Workload(batch=BATCH, seqlen=SEQLEN, weight_bytes=4, gradient_checkpointing=False)
    rows = []
    for result in results:
        window = result.get("window")
        if not window:
            continue
        trainable = result["trainable"]
        bound = training_memory(SMOLLM2_135M, MEASURED[result["label"]], work, "adamw").window
        rows.append([
            result["label"], f"{trainable:,}", f"{window['entries']:,}", f"{window['entries'] / trainable:.2f}",
            f"{window['held'] / MIB:.1f}", f"{window['counted'] / MIB:.1f}", f"{window['held'] / window['counted']:.3f}",
            f"{window['held'] / trainable:.1f}", f"{bound / MIB:.1f}", f"{window['sampled_layouts'] / MIB:.1f}",
        ])
    return rows


def projected_rows(shape: ModelShape, optimizer: str, gpus: int) -> list[list[str]]:
    work = Workload()
    rows = []
    for method in PROJECTED:
        e = training_memory(shape, method, work, optimizer)
        sharded = per_device_bytes(e, gpus)
        fits = " ".join(f"{g}" for g in GPUS if sharded <= g * GB) or "none"
        rows.append([method.label, f"{e.trainable / 1e6:,.1f}", f"{e.trainable_state / GB:.1f}", f"{e.method_state / GB:.1f}",
                     f"{e.transient / GB:.2f}", f"{e.window / GB:.1f}", f"{e.method_bytes / GB:.1f}", f"{e.total / GB:.1f}",
                     f"{sharded / GB:.1f}", fits])
    return rows


def report(results: list[dict]) -> str:
    work = Workload()
    lines = [
        "# Training memory per method: measured at 135M (CPU), projected to LLaMA-2-7B and 70B",
        "",
        f"Generated by `python benchmarks/memory.py`. {machine_description(torch.device('cpu'))}",
        "",
        "## Measured: what each method holds on SmolLM2-135M's shape",
        "",
        f"Random weights magnitude-pruned to 50%, fp32, torch AdamW, {STEPS} steps of {BATCH} × {SEQLEN} tokens, "
        "no gradient checkpointing, each method in its own process. Held: the bytes of the live tensors after the "
        "steps (trainable values + gradients + optimizer state + the method's buffers: positions and base values "
        "of deltas, bool masks), MiB; projected: `seft_trl.memory.training_memory` for the same shape and "
        "workload (trainable state + method state). Peak increase: resident memory at the peak of the steps "
        "over the loaded model (activations, logits and the transient buffers included).",
        "",
        markdown_table(["method", "trainable", "held: values + grads + optimizer + buffers (MiB)", "held MiB",
                        "projected MiB", "held / projected", "bytes per trainable", "peak increase MiB"],
                       measured_rows(results)),
        "",
        "## Measured: SEFT's accumulation windows",
        "",
        "For a few steps before each topology update every layer holds a window: for each delta and each growth "
        "or removal candidate an fp32 sum of the gradient (and the step's own sum from its backward to its "
        "close), for the deltas and growth candidates a sum of its square, and the candidates' positions "
        "(`seft_trl.window.WindowStatistics`). Read from the "
        f"live windows between steps {STEPS - 1} and {STEPS} (the window opened at step {STEPS - 1}); counted: "
        "`seft_trl.memory.window_bytes` for the same sizes; projected bound: the projection's count at the "
        "first update (every growth candidate a revival with its removal, the step's sum included). Sampled "
        "layouts: the CPU kernel's sorted copy of the positions, held besides where it samples (none under "
        "the dense product, which the cost rule takes on CUDA above 0.25% density).",
        "",
        markdown_table(["method", "deltas", "window entries", "entries per delta", "held MiB", "counted MiB",
                        "held / counted", "bytes per delta", "projected bound MiB", "sampled layouts MiB"],
                       window_rows(results)),
        "",
    ]
    for shape, name, gpus in ((LLAMA2_7B, "LLaMA-2-7B", 1), (LLAMA2_70B, "LLaMA-2-70B", 8)):
        for optimizer in ("adamw", "adamw_8bit"):
            lines += [
                f"## Projected: {name}, {optimizer}" + ("" if gpus == 1 else f", FSDP2 over {gpus} GPUs"),
                "",
                f"bf16 weights ({training_memory(shape, PROJECTED[0], work).weights / GB:.1f} GB), batch "
                f"{work.batch} × {work.seqlen} tokens, gradient checkpointing; activations "
                f"{training_memory(shape, PROJECTED[0], work).activations / GB:.1f} GB and logits "
                f"{training_memory(shape, PROJECTED[0], work).logits / GB:.1f} GB for every method. Sparse-delta "
                "densities are fractions of each layer's weights (0.125 = 25% of the surviving weights at 50%; "
                "0.0031 = LoRA r=8's count). Trainable state: values, gradients, optimizer state; method state: "
                "positions and base values of deltas, masks; transient: the largest short-lived buffer "
                "(SEFT: the dense gradient that opens one layer's window; masked LoRA, SPP: one decoder layer's "
                "dense effective weights and gradient); window: SEFT's accumulation windows of every layer at "
                "their first update's peak. Under FSDP2 the parameters, their gradients and optimizer state are "
                "sharded; buffers (positions, base values, masks) and SEFT's windows are whole on every rank. "
                "Arithmetic, not a measurement: no GPU was lent.",
                "",
                markdown_table(["method", "trainable (M)", "trainable state GB", "method state GB", "transient GB",
                                "window GB", "method total GB", "step total GB", f"per GPU ({gpus}) GB", "fits a GPU of (GB)"],
                               projected_rows(shape, optimizer, gpus)),
                "",
            ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=list(MEASURED), help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from <output-dir>/memory.json")
    parser.add_argument("--methods", type=lambda text: text.split(","), default=None,
                        help="measure only these (comma-separated labels); the others are read from memory.json")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return
    if args.report_only:
        write_report(report(json.loads((args.output_dir / "memory.json").read_text())["measured"]),
                     args.output_dir / "memory.md")
        return
    log = args.output_dir / "memory.json"
    kept = {r["label"]: r for r in json.loads(log.read_text())["measured"]} if args.methods and log.exists() else {}
    results = []
    for label in MEASURED:
        if label in kept and label not in args.methods:
            results.append(kept[label])
            continue
        done = subprocess.run([sys.executable, __file__, "--worker", label], capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(label, results[-1]["held"], flush=True)
    log.write_text(json.dumps(
        {"measured": results, "projected_methods": [asdict(m) for m in PROJECTED]}, indent=2) + "\n")
    write_report(report(results), args.output_dir / "memory.md")


if __name__ == "__main__":
    main()
