"""Training memory of each repair method, projected from a model's shape: what fits a given GPU.

Users choose a repair by what fits their accelerator, not by a trainable count. These are plain
functions of a decoder's shape, the training workload and the optimizer, in bytes, itemised so a
reader can check each term; ``benchmarks/memory.py`` compares them with what a run measures.

What each method keeps beyond the frozen weights (``w`` = bytes of a weight, 2 in bf16):

* **sparse deltas** (SEFT, fixed support): per delta an fp32 value and its fp32 gradient, an int32
  position, the base weight it sits on (``w``) and the optimizer's state. SEFT adds its accumulation
  windows, open in every layer at once for a few steps before each update: per delta and per growth
  candidate two fp32 gradient sums, per removal candidate one (one more each while a step's own sum
  exists, from its backward to its close), and an int32 position per candidate (:func:`window_bytes`). Candidates are
  ``candidate_factor`` times the swaps of an update, ``drop_fraction`` of the deltas, for growth and
  as many for removal at most (none without revival, N:M models' default): 2.6 entries per delta at
  the defaults' first update in an unstructured model, so at the window's
  peak SEFT holds more than its deltas' own state, unless layers take turns (``window_groups``: an
  equal share of them holds a window at a time). Transient besides: the one layer's dense fp32
  gradient that opens its window.
* **LoRA-style adapters** (LoRA, masked LoRA / SQFT, SPP): fp32 factors, their gradients and the
  optimizer's state, ``rank · (in + out)`` per projection. Masked LoRA keeps a bool mask of every
  projection weight (an implementation that rebuilt it from the weights' zeros at every forward would
  trade it for time); SPP's scaling W ⊙ (1 + B·A) keeps zeros zero without one. Both form each
  projection's dense effective weight and low-rank product in the forward and its dense fp32 gradient
  in the backward: with gradient checkpointing one decoder layer's worth at a time (``2w + 4`` bytes a
  weight).
* **masked full fine-tuning**: every projection weight trains: a dense gradient (``w``), the
  optimizer's state for every element (AdamW does not know the mask) and a stored bool mask.

Common to all: the weights, the activations (with gradient checkpointing: each decoder layer's input,
plus one layer's recomputed activations) and the logits with their fp32 loss and gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Bytes of optimizer state per trainable parameter: torch AdamW keeps two fp32 moments; 8-bit AdamW
# (bitsandbytes, torchao) two 8-bit ones (block scales are about 0.2% more and left out).
OPTIMIZER_STATE_BYTES = {"adamw": 8.0, "adamw_8bit": 2.0, "sgd": 0.0}


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a LLaMA-style decoder (LLaMA, Mistral, DeepSeek, Qwen2, SmolLM2)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool = False

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """From a transformers config (``LlamaConfig`` and its relatives)."""
        heads = config.num_attention_heads
        return cls(
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            layers=config.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            vocab=config.vocab_size,
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )

    @property
    def kv_width(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def projections(self) -> list[tuple[int, int]]:
        """(out, in) of one decoder layer's seven projections: q, k, v, o, gate, up, down."""
        h, i, kv = self.hidden, self.intermediate, self.kv_width
        return [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]

    @property
    def projection_weights(self) -> int:
        """Weights of every decoder layer's projections: what pruning prunes and the methods train."""
        return self.layers * sum(o * i for o, i in self.projections())

    @property
    def parameters(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        norms = self.hidden * (2 * self.layers + 1)
        return self.projection_weights + embeddings + norms


# Shapes the benchmarks project to (from the models' published configs).
SMOLLM2_135M = ModelShape(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49152, tied_embeddings=True)
LLAMA2_7B = ModelShape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000)
LLAMA2_70B = ModelShape(hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, vocab=32000)


@dataclass(frozen=True)
class Workload:
    """What a training step holds besides the method: the batch and how activations are kept."""

    batch: int = 4
    seqlen: int = 2048
    weight_bytes: int = 2  # bf16
    gradient_checkpointing: bool = True


@dataclass(frozen=True)
class Method:
    """A repair method at one budget: ``kind`` is one of KINDS; ``density`` for sparse deltas (a fraction
    of each projection's weights), ``rank`` for the LoRA family, ``sparsity`` for masked full fine-tuning
    (only the surviving weights count as trainable)."""

    kind: str
    density: float = 0.0
    rank: int = 0
    sparsity: float = 0.5
    # SEFT's windows: SparsityEvolutionConfig's defaults (a test keeps them equal).
    drop_fraction: float = 0.2
    candidate_factor: float = 4.0
    window_groups: int = 1  # layers taking turns at updates: 1/window_groups of them hold a window at once
    # Revival (unstructured models' default): removal candidates to pay for it. Without it (N:M models'
    # default, or regrow_pruned=False) growth stays on the support and the window tracks no removal.
    regrow_pruned: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown method kind {self.kind!r}: one of {', '.join(KINDS)}")
        if self.kind in ("seft", "fixed_deltas") and not 0 < self.density <= 1:
            raise ValueError(f"{self.kind} needs a density in (0, 1], got {self.density}")
        if self.kind in ("lora", "masked_lora", "spp") and self.rank < 1:
            raise ValueError(f"{self.kind} needs a rank of at least 1, got {self.rank}")

    @property
    def label(self) -> str:
        if self.kind in ("seft", "fixed_deltas"):
            turns = f", windows in {self.window_groups} turns" if self.window_groups > 1 else ""
            revival = ", no revival" if self.kind == "seft" and not self.regrow_pruned else ""
            return f"{self.kind} {self.density:.3g}{revival}{turns}"
        if self.kind == "masked_full":
            return self.kind
        return f"{self.kind} r={self.rank}"


KINDS = ("seft", "fixed_deltas", "lora", "masked_lora", "spp", "masked_full")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one training step's peak, itemised."""

    weights: float
    trainable: int
    trainable_state: float  # values, gradients and optimizer state of what trains
    method_state: float  # positions and base values (deltas), masks
    activations: float
    logits: float
    transient: float  # the method's largest short-lived buffer (one layer's dense tensors)
    window: float = 0.0  # SEFT: every layer's accumulation window at once, at its peak

    @property
    def total(self) -> float:
        return (self.weights + self.trainable_state + self.method_state + self.activations + self.logits
                + self.transient + self.window)

    @property
    def method_bytes(self) -> float:
        """What the method adds to the frozen model's step: the number to compare methods by."""
        return self.trainable_state + self.method_state + self.transient + self.window


def activation_bytes(shape: ModelShape, work: Workload) -> float:
    """Activations kept for the backward: with checkpointing, each decoder layer's input plus one layer
    recomputed; without, every layer's (norms, q/k/v, attention output, MLP's four intermediates)."""
    tokens = work.batch * work.seqlen
    per_layer = tokens * (6 * shape.hidden + 2 * shape.kv_width + 4 * shape.intermediate) * work.weight_bytes
    if work.gradient_checkpointing:
        return shape.layers * tokens * shape.hidden * work.weight_bytes + per_layer
    return shape.layers * per_layer


def logit_bytes(shape: ModelShape, work: Workload) -> float:
    """The logits in the weights' dtype, their fp32 copy for the loss and its gradient."""
    return work.batch * work.seqlen * shape.vocab * (work.weight_bytes + 4 + 4)


def window_bytes(deltas: int, grow: int, remove: int, out_features: int, in_features: int, in_step: bool = True) -> int:
    """One layer's accumulation window (``seft_trl.window.WindowStatistics``) over its ``deltas`` and its
    ``grow`` and ``remove`` candidates: for each an fp32 sum of the gradient, plus the step's own sum
    while it exists (``in_step``); for the deltas and growth candidates an fp32 sum of its square (a
    removal is priced on the mean alone); an int32 position per candidate; fp32 curvature factors and
    their step's sums over the rows and columns; three fp64 counters. Under the dense product the
    window's sampling pattern gathers at these positions and holds no copy (the sampled kernels, chosen
    at low densities, keep a sorted copy besides: 8 bytes an entry on the CPU)."""
    entries = deltas + grow + remove
    return (entries * (8 if in_step else 4) + (deltas + grow) * 4 + (grow + remove) * 4
            + 8 * (out_features + in_features) + 24)


def training_memory(shape: ModelShape, method: Method, work: Workload = Workload(), optimizer: str = "adamw") -> MemoryEstimate:
    """The itemised peak memory of training ``method`` on a model of ``shape``."""
    if optimizer not in OPTIMIZER_STATE_BYTES:
        raise ValueError(f"unknown optimizer {optimizer!r}: one of {', '.join(OPTIMIZER_STATE_BYTES)}")
    opt = OPTIMIZER_STATE_BYTES[optimizer]
    w = work.weight_bytes
    projections = shape.projections()
    largest = max(o * i for o, i in projections)
    layer_weights = sum(o * i for o, i in projections)
    method_state = transient = window = 0.0
    if method.kind in ("seft", "fixed_deltas"):
        counts = [round(method.density * o * i) for o, i in projections]  # as the engine counts
        trainable = shape.layers * sum(counts)
        trainable_state = trainable * (4 + 4 + opt)
        method_state = trainable * (4 + w)  # int32 position, base value in the weight's dtype
        if method.kind == "seft" and method.drop_fraction > 0:
            transient = largest * 4  # the dense fp32 gradient that opens one layer's window
            # At the first update (the drop fraction decays after it): growth candidates and, with revival,
            # at most as many removal candidates (one per revival) per layer, all layers at once.
            grow = [max(1, round(method.candidate_factor * round(method.drop_fraction * k))) for k in counts]
            window = shape.layers * sum(window_bytes(k, c, c if method.regrow_pruned else 0, o, i)
                                        for k, c, (o, i) in zip(counts, grow, projections))
            window /= method.window_groups  # an equal share of the layers at a time (interleaved groups)
    elif method.kind in ("lora", "masked_lora", "spp"):
        trainable = shape.layers * sum(method.rank * (o + i) for o, i in projections)
        trainable_state = trainable * (4 + 4 + opt)
        if method.kind == "masked_lora":
            method_state = shape.projection_weights * 1  # the bool mask
        if method.kind != "lora":
            transient = layer_weights * (2 * w + 4)
    else:  # masked full fine-tuning
        trainable = round((1 - method.sparsity) * shape.projection_weights)
        dense = shape.projection_weights
        trainable_state = dense * (w + opt)  # a dense gradient and dense state: the optimizer sees every weight
        method_state = dense * 1  # the bool mask that keeps pruned weights at zero
    return MemoryEstimate(
        weights=shape.parameters * w,
        trainable=trainable,
        trainable_state=trainable_state,
        method_state=method_state,
        activations=activation_bytes(shape, work),
        logits=logit_bytes(shape, work),
        transient=transient,
        window=window,
    )


def per_device_bytes(estimate: MemoryEstimate, devices: int = 1) -> float:
    """One device's share of a step under FSDP2 over ``devices``: the parameters (weights, trainable
    values) with their gradients and optimizer state sharded; buffers, which FSDP2 does not shard
    (positions, base values, masks), SEFT's windows (every rank decides on whole layers), and the
    activations, logits and transient buffers of its own batch whole."""
    sharded = estimate.weights + estimate.trainable_state
    return (sharded / devices + estimate.method_state + estimate.window + estimate.activations + estimate.logits
            + estimate.transient)


def largest_density(shape: ModelShape, device_bytes: float, work: Workload = Workload(), optimizer: str = "adamw_8bit",
                    devices: int = 1, kind: str = "seft", window_groups: int = 1, regrow_pruned: bool = True) -> float | None:
    """The largest sparse-delta density (to 0.1%) whose training step fits ``device_bytes`` per device; None
    when not even a thousandth of the weights fits (the weights, activations and logits alone are too large)."""

    def fits(density: float) -> bool:
        method = Method(kind, density=density, window_groups=window_groups, regrow_pruned=regrow_pruned)
        return per_device_bytes(training_memory(shape, method, work, optimizer), devices) <= device_bytes

    if not fits(1e-3):
        return None
    low, high = 1, 1000  # in thousandths
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle / 1000) else (low, middle - 1)
    return low / 1000
