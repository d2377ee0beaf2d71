"""Model wiring of SEFT: inject sparse-delta layers, drive topology evolution, merge.

Usage in a plain PyTorch loop::

    seft = SparsityEvolution(model, SparsityEvolutionConfig(density=0.01))
    optimizer = torch.optim.AdamW(seft.parameters(), lr=1e-4)
    seft.attach(optimizer, total_steps=1000)   # after every optimizer.step(): write W', evolve
    ...train...
    model = seft.merge()                       # plain nn.Linear layers, exact zeros

Under fp16 with a ``GradScaler``, call ``seft.set_loss_scale(scaler.get_scale())`` after each
``scaler.update()`` (SEFTCallback does it through accelerate).

Every check runs before the model is touched, so bad input leaves it unchanged.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from typing import Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .config import SparsityEvolutionConfig
from .layer import SparseDeltaLinear, TopologyCriteria, UpdateStats
from .optim_state import check_optimizer_supported, reset_optimizer_slots, seed_optimizer_slots, unwrap_optimizer
from .parent import DenseParent, check_parent_layers, dense_parent
from .patterns import Scope, SparsityPattern, detect_pattern, satisfies
from .sharding import is_sharded, local, whole
from .targets import find_target_linears
from .topology import drop_fraction_at, is_update_step, next_update_step, window_group_offsets


def _resolve_pattern(weights: dict[str, torch.Tensor], spec: str) -> SparsityPattern:
    if spec == "auto":
        return detect_pattern(weights.values())
    pattern = SparsityPattern.parse(spec)
    for name, weight in weights.items():
        if not satisfies(weight, pattern):
            raise ValueError(
                f"Layer {name!r} does not satisfy the {pattern} pattern (more than {pattern.n} nonzeros in a group of "
                f"{pattern.m}, or in_features not a multiple of {pattern.m}). Prune it to {pattern} first, or use "
                "sparsity_pattern='unstructured'."
            )
    return pattern


def _delta_counts(targets: dict[str, nn.Linear], config: SparsityEvolutionConfig) -> dict[str, int]:
    """k per layer; raises when a layer would get fewer than one delta or more than its support."""
    numels = {name: linear.weight.numel() for name, linear in targets.items()}
    if config.num_deltas is not None:
        total = sum(numels.values())
        counts = {name: round(config.num_deltas * numel / total) for name, numel in numels.items()}
    else:
        counts = {name: round(config.density * numel) for name, numel in numels.items()}
    for name, k in counts.items():
        support = int(torch.count_nonzero(targets[name].weight))
        if k < 1:
            raise ValueError(
                f"Layer {name!r} ({numels[name]} weights) would get {k} deltas; raise density/num_deltas."
            )
        if k > support:
            raise ValueError(
                f"Layer {name!r} would get {k} deltas but has only {support} nonzero weights; deltas start on "
                "nonzero weights, so lower density/num_deltas."
            )
    return counts


def _keep_out_of_ddp_broadcast(model: nn.Module, layers: dict[str, SparseDeltaLinear]) -> None:
    """Exclude SEFT's buffers from DDP's per-forward buffer broadcast; they stay in the state dict.

    With ``broadcast_buffers=True`` (DDP's default) rank 0 sends every buffer before each forward:
    about 12 bytes per delta. (On torch 2.13 the copy does not bump the buffers' version, so caches
    keyed on it never see it.) SEFT's buffers need no broadcast: every rank
    builds them from the same weights and seed and changes them only by decisions taken from
    statistics summed over ranks (:func:`_check_ranks_agree` verifies it at attach).
    """
    names = {f"{name}.{buffer}" for name, layer in layers.items() for buffer, _ in layer.named_buffers(recurse=False)}
    ignored = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(ignored | names))


@torch.no_grad()
def _check_ranks_agree(layers: dict[str, SparseDeltaLinear]) -> None:
    """Raise unless every rank holds the same delta positions and base values (they are never broadcast)."""
    fingerprint = torch.stack([
        torch.stack([layer.delta_index.double().sum(), layer.delta_base.double().sum()]) for layer in layers.values()
    ])  # [layers, 2]
    low, high = fingerprint.clone(), fingerprint.clone()
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
    differ = [name for name, same in zip(layers, (low == high).all(dim=1).tolist()) if not same]
    if differ:
        raise RuntimeError(
            f"SEFT layers differ across ranks ({', '.join(differ[:3])}{', ...' if len(differ) > 3 else ''}): every rank "
            "must load the same weights and build SparsityEvolution with the same config and seed before training."
        )


class NonFiniteError(RuntimeError):
    """A target weight or a delta holds NaN or infinity: training on it would silently produce a NaN model."""


def check_finite_weights(weights: dict[str, torch.Tensor]) -> None:
    """Refuse weights that hold NaN or infinity (at a pruned position too), naming the layers, before any change."""
    bad = [name for name, weight in weights.items() if not bool(torch.isfinite(local(weight)).all())]
    if bad:
        raise NonFiniteError(
            f"{len(bad)} target weight(s) hold NaN or infinite values: {', '.join(bad[:5])}"
            f"{', ...' if len(bad) > 5 else ''}. SEFT would turn every delta into NaN. Check the checkpoint (a "
            "failed conversion or pruning step, or a dtype overflow) and load a finite one."
        )


def initial_delta_index(weight: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """k positions drawn uniformly from the nonzero weights (SpIEL starts at random positions)."""
    nonzero = torch.nonzero(weight.detach().reshape(-1)).squeeze(1)
    generator = torch.Generator(device=weight.device).manual_seed(seed)
    choice = torch.randperm(nonzero.numel(), generator=generator, device=weight.device)[:k]
    return nonzero[choice]


def arm_window(layer: SparseDeltaLinear, fraction: float, candidate_factor: float) -> None:
    """Make ``layer``'s next backward open an accumulation window for swapping ``fraction`` of its deltas."""
    n_swaps = layer.swap_count(fraction)
    if n_swaps > 0:
        layer.begin_window(n_swaps, candidate_factor)


def _revival_parent(
    config: SparsityEvolutionConfig, parent: DenseParent | nn.Module | str | os.PathLike | None, revives: bool,
    weights: dict[str, torch.Tensor],
) -> DenseParent | None:
    """The parent revived weights start from, checked against the layers; None when revivals start at zero."""
    if config.dense_revival and parent is None:
        raise ValueError(
            "dense_revival=True starts revived weights at the dense parent's values: pass the parent (the model before "
            "pruning, or its folder) as SparsityEvolution(model, config, parent=...), or the trainer's teacher."
        )
    if parent is None or config.dense_revival is False or not revives:
        return None
    if isinstance(parent, (nn.Module, str, os.PathLike)):
        parent = dense_parent(parent)
    check_parent_layers(parent, weights)
    return parent


class SparsityEvolution:
    """Sparse-delta fine-tuning of ``model`` with drop–grow–adapt topology evolution.

    ``parent``: the dense model before pruning (a module, a local checkpoint folder, or a
    :class:`~seft_trl.parent.DenseParent`). With it, a revived pruned weight starts at the parent's
    value (``config.dense_revival``, on by default when a parent is given); its weights are read at
    the revived positions only.
    """

    def __init__(
        self, model: nn.Module, config: SparsityEvolutionConfig | None = None,
        parent: DenseParent | nn.Module | str | os.PathLike | None = None,
    ) -> None:
        config = config or SparsityEvolutionConfig()
        if any(isinstance(module, SparseDeltaLinear) for module in model.modules()):
            raise ValueError("This model already has SEFT layers; merge it (seft_trl.merge) before injecting again.")
        targets = find_target_linears(model, config.target_modules)
        if any(is_sharded(linear.weight) for linear in targets.values()):
            raise ValueError(
                "The target layers are already sharded (FSDP2): build SparsityEvolution on the whole model first, "
                "then call fully_shard, then build the optimizer from SparsityEvolution.parameters()."
            )
        weights = {name: linear.weight.detach() for name, linear in targets.items()}
        check_finite_weights(weights)
        self.pattern = _resolve_pattern(weights, config.sparsity_pattern)
        counts = _delta_counts(targets, config)
        self.parent = _revival_parent(config, parent, config.revives_pruned(self.pattern.is_nm), weights)
        if all(bool((w != 0).all()) for w in weights.values()):
            warnings.warn(
                "The target layers are dense: the budget is every weight, so there is no sparsity to preserve "
                "and no pruned weight to revive. Prune the model first (seft_trl.pruning) to repair a sparse model.",
                stacklevel=2,
            )

        # All checks passed: now change the model.
        model.requires_grad_(False)
        self.criteria = TopologyCriteria.from_config(config, self.pattern)
        self.layers: dict[str, SparseDeltaLinear] = {}
        for ordinal, (name, linear) in enumerate(targets.items()):
            scope = Scope.for_layer(self.pattern, config.sparsity_scope, linear.in_features)
            index = initial_delta_index(linear.weight, counts[name], seed=config.seed * 1_000_003 + ordinal)
            layer = SparseDeltaLinear(linear, index, scope, self.criteria)
            model.set_submodule(name, layer)
            self.layers[name] = layer
        _keep_out_of_ddp_broadcast(model, self.layers)
        # Layers take turns at updates (config.window_groups): interleaved in model order, so that every
        # group spans all depths and projection kinds.
        names = list(self.layers)
        self.window_groups = [names[g :: config.window_groups] for g in range(config.window_groups)]
        self.group_offsets = window_group_offsets(config.update_interval, config.window_groups)
        self.model, self.config = model, config
        self.step_count = 0
        self.total_steps: int | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.last_update: dict[str, UpdateStats] = {}  # stats of the update made at the latest step, if any
        self._hook = None

    @property
    def delta_norm(self) -> float:
        """L2 norm of all deltas together."""
        return float(torch.sqrt(sum(whole(layer.delta.detach()).float().pow(2).sum() for layer in self.layers.values())))

    # ----------------------------------------------------------------------------- training
    def parameters(self) -> Iterator[nn.Parameter]:
        """The trainable deltas (fp32), one tensor per layer."""
        return (layer.delta for layer in self.layers.values())

    @property
    def end_step(self) -> int:
        assert self.total_steps is not None
        return int(self.config.update_end * self.total_steps)

    def attach(self, optimizer, total_steps: int, start_step: int = 0, step_hook: bool = True) -> None:
        """Follow ``optimizer``: after each of its steps write W' and evolve the topology when due.

        ``total_steps`` (optimizer steps of the whole run) sets the drop-fraction schedule;
        ``start_step`` is the number of steps already done (when resuming). With ``step_hook``
        a post-step hook on the optimizer calls :meth:`after_optimizer_step`, so a step the
        optimizer skips is not counted; a trainer that drives the steps itself passes False.
        Under ``torch.distributed`` the topology statistics are summed over all ranks, so every
        rank takes the same decisions.
        """
        check_optimizer_supported(optimizer)
        inner = unwrap_optimizer(optimizer)
        owned = {id(p) for group in inner.param_groups for p in group["params"]}
        if not all(id(delta) in owned for delta in self.parameters()):
            raise ValueError("The optimizer must own every delta: build it from SparsityEvolution.parameters().")
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}.")
        self.detach()
        self.optimizer, self.total_steps, self.step_count = inner, total_steps, start_step
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        world_size = torch.distributed.get_world_size() if distributed else 1
        for layer in self.layers.values():
            layer.stats_all_reduce = torch.distributed.all_reduce if world_size > 1 else None
            layer.world_size = world_size
        if world_size > 1:
            _check_ranks_agree(self.layers)
        if step_hook:
            self._hook = inner.register_step_post_hook(lambda *_: self.after_optimizer_step())
        self._arm_window()

    def set_loss_scale(self, scale: float) -> None:
        """The factor the loss is multiplied by in the coming backward (fp16: ``GradScaler.get_scale()``).

        The window statistics divide it out, so topology decisions and moment seeds do not depend on
        the scaler. :class:`~seft_trl.SEFTCallback` sets it from accelerate's scaler; a plain loop
        calls it after each ``scaler.update()``.
        """
        for layer in self.layers.values():
            layer.loss_scale = float(scale)

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def after_optimizer_step(self, skipped: bool = False) -> None:
        """Count one optimizer step; unless it was ``skipped``, write W' and run the update when due."""
        self.step_count += 1
        self.last_update = {}
        for layer in self.layers.values():
            layer.close_step(skipped)
        if not skipped:
            self._check_finite_deltas()  # before W' is written: the weights keep the last finite step
            for layer in self.layers.values():
                layer.materialize()
            if self.scheduled_drop_fraction(self.step_count) > 0:
                for group, offset in zip(self.window_groups, self.group_offsets):
                    if is_update_step(self.step_count, self.config.update_interval, self.end_step, offset):
                        self.update_topology(group)
        self._arm_window()

    def _check_finite_deltas(self) -> None:
        """Stop training at the first step that leaves a delta NaN or infinite (one device sync per step)."""
        layers = list(self.layers.values())
        bad = torch.stack([~torch.isfinite(local(layer.delta.detach())).all() for layer in layers]).to(torch.int32)
        if is_sharded(layers[0].delta):  # FSDP2: each rank checks its chunk, and all must stop together
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        if bool(bad.any()):
            names = [name for name, flag in zip(self.layers, bad.tolist()) if flag]
            raise NonFiniteError(
                f"Optimizer step {self.step_count} left the deltas of {len(names)} layer(s) NaN or infinite "
                f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}). Training stopped before they reached "
                "the weights, which hold the last finite step; saved checkpoints are intact. Lower the learning "
                "rate, clip gradients (max_grad_norm), or use a loss scaler for fp16, then resume from the last "
                "checkpoint."
            )

    def scheduled_drop_fraction(self, step: int) -> float:
        """The fraction of deltas an update at ``step`` swaps (``config.drop_fraction`` decayed by the schedule)."""
        return drop_fraction_at(step, self.end_step, self.config.drop_fraction, self.config.drop_schedule)

    def _arm_window(self) -> None:
        """If the next optimizer step opens an accumulation window, arm the layers to pick candidates."""
        next_step = self.step_count + 1
        interval = self.config.update_interval
        for group, offset in zip(self.window_groups, self.group_offsets):
            update_step = next_update_step(next_step, interval, offset)
            if not is_update_step(update_step, interval, self.end_step, offset):
                continue
            if next_step != update_step - self.config.accumulation_steps + 1:
                continue
            fraction = self.scheduled_drop_fraction(update_step)
            for name in group:
                arm_window(self.layers[name], fraction, self.config.candidate_factor)

    def update_topology(self, names: list[str] | None = None) -> dict[str, UpdateStats]:
        """Drop, grow and adapt in the layers ``names`` (default: every layer) now; seeds (or resets) the
        optimizer state of moved slots.

        Skipped as a whole (with a warning) when any of these layers' window statistics are not finite,
        as after an fp16 overflow: a decision on NaN scores would be arbitrary.
        """
        layers = {name: self.layers[name] for name in (self.layers if names is None else names)}
        finite = [layer.finalize_window() for layer in layers.values()]  # every layer reduces, in order
        if not all(finite):
            warnings.warn(f"Topology update at step {self.step_count} skipped: non-finite gradient statistics.")
            for layer in layers.values():
                layer.discard_window()
            return {}
        fraction = self.scheduled_drop_fraction(self.step_count)
        rates_left = self.rates_left()
        stats = {}
        for name, layer in layers.items():
            dense = None if self.parent is None else functools.partial(self.parent.values, name)
            stats[name], moved_slots, mean_sq = layer.update_topology(layer.swap_count(fraction), rates_left[name], dense)
            if self.optimizer is None:
                continue
            mine, slots = layer.own_slots(moved_slots)  # under FSDP2 a rank's optimizer holds its slot chunk
            if self.config.seed_moments:
                seed_optimizer_slots(self.optimizer, layer.delta, slots, mean_sq[mine])
            else:
                reset_optimizer_slots(self.optimizer, layer.delta, slots)
        self.last_update = stats
        return stats

    def rates_left(self) -> dict[str, float]:
        """For each layer, the learning rates of its deltas left in the run, summed; inf without an optimizer.

        The scheduler is not the engine's to see, so the rate is taken to decay from its current
        value to zero by the last step, as the linear and cosine schedules do: half the current
        rate times the steps left (an overestimate late in a cosine decay, where this matters least).
        """
        if self.optimizer is None or self.total_steps is None:
            return dict.fromkeys(self.layers, math.inf)
        rate = {id(p): float(group["lr"]) for group in self.optimizer.param_groups for p in group["params"]}
        steps_left = max(0, self.total_steps - self.step_count)
        return {name: 0.5 * rate[id(layer.delta)] * steps_left for name, layer in self.layers.items()}

    # ------------------------------------------------------------------------ checkpoints
    def window_state(self) -> dict[str, torch.Tensor]:
        """The open accumulation windows, by ``<layer>.<key>``: what a checkpoint inside a window must add.

        A plain state dict already carries them; a sharded one (FSDP2) cannot, so under FSDP2 save
        this beside the model (the same on every rank: its statistics are summed over ranks).
        """
        return {f"{name}.{key}": value for name, layer in self.layers.items() for key, value in layer.window_state().items()}

    def load_window_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the windows saved by :meth:`window_state` (layers without an entry get none)."""
        for name, layer in self.layers.items():
            prefix = name + "."
            layer.load_window_state({key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}, name)

    # -------------------------------------------------------------------------------- output
    def merge(self) -> nn.Module:
        """Detach from the optimizer and put plain nn.Linear layers back (see :func:`merge`)."""
        self.detach()
        return merge(self.model)


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Replace every SparseDeltaLinear with an nn.Linear holding W' (exact zeros outside the support)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, SparseDeltaLinear):
            module.materialize()
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            linear.weight, linear.bias = module.weight, module.bias
            model.set_submodule(name, linear)
    return model


def merged_state_dict(model: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """The state dict ``merge(model)`` would have, without changing ``model``.

    W' already lives in each weight tensor, so merging is dropping the SEFT entries. Under FSDP2
    every rank must call this: each sharded entry is gathered in turn (so no rank holds more than
    one whole tensor on its device) and copied to the CPU where ``keep``; elsewhere it is dropped
    and the result is empty. Tied entries stay one tensor.
    """
    seft_prefixes = [name + "." for name, m in model.named_modules() if isinstance(m, SparseDeltaLinear)]
    plain = {f"{prefix}{attr}" for prefix in seft_prefixes for attr in ("weight", "bias")}
    merged, gathered = {}, {}
    for key, value in model.state_dict().items():
        if key not in plain and any(key.startswith(prefix) for prefix in seft_prefixes):
            continue
        if is_sharded(value):
            if id(value) not in gathered:
                whole_value = whole(value)
                gathered[id(value)] = whole_value.cpu() if keep else None
                del whole_value
            value = gathered[id(value)]
        if keep:
            merged[key] = value
    return merged
