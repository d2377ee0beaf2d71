"""Step time and peak memory of SEFTSFTTrainer against TRL + peft LoRA, masked full fine-tuning and the floor.

Six ways to train the same pruned model on the same batches, each in its own process so that its
peak memory is its own, in rounds that run every method once (``--rounds``, default 3), so that a
slow spell of the machine falls on all methods alike rather than on one:

* ``floor``: the frozen pruned model, forward + a backward that computes input gradients only (the
  embedding output is the only tensor that requires grad), no optimizer. Every method pays at least
  this.
* ``trainer_floor``: ``trl.SFTTrainer`` training only the first layer's input norm: the floor plus the
  trainer's own per-step work, which every trainer method pays.
* ``seft``: ``SEFTSFTTrainer`` with as many deltas as LoRA r=8 has trainable parameters on the seven
  projections (q, k, v, o, gate, up, down).
* ``seft_mean_swap``: the same, its window and update swapping the mean drop fraction of a run at the
  defaults (0.1), which prices the average window of a whole run rather than the first, largest one.
* ``lora``: ``trl.SFTTrainer`` with a peft ``LoraConfig(r=8, lora_alpha=16, lora_dropout=0)`` on the
  same seven projections.
* ``masked_full``: ``trl.SFTTrainer`` training the seven projection weights, the gradient multiplied
  by the pruning mask and the weights re-masked after every optimizer step (dense optimizer state).

All trainers use torch AdamW, gradient checkpointing off, and ``--batch`` sequences of ``--seqlen``
tokens cut from the same text. A step is timed from ``on_step_begin`` to ``on_step_end`` (forward,
backward, clipping, optimizer, callbacks; batches are fetched before it); the first two steps are
warm-up and excluded; a method's step time is the median over the timed steps of all rounds. The
raw times of every round go to a JSON file beside the report, which a rerun with the same options
resumes from (a finished round is not run again). The SEFT run opens one accumulation window (the
default 5 steps) near the end, makes one topology update at its last step, swapping the default
initial drop fraction (0.2, the largest swap the defaults ever make), and takes one more step, the
first on the new topology; the window's extra time, the update and that step's extra time are
extrapolated to the default cadence (an update every 20 steps), see the report. Each worker also
times a fixed matmul, a 256 MiB copy and 256 MiB of freshly mapped memory before and after its run:
the report says when the matmul or the copy varied by more than 15% between runs, which no load
figure inside a virtual machine shows. Workers keep freed memory in glibc's heap (``ALLOCATOR_ENV``) rather
than faulting fresh pages in every step, whose cost here followed the host's load.
This script prepares the model and runs the workers; ``speed_report.py`` turns their raw times into
the report.

Models: on the CPU SmolLM2-135M-Instruct pruned with Wanda 50% (as ``make demo``; needs ``make
assets``); on CUDA a LLaMA-shaped random model (TinyLlama-1.1B's shapes, 16 of its 22 layers) in
bf16, pruned by magnitude (random weights have no activations worth calibrating on).

    python benchmarks/speed.py                                # SmolLM2-135M, CPU, 4 × 256 tokens
    python benchmarks/speed.py --device cuda                  # LLaMA-shaped ~0.8B, bf16, 4 × 1024 tokens
    python benchmarks/speed.py --quick --output /tmp/speed.md # tiny random model, seconds (the test)
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase
from transformers import TrainerCallback

from baselines import PROJECTIONS, lora_trainable_count, masked_full_adapter
from common import RESULTS_DIR, cpu_model, documentation_paragraphs, cpu_snapshot, others_load, synchronizer
from common import peak_memory, status_bytes, reset_peak_memory, write_report
from seft_trl import allocator
from seft_trl.apps.assets import english_texts, load_smollm2
from seft_trl.pruning import prune
from seft_trl.testing import byte_tokenizer, tiny_model
from speed_report import (DEFAULTS, LEARNING_RATE, LORA_ALPHA, LORA_RANK, METHODS, MIB, WARMUP_STEPS, mean_drop_fraction,
                          merge_rounds, report)

# trl, peft and datasets are imported inside the functions that use them: importing trl takes
# seconds, and the floor's process has no use for it.
if TYPE_CHECKING:
    from transformers import Trainer, TrainingArguments

# glibc in every worker: blocks of any size from the heap, and the heap never given back. By default
# blocks above 32 MiB (the logits, the optimizer's temporaries) are mapped fresh and returned on free,
# so each step faults their pages in again; inside this virtual machine that cost swung with the
# host's load (masked full fine-tuning 7-12 s a step against 4.1-4.4 s with these settings, back to
# back), which made rounds incomparable. Every method runs under the same allocator.
ALLOCATOR_ENV = allocator.ENVIRONMENT
SEQLEN = {"tiny": 64, "smollm2": 256, "llama-large": 1024}
# TinyLlama-1.1B's shapes with 16 of its 22 decoder layers: about 0.8B parameters.
LARGE_LLAMA = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
RESULT_TAG = "SPEED_RESULT "  # marks the worker's result line among the trainers' own prints


# ------------------------------------------------------------------------------ preparation (parent)
def build_model(preset: str, device: torch.device) -> tuple[nn.Module, PreTrainedTokenizerBase, list[str]]:
    """(dense model, tokenizer, training texts) of a preset."""
    if preset == "smollm2":
        model, tokenizer = load_smollm2()
        return model, tokenizer, english_texts()[0]
    if preset == "tiny":
        model = tiny_model("llama")
    else:
        torch.manual_seed(0)
        with device:  # initialise on the GPU: ~0.8B random weights take minutes on a CPU
            model = LlamaForCausalLM(LlamaConfig(**LARGE_LLAMA)).to(torch.bfloat16)
    return model, byte_tokenizer(), documentation_paragraphs()


def prepare(preset: str, device: torch.device, seqlen: int, folder: Path) -> dict:
    """Prune the preset's model once and save it with its tokenizer and the training chunks for the workers."""
    from seft_trl.text import training_chunks

    model, tokenizer, texts = build_model(preset, device)
    if preset == "smollm2":  # the demo's pruning
        report = prune(model, "wanda", sparsity=0.5, calibration=texts, tokenizer=tokenizer, nsamples=32, seqlen=512)
    else:  # random weights: no activations worth calibrating on
        report = prune(model, "magnitude", sparsity=0.5)
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    chunks = list(training_chunks(tokenizer, texts, seqlen)["text"])
    (folder / "chunks.json").write_text(json.dumps(chunks))
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "sparsity": report.sparsity,
        "chunks": len(chunks),
    }



# ---------------------------------------------------------------------------------- workers
class StepTimer(TrainerCallback):
    """Wall time of each optimizer step, keyed by its number (1-based); also usable without a Trainer.

    With ``peak``, also the memory peak so far at the end of each step, which shows in which steps
    the peak grew (a SEFT window's or the ordinary steps').
    """

    def __init__(self, sync: Callable[[], None], peak: Callable[[], int] | None = None) -> None:
        self.sync = sync
        self.peak = peak
        self.seconds: dict[int, float] = {}
        self.peaks: dict[int, int] = {}
        self._start = 0.0

    def begin(self) -> None:
        self.sync()  # queued GPU work of the previous step must not count in this one
        self._start = time.perf_counter()

    def end(self, step: int) -> None:
        self.sync()
        self.seconds[step] = time.perf_counter() - self._start
        if self.peak is not None:
            self.peaks[step] = self.peak()

    def on_step_begin(self, args, state, control, **kwargs):
        self.begin()

    def on_step_end(self, args, state, control, **kwargs):
        self.end(state.global_step)


@dataclass
class Run:
    """A method ready to train: its trainable count and the call that trains it."""

    trainable: int
    train: Callable[[], object]
    update_seconds: list[float] = field(default_factory=list)  # SEFT: each topology update, filled while training
    # Bytes the method keeps beside the frozen model, optimizer state excluded (SEFT: δ, positions
    # and base values; LoRA: A and B); None where the trained tensors are the model's own.
    state_bytes: int | None = None


def trainer_arguments(args: argparse.Namespace, method: str) -> dict:
    """SFTConfig keyword arguments shared by every trainer run."""
    device = torch.device(args.device)
    return dict(
        output_dir=str(Path(args.workdir) / method),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        max_length=args.seqlen,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        optim=args.optim,
        # trl defaults it on; off unless asked for, since it trades step time for memory
        activation_checkpointing=args.gradient_checkpointing,
        use_cpu=device.type == "cpu",
        bf16=device.type == "cuda",
        dataloader_drop_last=True,  # a short last batch of an epoch would be a faster step
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )


def make_trainer(trainer_cls: type[Trainer], config: TrainingArguments, model: nn.Module,
                 tokenizer: PreTrainedTokenizerBase, chunks: list[str], callbacks: list[TrainerCallback],
                 **kwargs) -> Trainer:
    """A trainer of ``trainer_cls`` on the training chunks (a "text" dataset, as the demo's)."""
    from datasets import Dataset

    dataset = Dataset.from_dict({"text": chunks})
    return trainer_cls(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                       callbacks=callbacks, **kwargs)


def floor_run(model: nn.Module, tokenizer: PreTrainedTokenizerBase, chunks: list[str], args: argparse.Namespace,
              timer: StepTimer) -> Run:
    model.requires_grad_(False)
    model.train()
    # The embedding output is the only tensor that requires grad, so backward computes input
    # gradients through every layer and no weight gradient at all.
    model.get_input_embeddings().register_forward_hook(lambda module, inputs, output: output.requires_grad_())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = torch.device(args.device)
    batches = []
    for start in range(0, len(chunks) - args.batch + 1, args.batch):
        batch = tokenizer(chunks[start : start + args.batch], truncation=True, max_length=args.seqlen,
                          padding="max_length", return_tensors="pt").to(device)
        batches.append((batch["input_ids"], batch["attention_mask"]))

    def train() -> None:
        for step in range(args.steps):
            input_ids, attention_mask = batches[step % len(batches)]
            timer.begin()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids).loss
            loss.backward()
            timer.end(step + 1)

    return Run(0, train)


def seft_run(model: nn.Module, tokenizer: PreTrainedTokenizerBase, chunks: list[str], args: argparse.Namespace,
             timer: StepTimer, drop_fraction: float = DEFAULTS.drop_fraction, method: str = "seft") -> Run:
    """SEFT whose one window and update swap ``drop_fraction`` (default: the defaults' first, largest swap)."""
    from seft_trl import SEFTConfig, SEFTSFTTrainer

    config = SEFTConfig(
        # One step past the update: the first step on the new topology rebuilds every layer's pattern.
        **{**trainer_arguments(args, method), "max_steps": args.steps + 1},
        # LoRA's count, or a density of every projection (num_deltas overrides density when set).
        seft_num_deltas=lora_trainable_count(model, LORA_RANK) if args.seft_density is None else None,
        seft_density=args.seft_density,
        seft_target_modules=PROJECTIONS,
        # One window and one update inside the short timed run: the window covers the last
        # accumulation_steps steps and the update comes at the last step, swapping the full
        # default drop fraction (constant schedule: a cosine would decay it over so few steps).
        seft_update_interval=args.steps,
        seft_accumulation_steps=DEFAULTS.accumulation_steps,
        seft_update_end=1.0,
        seft_drop_schedule="constant",
        seft_drop_fraction=drop_fraction,
    )
    trainer = make_trainer(SEFTSFTTrainer, config, model, tokenizer, chunks, [timer])
    layers = trainer.seft.layers.values()
    state = sum(t.nbytes for layer in layers for t in (layer.delta, layer.delta_index, layer.delta_base))
    run = Run(sum(layer.delta.numel() for layer in layers), trainer.train, state_bytes=state)
    engine, update = trainer.seft, trainer.seft.update_topology

    def timed_update(names=None):  # the engine calls self.update_topology(group), so the instance attribute wins
        timer.sync()
        start = time.perf_counter()
        stats = update(names)
        timer.sync()
        run.update_seconds.append(time.perf_counter() - start)
        return stats

    engine.update_topology = timed_update
    return run


def lora_run(model: nn.Module, tokenizer: PreTrainedTokenizerBase, chunks: list[str], args: argparse.Namespace,
             timer: StepTimer) -> Run:
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    lora = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=PROJECTIONS,
                      task_type="CAUSAL_LM")
    config = SFTConfig(**trainer_arguments(args, "lora"))
    trainer = make_trainer(SFTTrainer, config, model, tokenizer, chunks, [timer], peft_config=lora)
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    return Run(sum(p.numel() for p in trainable), trainer.train, state_bytes=sum(p.nbytes for p in trainable))


class AfterOptimizerStep(TrainerCallback):
    """Calls ``hook`` after every optimizer step (masked fine-tuning re-applies its mask there)."""

    def __init__(self, hook: Callable[[], None]) -> None:
        self.hook = hook

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.hook()


def masked_full_run(model: nn.Module, tokenizer: PreTrainedTokenizerBase, chunks: list[str], args: argparse.Namespace,
                    timer: StepTimer) -> Run:
    from trl import SFTConfig, SFTTrainer

    adapter = masked_full_adapter(model)  # masked gradients, weights re-masked after every step
    config = SFTConfig(**trainer_arguments(args, "masked_full"))
    trainer = make_trainer(SFTTrainer, config, model, tokenizer, chunks, [timer, AfterOptimizerStep(adapter.after_step)])
    # Only the support learns, though the optimizer holds dense state for every projection weight.
    return Run(sum(int(torch.count_nonzero(p)) for p in adapter.parameters), trainer.train)


def trainer_floor_run(model: nn.Module, tokenizer: PreTrainedTokenizerBase, chunks: list[str],
                      args: argparse.Namespace, timer: StepTimer) -> Run:
    from trl import SFTConfig, SFTTrainer

    # Only the first decoder layer's input norm learns: backward still runs through every layer
    # (input gradients), but computes no weight gradient of any size. What remains above the
    # floor is the trainer's per-step work (data collation, SFT's entropy and token-accuracy
    # metrics over the logits, clipping, the optimizer), which every trainer method pays.
    model.requires_grad_(False)
    norm = model.get_decoder().layers[0].input_layernorm.weight
    norm.requires_grad_(True)
    config = SFTConfig(**trainer_arguments(args, "trainer_floor"))
    trainer = make_trainer(SFTTrainer, config, model, tokenizer, chunks, [timer])
    return Run(norm.numel(), trainer.train)


def seft_mean_swap_run(model: nn.Module, tokenizer: PreTrainedTokenizerBase, chunks: list[str],
                       args: argparse.Namespace, timer: StepTimer) -> Run:
    """SEFT swapping the mean drop fraction of a run at the defaults: what a window costs on average."""
    return seft_run(model, tokenizer, chunks, args, timer, mean_drop_fraction(), "seft_mean_swap")


RUNS = {"floor": floor_run, "trainer_floor": trainer_floor_run, "seft": seft_run, "seft_mean_swap": seft_mean_swap_run,
        "lora": lora_run, "masked_full": masked_full_run}


def memory_in_use(device: torch.device) -> int:
    """Bytes in use now: allocated CUDA memory, or this process's resident set size."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else status_bytes("VmRSS")


def host_speed(device: torch.device) -> dict[str, float]:
    """How fast the host runs right now: a fixed fp32 matmul (GFLOP/s), a 256 MiB copy (GB/s) and
    256 MiB of fresh host memory written once (GB/s: page faults).

    A busy host shows in neither /proc/stat inside a virtual machine nor in the worker's own CPU
    time: timed around each run, the matmul and the copy tell a slow round from a slow method. The
    page faults' cost swung most of all, which the workers avoid by keeping their heap
    (``ALLOCATOR_ENV``); it is reported, not judged.
    """
    sync = synchronizer(device)
    a, b = torch.randn(1024, 1024, device=device), torch.randn(1024, 1024, device=device)
    source, target = torch.ones(64 * 2**20, device=device), torch.empty(64 * 2**20, device=device)
    a @ b, target.copy_(source)  # first touch
    sync()
    start = time.perf_counter()
    for _ in range(20):
        a @ b
    sync()
    matmul = 20 * 2 * 1024**3 / (time.perf_counter() - start) / 1e9
    start = time.perf_counter()
    for _ in range(4):
        target.copy_(source)
    sync()
    copy = 4 * 2 * source.nbytes / (time.perf_counter() - start) / 1e9  # read and write
    del source, target
    start = time.perf_counter()
    for _ in range(3):  # anonymous mappings: fresh pages every time, whatever the allocator keeps
        region = mmap.mmap(-1, 256 * MIB)
        pages = torch.frombuffer(region, dtype=torch.float32)
        pages.fill_(1.0)
        del pages
        region.close()
    fresh = 3 * 256 * MIB / (time.perf_counter() - start) / 1e9
    return {"matmul_gflops": matmul, "copy_gbps": copy, "fresh_gbps": fresh}


def worker(args: argparse.Namespace) -> None:
    """Train one method on the prepared model and print its measurements as one tagged JSON line."""
    device = torch.device(args.device)
    folder = Path(args.workdir)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(folder / "model", dtype=dtype).to(device)
    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    chunks = json.loads((folder / "chunks.json").read_text())
    timer = StepTimer(synchronizer(device), lambda: peak_memory(device))
    run = RUNS[args.worker](model, tokenizer, chunks, args, timer)

    host_before = host_speed(device)
    reset_peak_memory(device)
    before, snapshot, start = memory_in_use(device), cpu_snapshot(), time.perf_counter()
    run.train()
    timer.sync()
    seconds, peak = time.perf_counter() - start, peak_memory(device)
    host_after = host_speed(device)
    result = {
        "trainable": run.trainable,
        "train_seconds": seconds,
        "memory_before": before,
        "memory_peak": peak,
        "host": {key: min(host_before[key], host_after[key]) for key in host_before},  # the slower of the two
        "other_load": others_load(snapshot),
        "step_seconds": timer.seconds,
        "step_peaks": timer.peaks,
        "update_seconds": run.update_seconds,
        "state_bytes": run.state_bytes,
    }
    print(RESULT_TAG + json.dumps(result), flush=True)


def run_options(args: argparse.Namespace) -> dict:
    """The options that decide what a round measures, and the machine: a resumed run must share them."""
    options = {name: str(getattr(args, name)) for name in ("model", "device", "steps", "seqlen", "batch", "threads",
                                                            "optim", "gradient_checkpointing")}
    if args.seft_density is not None:  # absent at LoRA's count, as in the records written before the option
        options["seft_density"] = str(args.seft_density)
    return {**options, "methods": list(METHODS), "allocator": ALLOCATOR_ENV, "machine": cpu_model()}


def load_raw(path: Path, options: dict) -> dict:
    """The finished rounds of an earlier run with the same options, or an empty record."""
    if path.exists():
        raw = json.loads(path.read_text())
        if raw["options"] == options:
            for measured in raw["rounds"]:
                for result in measured.values():
                    with_step_keys(result)
            print(f"Resuming from {path}: {len(raw['rounds'])} round(s) done.", flush=True)
            return raw
        print(f"{path} holds rounds measured with other options; starting afresh.", flush=True)
    return {"options": options, "rounds": []}


def save_raw(raw: dict, path: Path) -> None:
    """Write the raw record atomically, so an interrupted run never leaves a torn file to resume from."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(raw, indent=1) + "\n")
    partial.replace(path)


def run_worker(method: str, args: argparse.Namespace, workdir: str) -> dict:
    """Run one method in a fresh process (its peak memory is then its own) and return its measurements."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", method, "--workdir", workdir,
               "--device", args.device, "--steps", str(args.steps), "--seqlen", str(args.seqlen),
               "--batch", str(args.batch), "--threads", str(args.threads), "--optim", args.optim,
               *(["--gradient-checkpointing"] if args.gradient_checkpointing else []),
               *([] if args.seft_density is None else ["--seft-density", str(args.seft_density)])]
    completed = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **ALLOCATOR_ENV})
    if completed.returncode != 0:
        raise SystemExit(f"The {method} worker failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-5000:]}")
    line = next(line for line in reversed(completed.stdout.splitlines()) if line.startswith(RESULT_TAG))
    result = json.loads(line[len(RESULT_TAG):])
    return with_step_keys(result)


def with_step_keys(result: dict) -> dict:
    """``result`` with its per-step records keyed by int step numbers again (JSON keys are strings)."""
    for key in ("step_seconds", "step_peaks"):
        result[key] = {int(step): value for step, value in result.get(key, {}).items()}
    return result



# -------------------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--model", choices=sorted(SEQLEN), default=None,
        help="default: llama-large on CUDA, else smollm2 (tiny with --quick)")
    add("--device", default=None, help="cpu or cuda (default: cuda when available)")
    add("--steps", type=int, default=None, help="optimizer steps per method and round (default 12, 8 with --quick)")
    add("--rounds", type=int, default=None, help="rounds that run every method once (default 3, 1 with --quick)")
    add("--seqlen", type=int, default=None, help="tokens per sequence (default: 64 tiny, 256 smollm2, 1024 large)")
    add("--batch", type=int, default=4, help="sequences per step")
    add("--threads", type=int, default=None, help="torch CPU threads (default: torch's, one per core; 1 with --quick)")
    add("--optim", default="adamw_torch", help="the Trainer's optim for every method (e.g. adamw_8bit)")
    add("--gradient-checkpointing", action="store_true", help="activation checkpointing for every method")
    add("--seft-density", type=float, default=None,
        help="SEFT's deltas as this fraction of every projection (default: as many as LoRA r=8 trains)")
    add("--quick", action="store_true", help="the tiny random model: a check that everything runs, in seconds")
    add("--output", type=Path, default=None, help="default: results/speed.md (results/speed_quick.md with --quick)")
    add("--worker", choices=METHODS, help=argparse.SUPPRESS)
    add("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.model = args.model or ("tiny" if args.quick else "llama-large" if args.device == "cuda" else "smollm2")
    args.steps = args.steps or (8 if args.quick else 12)
    args.rounds = args.rounds or (1 if args.quick else 3)
    # The tiny model's steps take milliseconds on one thread but can take a hundred times longer
    # on two when another process holds a core (the threads wait for each other).
    args.threads = args.threads or (1 if args.quick else torch.get_num_threads())
    args.seqlen = args.seqlen or SEQLEN[args.model]
    args.output = args.output or RESULTS_DIR / ("speed_quick.md" if args.quick else "speed.md")
    if args.seft_density is not None and not 0.0 < args.seft_density <= 1.0:
        parser.error(f"--seft-density must lie in (0, 1], got {args.seft_density}; 0.1 means 10% of each projection.")
    minimum = WARMUP_STEPS + DEFAULTS.accumulation_steps + 1
    if args.steps < minimum:
        parser.error(f"--steps must be at least {minimum}: warm-up, one ordinary step and one accumulation window.")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        worker(args)
        return
    started = time.perf_counter()
    raw_path = args.output.with_suffix(".json")
    raw = load_raw(raw_path, run_options(args))
    earlier_wall = raw.get("wall_seconds", 0.0)
    with tempfile.TemporaryDirectory(prefix="seft-speed-") as workdir:
        if len(raw["rounds"]) < args.rounds or "prepared" not in raw:  # else only the report is rebuilt
            print(f"Pruning {args.model} once for every method ...", flush=True)
            raw["prepared"] = prepare(args.model, torch.device(args.device), args.seqlen, Path(workdir))
        if args.device == "cuda":
            torch.cuda.empty_cache()  # the parent's cached blocks would crowd the workers' GPU memory
        while len(raw["rounds"]) < args.rounds:
            number = len(raw["rounds"]) + 1
            measured = {}
            for method in METHODS:
                measured[method] = run_worker(method, args, workdir)
                print(f"round {number}, {method}: trained in {measured[method]['train_seconds']:.1f} s", flush=True)
            raw["rounds"].append(measured)
            raw["wall_seconds"] = earlier_wall + time.perf_counter() - started
            save_raw(raw, raw_path)
    results = {method: merge_rounds([measured[method] for measured in raw["rounds"]], args.steps) for method in METHODS}
    write_report(report(args, raw["prepared"], results, raw["wall_seconds"]), args.output)


if __name__ == "__main__":
    main()
