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
import statistics
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
from common import RESULTS_DIR, cpu_model, documentation_paragraphs, cpu_snapshot, machine_description, markdown_table, others_load, synchronizer
from common import peak_memory, status_bytes, reset_peak_memory, write_report
from seft_trl import allocator
from seft_trl.apps.assets import english_texts, load_smollm2
from seft_trl.config import SparsityEvolutionConfig
from seft_trl.pruning import prune
from seft_trl.testing import byte_tokenizer, tiny_model
from seft_trl.topology import drop_fraction_at, is_update_step

# trl, peft and datasets are imported inside the functions that use them: importing trl takes
# seconds, and the floor's process has no use for it.
if TYPE_CHECKING:
    from transformers import Trainer, TrainingArguments

METHODS = ("floor", "trainer_floor", "seft", "seft_mean_swap", "lora", "masked_full")
SEFT_METHODS = ("seft", "seft_mean_swap")  # their window and update steps are reported apart
DESCRIPTIONS = {
    "floor": "frozen model, forward + input-gradient-only backward, no optimizer",
    "trainer_floor": "SFTTrainer training only the first layer's input norm: the floor plus the trainer's own per-step cost",
    "seft": "SEFTSFTTrainer, ordinary steps (outside accumulation windows)",
    "seft_mean_swap": "the same, its window and update swapping the mean drop fraction of a run at the defaults",
    "lora": "SFTTrainer + peft LoRA r=8",
    "masked_full": "SFTTrainer, projection weights trained under the pruning mask",
}
LORA_RANK, LORA_ALPHA = 8, 16
WARMUP_STEPS = 2
# glibc in every worker: blocks of any size from the heap, and the heap never given back. By default
# blocks above 32 MiB (the logits, the optimizer's temporaries) are mapped fresh and returned on free,
# so each step faults their pages in again; inside this virtual machine that cost swung with the
# host's load (masked full fine-tuning 7-12 s a step against 4.1-4.4 s with these settings, back to
# back), which made rounds incomparable. Every method runs under the same allocator.
ALLOCATOR_ENV = allocator.ENVIRONMENT
HOST_SPREAD_LIMIT = 0.85  # slowest / fastest host probe below this: the runs ran on different machines, in effect
LEARNING_RATE = 1e-4
DEFAULTS = SparsityEvolutionConfig()  # the cadence the extrapolation targets (update_interval, accumulation_steps)
SEQLEN = {"tiny": 64, "smollm2": 256, "llama-large": 1024}
MODEL_NAMES = {
    "tiny": "tiny random LLaMA (seft_trl.testing)",
    "smollm2": "SmolLM2-135M-Instruct",
    "llama-large": "LLaMA-shaped random model (TinyLlama-1.1B shapes, 16 layers)",
}
PRUNING = {
    "tiny": "by magnitude, 50% per layer (random weights)",
    "smollm2": "with Wanda, 50% unstructured (32 calibration windows of 512 tokens, as the demo)",
    "llama-large": "by magnitude, 50% per layer (random weights)",
}
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
TINY_NOTE = (
    "**The tiny model only checks that the benchmark runs**: the trainers' fixed per-step costs dominate its "
    "milliseconds of compute, so its ratios say nothing about real models."
)
# A run at the defaults of this many steps sets the mean drop fraction the seft_mean_swap run swaps.
NOMINAL_RUN_STEPS = 1000
RESULT_TAG = "SPEED_RESULT "  # marks the worker's result line among the trainers' own prints
MIB = 2**20


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


def run_swaps(total_steps: int = NOMINAL_RUN_STEPS) -> list[float]:
    """The drop fractions of the topology updates of a run of ``total_steps`` at the defaults, in order.

    Updates come every ``update_interval`` steps up to ``update_end`` of the run, and one whose
    scheduled fraction is 0 opens no window (the engine's rule).
    """
    end_step = int(DEFAULTS.update_end * total_steps)
    steps = range(DEFAULTS.update_interval, total_steps + 1, DEFAULTS.update_interval)
    fractions = [drop_fraction_at(step, end_step, DEFAULTS.drop_fraction, DEFAULTS.drop_schedule)
                 for step in steps if is_update_step(step, DEFAULTS.update_interval, end_step)]
    return [fraction for fraction in fractions if fraction > 0]


def mean_drop_fraction() -> float:
    """The mean fraction the updates of a nominal run at the defaults swap (0.1 under the cosine decay)."""
    swaps = run_swaps()
    return sum(swaps) / len(swaps)


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
        seft_num_deltas=lora_trainable_count(model, LORA_RANK),
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
               *(["--gradient-checkpointing"] if args.gradient_checkpointing else [])]
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


# ------------------------------------------------------------------------------------ report
@dataclass
class SeftBreakdown:
    """SEFT's step times split by kind, and the topology share measured and extrapolated to the defaults."""

    ordinary: float  # median ordinary step (s)
    window: dict[int, float]  # step -> seconds: the window's (the update step without the update) and the next
    update: float  # seconds in update_topology
    window_extra: float  # those steps beyond as many ordinary steps (s)
    train_seconds: float

    @property
    def topology_seconds(self) -> float:
        return self.update + self.window_extra

    @property
    def share_at_defaults(self) -> float:
        cycle = DEFAULTS.update_interval * self.ordinary + self.topology_seconds
        return self.topology_seconds / cycle

    @property
    def amortized_step(self) -> float:
        """Mean step time over one default update cycle (update_interval steps)."""
        return self.ordinary + self.topology_seconds / DEFAULTS.update_interval



@dataclass
class RunEstimate:
    """The topology's cost over a whole run at the defaults (``NOMINAL_RUN_STEPS`` steps).

    The run's windows swap fractions decaying from the full drop fraction to 0, and a window's
    cost grows with its fraction (candidates tracked, ranked and planned) on top of a part that
    does not (the dense gradient, the passes over every weight). Taking that growth as linear,
    the window at the mean fraction costs the mean window.
    """

    ordinary: float  # SEFT's ordinary step (s)
    window_cost: float  # one window and its update beyond as many ordinary steps (s)
    windows_per_step: float  # windows (= updates) per optimizer step of the run

    @property
    def topology_per_step(self) -> float:
        return self.windows_per_step * self.window_cost

    @property
    def share(self) -> float:
        return self.topology_per_step / (self.ordinary + self.topology_per_step)

    @property
    def amortized_step(self) -> float:
        return self.ordinary + self.topology_per_step


def run_estimate(ordinary: float, window_cost: float) -> RunEstimate:
    return RunEstimate(ordinary, window_cost, len(run_swaps()) / NOMINAL_RUN_STEPS)


def first_window_step(steps: int) -> int:
    """The first step of the SEFT runs' one accumulation window, which ends at the last step."""
    return steps - DEFAULTS.accumulation_steps + 1


def merge_rounds(rounds: list[dict], steps: int) -> dict:
    """One method's measurements over all rounds: step times kept per round, the rest as medians."""
    median = statistics.median
    return {
        "trainable": rounds[0]["trainable"],
        "state_bytes": rounds[0]["state_bytes"],
        "train_seconds": median(r["train_seconds"] for r in rounds),
        # A peak is what the machine must hold: the highest of the rounds. Between identical runs it
        # moves by hundreds of MiB (where the allocator happens to place the activations), so the
        # rounds' own peaks are kept beside it.
        "memory_peak": max(r["memory_peak"] for r in rounds),
        "memory_peak_median": median(r["memory_peak"] for r in rounds),
        "memory_increment": median(r["memory_peak"] - r["memory_before"] for r in rounds),
        # The peak through the step before SEFT's window opens (the same step in every method's run).
        "memory_peak_before_window": max((r["step_peaks"].get(first_window_step(steps) - 1, 0) for r in rounds),
                                         default=0),
        "other_load": max(r["other_load"] for r in rounds),
        "rounds": rounds,
    }


def timed_steps(round_result: dict) -> dict[int, float]:
    return {step: seconds for step, seconds in round_result["step_seconds"].items() if step > WARMUP_STEPS}


def seft_breakdown(result: dict, steps: int) -> SeftBreakdown:
    """Ordinary steps pooled over the rounds; each window step, the step after the update and the update
    itself as medians over the rounds."""
    window_steps = range(first_window_step(steps), steps + 2)
    ordinary, updates, windows = [], [], []
    for round_result in result["rounds"]:
        if len(round_result["update_seconds"]) != 1:
            raise RuntimeError(f"A SEFT run made {len(round_result['update_seconds'])} topology updates, not one.")
        timed = timed_steps(round_result)
        update = sum(round_result["update_seconds"])
        ordinary += [seconds for step, seconds in timed.items() if step not in window_steps]
        updates.append(update)
        windows.append({step: timed[step] - (update if step == steps else 0.0) for step in window_steps})
    ordinary_step = statistics.median(ordinary)
    window = {step: statistics.median(w[step] for w in windows) for step in window_steps}
    extra = sum(window.values()) - len(window) * ordinary_step
    return SeftBreakdown(ordinary_step, window, statistics.median(updates), extra, result["train_seconds"])


def training_increment(result: dict) -> int:
    return result["memory_increment"]


def round_medians(result: dict, window_steps: range) -> list[float]:
    """Each round's median timed step (for SEFT, of its ordinary steps): the spread between rounds."""
    return [statistics.median(s for step, s in timed_steps(r).items() if step not in window_steps)
            for r in result["rounds"]]


def median_step(method: str, result: dict, steps: int) -> float:
    """The median timed step; of a SEFT run, of its ordinary steps."""
    if method in SEFT_METHODS:
        return seft_breakdown(result, steps).ordinary
    return statistics.median(s for r in result["rounds"] for s in timed_steps(r).values())


def verdict(value: float, goal: float) -> str:
    return "met" if value <= goal else "not met"


def results_table(results: dict[str, dict], seft: SeftBreakdown, unit: str, n_steps: int) -> str:
    steps = {method: median_step(method, result, n_steps) for method, result in results.items()}
    window_steps = range(min(seft.window), max(seft.window) + 1)
    lora = results["lora"]
    rows = []
    for method, result in results.items():
        increment = training_increment(result)
        excluded = window_steps if method in SEFT_METHODS else range(0)
        rows.append([
            method,
            DESCRIPTIONS[method],
            f"{result['trainable']:,}",
            f"{steps[method]:.3f}",
            ", ".join(f"{seconds:.2f}" for seconds in round_medians(result, excluded)),
            f"{steps[method] / steps['floor']:.2f}",
            f"{steps[method] / steps['lora']:.2f}",
            f"{result['memory_peak'] / MIB:.0f}",
            ", ".join(f"{r['memory_peak'] / MIB:.0f}" for r in result["rounds"]),
            f"{increment / MIB:.0f}",
            f"{result['memory_peak'] / lora['memory_peak']:.2f}",
            f"{increment / training_increment(lora):.2f}",
            "—" if result.get("state_bytes") is None else f"{result['state_bytes'] / result['trainable']:.1f}",
            f"{result['other_load']:.2f}",
        ])
    headers = ["method", "what", "trainable params", "median step (s)", "round medians (s)", "× floor", "× LoRA", f"peak {unit} (MiB)",
               "round peaks (MiB)", "increment during training (MiB)", "peak × LoRA", "increment × LoRA", "own state (B per trainable)",
               "other load (cores)"]
    return markdown_table(headers, rows)


def breakdown_text(seft: SeftBreakdown, mean_swap: SeftBreakdown, run: RunEstimate, steps: int, rounds: int) -> str:
    window = ", ".join(f"step {step}: {seconds:.3f} s" for step, seconds in seft.window.items())
    interval, accumulation = DEFAULTS.update_interval, DEFAULTS.accumulation_steps
    first, last = WARMUP_STEPS + 1, steps - accumulation
    ordinary_steps = f"step {first}" if first == last else f"steps {first} to {last}"
    return "\n".join([
        "## SEFT: ordinary steps, accumulation window, topology update",
        "",
        f"* Ordinary step (median of {ordinary_steps} of {rounds} round(s)): {seft.ordinary:.3f} s.",
        f"* Window steps and the step after the update (medians over the rounds; {window}; the first picks candidates "
        "from one dense weight gradient per layer, the window's last excludes the update itself, the step after it "
        "builds every layer's sampling pattern for the new positions): "
        f"{seft.window_extra:.3f} s more than {len(seft.window)} ordinary steps in all.",
        f"* Topology update (`update_topology`, one call, median over the rounds): {seft.update:.3f} s.",
        f"* Measured in this run: the update took {seft.update / seft.train_seconds:.1%} of the training wall time "
        f"({seft.train_seconds:.1f} s), update + window overhead {seft.topology_seconds / seft.train_seconds:.1%}; "
        f"this run packs one update into {steps} steps, so these shares overstate the defaults.",
        f"* Extrapolated to the defaults (an update every {interval} steps, windows of {accumulation}): "
        f"share = (update + window overhead) / ({interval} × ordinary step + update + window overhead) = "
        f"({seft.update:.3f} + {seft.window_extra:.3f}) / ({interval} × {seft.ordinary:.3f} + "
        f"{seft.topology_seconds:.3f}) = **{seft.share_at_defaults:.1%}**; amortized step "
        f"= ordinary + (update + window overhead) / {interval} = **{seft.amortized_step:.3f} s**.",
        f"* Over a whole run at the defaults: a run of {NOMINAL_RUN_STEPS} steps has {len(run_swaps())} windows, in "
        f"the first {DEFAULTS.update_end:.0%} of its steps, whose drop fraction decays from {DEFAULTS.drop_fraction} "
        f"to 0 ({DEFAULTS.drop_schedule}; mean {mean_drop_fraction():.3f}). The seft_mean_swap run swaps that mean: "
        f"update {mean_swap.update:.3f} s + window overhead {mean_swap.window_extra:.3f} s = "
        f"{mean_swap.topology_seconds:.3f} s a window (window steps: "
        + ", ".join(f"step {step}: {seconds:.3f} s" for step, seconds in mean_swap.window.items())
        + f"; its ordinary step {mean_swap.ordinary:.3f} s). Taking a window's cost as linear in its fraction, that is "
        f"the mean window: share = {run.windows_per_step:.3f} windows a step × {run.window_cost:.3f} s / (ordinary "
        f"step {run.ordinary:.3f} s + that) = **{run.share:.1%}**; amortized step **{run.amortized_step:.3f} s**. "
        f"Every window at the first's cost (an upper bound): "
        f"{run_estimate(run.ordinary, seft.topology_seconds).share:.1%}.",
    ])


def goals_text(results: dict[str, dict], seft: SeftBreakdown, run: RunEstimate, unit: str, steps: int) -> str:
    """The goals of issue 11, each with the measured value and whether it was met."""
    lora_step = median_step("lora", results["lora"], steps)
    trainer_floor = median_step("trainer_floor", results["trainer_floor"], steps)
    seft_result, lora = results["seft"], results["lora"]
    peak = seft_result["memory_peak"] / lora["memory_peak"]
    median_peak = seft_result["memory_peak_median"] / lora["memory_peak_median"]
    increment = training_increment(seft_result) / training_increment(lora)
    amortized, ordinary = seft.amortized_step / lora_step, seft.ordinary / lora_step
    run_amortized = run.amortized_step / lora_step
    to_trainer_floor = seft.amortized_step / trainer_floor
    own_bytes = seft_result["state_bytes"] / seft_result["trainable"]
    before = [result["memory_peak_before_window"] for result in (seft_result, lora)]
    before_window = (
        f" Before SEFT's window opens (the peak through step {first_window_step(steps) - 1}, the highest of the "
        f"rounds): SEFT {before[0] / MIB:.0f} MiB, LoRA {before[1] / MIB:.0f} MiB ({before[0] / before[1]:.2f}×)."
        if all(before) else ""
    )
    return "\n".join([
        "## Goals",
        "",
        f"* SEFT's step amortized at the defaults ≤ 1.0× LoRA's: {amortized:.3f}× over an update interval while "
        f"updates run — {verdict(amortized, 1.0)}; over a whole run at the defaults "
        f"{run_amortized:.3f}× — {verdict(run_amortized, 1.0)}; the ordinary step alone: {ordinary:.3f}× — "
        f"{verdict(ordinary, 1.0)}.",
        f"* Stretch, ≤ 1.10× the trainer floor (the same trainer, no adapter): {to_trainer_floor:.2f}× — "
        f"{verdict(to_trainer_floor, 1.10)} (LoRA: {lora_step / trainer_floor:.2f}×).",
        f"* Topology updates plus window overhead ≤ 2% of wall time at the defaults: {seft.share_at_defaults:.1%} "
        f"of an update interval at the first, largest swap (extrapolated) — {verdict(seft.share_at_defaults, 0.02)}; "
        f"{run.share:.1%} of a whole run (windows at the mean swap) — {verdict(run.share, 0.02)}.",
        f"* Whole-process peak memory ≤ LoRA's: {peak:.2f}× the peak {unit} (the highest of the rounds) — "
        f"{verdict(peak, 1.0)}; the rounds' median peaks: {median_peak:.2f}× — {verdict(median_peak, 1.0)}; "
        f"the increment during training (median): {increment:.2f}× — {verdict(increment, 1.0)}.{before_window}",
        f"* SEFT's own state ≤ 12 B per delta (optimizer state excluded): {own_bytes:.1f} B — {verdict(own_bytes, 12.0)}.",
        "",
    ])


def contention_text(results: dict[str, dict]) -> str:
    # common.contention_note would count the workers' CPU time as other processes' (it only
    # subtracts the calling process's own), so each worker measures the others' load itself.
    worst = max(result["other_load"] for result in results.values())
    verdict_text = "the times are inflated" if worst > 0.1 else "the machine was quiet"
    lines = [
        f"Other processes kept up to {worst:.2f} of the cores busy on average while a method trained (column "
        f"'other load': /proc/stat busy time minus the worker's CPU time): {verdict_text}."
    ]
    probes = [(method, index + 1, r["host"]) for method, result in results.items()
              for index, r in enumerate(result["rounds"]) if "host" in r]
    if probes:
        spread = {}
        for key, what, unit in (("matmul_gflops", "a 1024² matmul", "GFLOP/s"), ("copy_gbps", "a 256 MiB copy", "GB/s"),
                                ("fresh_gbps", "256 MiB of freshly mapped memory (page faults)", "GB/s")):
            values = [probe[key] for _, _, probe in probes]
            spread[key] = min(values) / max(values)
            slowest = min(probes, key=lambda probe: probe[2][key])
            lines.append(f"Host probe, {what} (timed before and after each run, the slower kept): "
                         f"{min(values):.1f}-{max(values):.1f} {unit} over the runs, the slowest {slowest[0]} in "
                         f"round {slowest[1]}.")
        steady = min(spread["matmul_gflops"], spread["copy_gbps"]) >= HOST_SPREAD_LIMIT
        lines.append("Page faults reach the workers only while their heap grows (the allocator setting above), so "
                     "that probe is reported, not judged.")
        lines.append("The host ran at a steady speed (matmul and copy)." if steady else
                     f"The host's speed varied by more than {1 - HOST_SPREAD_LIMIT:.0%} between runs: the methods' "
                     "times are not comparable; rerun on a quiet host.")
    return " ".join(lines)


def report(args: argparse.Namespace, prepared: dict, results: dict[str, dict], wall: float) -> str:
    device = torch.device(args.device)
    seft = seft_breakdown(results["seft"], args.steps)
    mean_swap = seft_breakdown(results["seft_mean_swap"], args.steps)
    run = run_estimate(seft.ordinary, mean_swap.topology_seconds)
    unit = "CUDA memory allocated" if device.type == "cuda" else "RSS"
    dtype = "bf16 weights, bf16 autocast" if device.type == "cuda" else "fp32"
    lora_count = f"{results['lora']['trainable']:,}"
    return "\n\n".join([
        f"# Training speed and memory: SEFT vs LoRA vs masked full fine-tuning ({MODEL_NAMES[args.model]})",
        f"Model: {MODEL_NAMES[args.model]}, {prepared['parameters']:,} parameters, pruned {PRUNING[args.model]} "
        f"({prepared['sparsity']:.1%} of the decoder's linear weights are zero), on {device}, {dtype}. Batches: "
        f"{args.batch} sequences × {args.seqlen} tokens ({prepared['chunks']} training chunks). {args.steps} "
        f"optimizer steps per method, the first {WARMUP_STEPS} excluded as warm-up; optim `{args.optim}`, lr "
        f"{LEARNING_RATE:g} constant, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, each "
        f"method in its own process, {args.rounds} round(s) that run every method once in turn (the round medians "
        "column shows the spread between rounds).",
        f"Matched trainable parameters: LoRA r={LORA_RANK} (alpha {LORA_ALPHA}, no dropout) on "
        f"{', '.join(PROJECTIONS)} has {lora_count}; SEFT gets as many deltas (`seft_num_deltas`, split over the "
        "same projections in proportion to their size). masked_full trains the nonzero entries of the same "
        "projections (its optimizer keeps dense state). SEFT runs with update_interval = steps, "
        f"accumulation_steps {DEFAULTS.accumulation_steps}, update_end 1.0 and a constant drop fraction "
        f"{DEFAULTS.drop_fraction}, so its last {DEFAULTS.accumulation_steps} steps form one window ending in one "
        "update, and one more step, the first on the new topology; seft_mean_swap runs the same with the mean drop "
        f"fraction of a run at the defaults ({mean_drop_fraction():.3f}).",
        f"Step: on_step_begin → on_step_end of the Trainer (forward, backward, clipping, optimizer, callbacks), "
        f"median over the timed steps; for the floor, forward + backward. Memory: peak {unit} of the method's "
        "process while it trained (the peak is reset when training starts, so model loading does not count), the "
        "highest of the rounds and each round's, and the increase over the value at that moment (median of the rounds). Own state: the bytes a method keeps beside the frozen model per "
        "trainable value, optimizer state excluded (SEFT: δ, its position and its base value; LoRA: A and B).",
        "Allocator: every worker runs with " + ", ".join(f"`{k}={v}`" for k, v in ALLOCATOR_ENV.items())
        + ": glibc serves blocks of any size from its heap and never returns freed memory to the system, so a step "
        "reuses the pages of the last instead of faulting fresh ones in (whose cost followed the host's load). The "
        "peaks are the heap's high-water marks under that setting, the same for every method.",
        *([TINY_NOTE] if args.model == "tiny" else []),
        results_table(results, seft, unit, args.steps),
        breakdown_text(seft, mean_swap, run, args.steps, args.rounds),
        goals_text(results, seft, run, unit, args.steps),
        f"{machine_description(device)} Total wall time {wall:.0f} s. {contention_text(results)}",
        f"Command: `python benchmarks/speed.py --model {args.model} --device {args.device} --steps {args.steps} "
        f"--seqlen {args.seqlen} --batch {args.batch} --threads {args.threads} --optim {args.optim} "
        f"--rounds {args.rounds}"
        f"{' --gradient-checkpointing' if args.gradient_checkpointing else ''}`",
    ])


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
