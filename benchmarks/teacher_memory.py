"""What the dense parent costs as a teacher, and the ways down: measured on SmolLM2-135M, projected to 7B and 8B.

A teacher doubles the weights a repair holds. The options, all through ``teacher_model_init_kwargs``
(seft_trl.trainer.teacher.load_teacher, as users load it):

* ``fp32`` / ``bf16``: the parent as it is (on the CPU the student computes in fp32);
* ``int8``: bitsandbytes' LLM.int8 weights (``{"quantization_config": {"load_in_8bit": true}}``);
* ``nf4``: bitsandbytes' 4-bit NormalFloat weights (``{"load_in_4bit": true, "bnb_4bit_quant_type": "nf4"}``);
* FSDP2 (not measured here): the teacher is sharded like the student, 1/N of it on each of N GPUs.

Each option runs in a process of its own (so its peak resident memory is its own): SEFT at
``density=0.01`` on a magnitude-pruned (50%) SmolLM2, AdamW, batch 4 × 256 tokens of Wikipedia,
the distillation loss of SEFTConfig's defaults (``none``: plain CE through TRL's fused LM head, as
SFTTrainer computes it, without a teacher). Measured: resident
memory after loading, the peak over the steps, the median step time, the teacher's bytes, and the
teacher's own perplexity on 4,096 Wikipedia test tokens (what quantization costs the teacher).
The 7B/8B table is arithmetic over the same byte counts: no GPU was lent to measure it.

    python benchmarks/teacher_memory.py            # about 10 min on 2 cores (bf16 matmuls are slow on a CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import RESULTS_DIR, machine_description, markdown_table, peak_memory, reset_peak_memory, status_bytes
from seft_trl.memory import LLAMA2_7B, Method, ModelShape, Workload, training_memory

OPTIONS = {
    "none": None,
    "fp32": {"dtype": "float32"},
    "bf16": {"dtype": "bfloat16"},
    "int8": {"quantization_config": {"load_in_8bit": True}},
    "nf4": {"quantization_config": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                    "bnb_4bit_compute_dtype": "float32"}},
}
STEPS, BATCH, SEQLEN, PPL_TOKENS = 6, 4, 256, 4096


def worker(option: str) -> dict:
    """One option's measurements, in this process."""
    from seft_trl import SparsityEvolution, SparsityEvolutionConfig
    from seft_trl.apps.assets import DEFAULT_SMOLLM2_CACHE, load_smollm2, wikipedia_texts
    from seft_trl.distillation import DistillationLoss, add_backbone_forward, distillation_loss
    from seft_trl.evaluation import perplexity
    from seft_trl.pruning import prune
    from seft_trl.text import token_ids
    from seft_trl.trainer.teacher import load_teacher

    model, tokenizer = load_smollm2()
    prune(model, method="magnitude", sparsity=0.5, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                  "gate_proj", "up_proj", "down_proj"])
    train, _, test = wikipedia_texts()
    ids = token_ids(tokenizer, train[:8])[: STEPS * BATCH * SEQLEN].view(STEPS, BATCH, SEQLEN)
    resident_student = status_bytes("VmRSS")
    teacher, teacher_bytes, teacher_ppl = None, 0, None
    if OPTIONS[option] is not None:
        teacher = load_teacher(Path(DEFAULT_SMOLLM2_CACHE).expanduser(), OPTIONS[option], torch.float32)
        teacher_bytes = sum(t.numel() * t.element_size() for t in (*teacher.parameters(), *teacher.buffers()))
        teacher_ppl = perplexity(teacher, None, token_ids(tokenizer, test)[:PPL_TOKENS], seqlen=512, progress=False)
        add_backbone_forward(teacher)
    resident = status_bytes("VmRSS")
    if teacher is None:
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model)
    seft = SparsityEvolution(model, SparsityEvolutionConfig(density=0.01, target_modules=["q_proj", "k_proj", "v_proj",
                                                            "o_proj", "gate_proj", "up_proj", "down_proj"]))
    optimizer = torch.optim.AdamW(seft.parameters(), lr=3e-3)
    seft.attach(optimizer, total_steps=STEPS)
    model.train()
    reset_peak_memory(torch.device("cpu"))
    times = []
    for batch in ids:
        started = time.perf_counter()
        if teacher is None:  # SFTTrainer's own CE path: TRL's fused LM head, which never builds the logits either
            loss = model(input_ids=batch, labels=batch, fused_lm_head=True).loss
        else:
            loss = distillation_loss(add_backbone_forward(model), teacher, {"input_ids": batch, "labels": batch},
                                     DistillationLoss()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return {"option": option, "resident_student_mb": resident_student / 2**20, "resident_mb": resident / 2**20,
            "peak_mb": peak_memory(torch.device("cpu")) / 2**20, "step_s": statistics.median(times[1:]),
            "teacher_mb": teacher_bytes / 2**20, "teacher_ppl": teacher_ppl}


# ------------------------------------------------------------------------------------------ projection
# bytes per weight of the teacher's projections, and what each option keeps in bf16 (embeddings, LM head, norms)
BYTES_PER_PROJECTION_WEIGHT = {"bf16": 2.0, "int8": 1.0, "nf4": 0.5 + 4 / 64}  # nf4: one fp32 absmax per 64
SHAPES = {
    "LLaMA-2-7B": LLAMA2_7B,
    "LLaMA-3-8B": ModelShape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256),
}
GPUS = 8


def projection_rows() -> list[list[str]]:
    rows = []
    for name, shape in SHAPES.items():
        e = training_memory(shape, Method("seft", density=0.01), Workload(), "adamw_8bit")
        student_whole = e.method_state + e.window + e.transient  # buffers and windows: whole on every rank
        student = e.weights + e.trainable_state + student_whole
        projections = shape.projection_weights
        rest = shape.parameters - projections
        rows_out = shape.layers * sum(out for out, _ in shape.projections())  # int8's fp32 scale per output row
        for option, per_weight in BYTES_PER_PROJECTION_WEIGHT.items():
            teacher = per_weight * projections + 2 * rest + (4 * rows_out if option == "int8" else 0)
            per_gpu = (e.weights + e.trainable_state + teacher) / GPUS + student_whole
            rows.append([name, option, f"{student / 1e9:.1f}", f"{teacher / 1e9:.1f}", f"{(student + teacher) / 1e9:.1f}",
                         f"{per_gpu / 1e9:.1f}"])
    return rows


def projection_section() -> str:
    return "\n".join([
        "## Projected: a 7B/8B student at seft_density 0.01 with its teacher (GB, weights and SEFT state; "
        "activations come on top)", "",
        "Student: `seft_trl.memory.training_memory` with 8-bit AdamW: bf16 weights, 16 bytes per delta (δ and its "
        "gradient in fp32, int32 position, bf16 base, 8-bit Adam), the accumulation windows of every layer at "
        "their peak and the dense gradient that opens one (`memory.md`). Teacher: its projections at the option's "
        "bytes per weight (int8: plus an fp32 scale per output row; nf4: plus an fp32 absmax per 64 weights), "
        f"embeddings, LM head and norms in bf16. FSDP2 over {GPUS} GPUs shards both models' parameters, the "
        "deltas' gradients and optimizer state; SEFT's buffers and windows stay whole on every rank: the last "
        "column is per GPU. Arithmetic, not a measurement: no GPU was lent.", "",
        markdown_table(["model", "teacher", "student GB", "teacher GB", "together GB", f"per GPU, FSDP2 × {GPUS}"],
                       projection_rows()), "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=sorted(OPTIONS), help=argparse.SUPPRESS)
    parser.add_argument("--output", default=str(RESULTS_DIR / "teacher_memory.md"))
    parser.add_argument("--projection-only", action="store_true",
                        help="rewrite only the projection section of an existing report (no measurement)")
    args = parser.parse_args()
    if args.projection_only:
        text = Path(args.output).read_text()
        heading = text.index("## Projected: ")
        Path(args.output).write_text(text[:heading] + projection_section() + "\n")
        return
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return
    measured = []
    for option in OPTIONS:
        done = subprocess.run([sys.executable, __file__, "--worker", option], capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True)
        measured.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(measured[-1], flush=True)
    base = measured[0]
    rows = [[m["option"], f"{m['teacher_mb']:.0f}", f"{m['resident_mb'] - base['resident_mb']:+.0f}",
             f"{m['peak_mb']:.0f}", f"{m['peak_mb'] - base['peak_mb']:+.0f}", f"{m['step_s']:.2f}",
             "-" if m["teacher_ppl"] is None else f"{m['teacher_ppl']:.2f}"] for m in measured]
    text = "\n".join([
        "# The teacher's memory: measured on SmolLM2-135M (CPU), projected to 7B and 8B", "",
        f"Generated by `python benchmarks/teacher_memory.py`. {machine_description(torch.device('cpu'))}", "",
        f"SEFT at density 0.01 on a magnitude-pruned (50%) SmolLM2-135M-Instruct, AdamW, {STEPS} steps of "
        f"{BATCH} × {SEQLEN} Wikipedia tokens, distilled with SEFTConfig's default loss from the dense model held "
        "as each option loads it (`teacher_model_init_kwargs`); `none`: plain CE without a teacher, through TRL's fused LM "
        "head as SFTTrainer computes it. Each option "
        f"ran in its own process. Teacher perplexity: the teacher alone on {PPL_TOKENS:,} Wikipedia test tokens "
        "(what the option costs the teacher itself).", "",
        markdown_table(["teacher", "teacher MiB", "resident vs none", "peak RSS MiB", "peak vs none",
                        "step s (median)", "teacher ppl"], rows), "",
        projection_section(),
    ])
    Path(args.output).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
