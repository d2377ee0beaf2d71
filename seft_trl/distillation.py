"""Distillation from the dense parent: next-token CE mixed with a divergence from the teacher, chunked.

The dense parent (the model before pruning) is the one teacher every repair has. Per next-token
position ``t`` with label ``y`` the loss is

    (1 − α) · CE_t  +  α · D_β(p_teacher^τ ‖ p_student^τ)  +  γ · H_t

* ``CE_t = −log p_student(y)`` at temperature 1, the plain causal-LM loss;
* ``D_β``: the generalized Jensen–Shannon divergence of TRL's ``DistillationTrainer`` between the
  teacher's and the student's next-token distributions at temperature ``τ``: ``β = 0`` forward KL
  ``KL(p_t ‖ p_s)``, ``β = 1`` reverse KL ``KL(p_s ‖ p_t)``, between them
  ``β·KL(p_t ‖ m) + (1 − β)·KL(p_s ‖ m)`` with ``m = (1 − β)·p_s + β·p_t`` (no ``τ²`` factor, as TRL);
* ``H_t``: SquareHead's per-layer loss (arXiv 2310.06927), ``‖h_s − h_t‖² / ‖h_t‖²`` of each decoder
  layer's output at ``t``, averaged over the layers.

Positions count where the next label is not ``-100`` (padding, prompts under completion-only
loss, packed-sequence boundaries), and the sum is divided by the number of such tokens, or by
``num_items_in_batch`` under gradient accumulation, exactly as TRL divides the CE.

Neither model's ``[tokens, vocab]`` logits exist in full: the LM heads project the backbones'
hidden states a chunk of tokens at a time (:data:`CHUNK_ELEMENTS` logits per chunk), and the
gradient of each chunk's loss with respect to the student's hidden states is formed in the same
pass (:class:`_ChunkedDistillation`). The LM heads are frozen (SEFT never trains them), so nothing
else needs a gradient. The teacher runs under ``no_grad``, in eval mode and in its own dtype.
"""

from __future__ import annotations

import functools
import math
import types
from dataclasses import dataclass

import torch
from torch import nn

from .sharding import whole

# Logits of one chunk (tokens × vocabulary): 2²⁴ fp32 values are 64 MiB, a few of which live at once
# (student and teacher logits, their log-softmax, the gradient), whatever the vocabulary: 128 tokens
# per chunk at LLaMA-3's 128,256 entries, 341 at SmolLM2's 49,152.
CHUNK_ELEMENTS = 1 << 24
IGNORE_INDEX = -100


@dataclass(frozen=True)
class DistillationLoss:
    """The weights of the loss's three terms and the divergence's shape (see the module docstring).

    Defaults, from the screen on narrow data (``benchmarks/results/quality_screen.md``: Wanda 50%
    SmolLM2 repaired on news, validated on Wikipedia and on news): forward KL at weight 0.5 and
    temperature 1 beat pure KL (weight 1, which also lost on the news itself), weight 0.25, the JSD,
    reverse KL and temperature 2, for masked LoRA and for SEFT alike. SquareHead's hidden-state term
    helped by less than one seed's noise and holds every layer's hidden states of both models, so
    it is off unless asked for.
    """

    weight: float = 0.5  # α: the divergence's share; 1 - α stays with the CE
    beta: float = 0.0  # 0 forward KL, 1 reverse KL, between: generalized JSD
    temperature: float = 1.0
    hidden_weight: float = 0.0  # γ: SquareHead's normalised hidden-state loss

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"distillation_weight must lie in [0, 1] (the divergence's share of the loss), got {self.weight}.")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must lie in [0, 1] (0 forward KL, 1 reverse KL, 0.5 JSD), got {self.beta}.")
        if not self.temperature > 0.0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")
        if self.hidden_weight < 0.0:
            raise ValueError(f"hidden_state_weight must be >= 0, got {self.hidden_weight}.")

    @property
    def uses_teacher(self) -> bool:
        return self.weight > 0.0 or self.hidden_weight > 0.0


@dataclass
class LossParts:
    """One micro-batch's loss (the tensor to backpropagate) and its terms' sums over the counted tokens."""

    loss: torch.Tensor
    tokens: torch.Tensor  # counted next-token positions (int64 scalar)
    ce_sum: torch.Tensor
    divergence_sum: torch.Tensor
    hidden_sum: torch.Tensor
    entropy_sum: torch.Tensor  # of the student at temperature 1, as SFTTrainer logs it
    correct: torch.Tensor  # positions whose most likely token is the label


# ------------------------------------------------------------------------------ pure functions
def divergence(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalized JSD per row between log-distributions [n, V] -> [n] (β as in the module docstring)."""
    if beta == 0.0:
        return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    if beta == 1.0:
        return (student_logp.exp() * (student_logp - teacher_logp)).sum(-1)
    mixture = torch.logaddexp(student_logp + math.log(1.0 - beta), teacher_logp + math.log(beta))
    return (beta * teacher_logp.exp() * (teacher_logp - mixture)
            + (1.0 - beta) * student_logp.exp() * (student_logp - mixture)).sum(-1)


def divergence_gradient(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """d divergence / d (student logits / τ), per row [n, V] (the softmax's Jacobian applied).

    Forward KL: ``p_s − p_t``. Otherwise ``p_s ⊙ (a − Σ p_s a)`` with ``a = log p_s − log p_t`` (reverse
    KL) or ``a = (1 − β)(log p_s − log m)`` (generalized JSD; the terms through ``m`` cancel).
    """
    student_p = student_logp.exp()
    if beta == 0.0:
        return student_p - teacher_logp.exp()
    if beta == 1.0:
        slope = student_logp - teacher_logp
    else:
        mixture = torch.logaddexp(student_logp + math.log(1.0 - beta), teacher_logp + math.log(beta))
        slope = (1.0 - beta) * (student_logp - mixture)
    return student_p * (slope - (student_p * slope).sum(-1, keepdim=True))


@dataclass(frozen=True)
class LogitMap:
    """How a model turns its LM head's output into logits: a scale, then an optional soft cap."""

    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def of(cls, model: nn.Module) -> "LogitMap":
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "get_text_config"):
            config = config.get_text_config()
        scale = getattr(config, "logit_scale", None)
        return cls(1.0 if scale is None else float(scale), getattr(config, "final_logit_softcapping", None))

    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        logits = raw.float() * self.scale
        return logits if self.softcap is None else self.softcap * torch.tanh(logits / self.softcap)

    def slope(self, logits: torch.Tensor) -> torch.Tensor | float:
        """d logits / d raw at the given logits."""
        if self.softcap is None:
            return self.scale
        return self.scale * (1.0 - (logits / self.softcap) ** 2)


@dataclass(frozen=True)
class Head:
    """A frozen LM head, gathered whole, and its logit map."""

    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None
    logits: LogitMap

    @classmethod
    def of(cls, model: nn.Module) -> "Head":
        head = model.get_output_embeddings()
        bias = getattr(head, "bias", None)
        return cls(whole(head.weight.detach()), None if bias is None else whole(bias.detach()), LogitMap.of(model))

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        raw = hidden.to(self.weight.dtype) @ self.weight.T
        return self.logits(raw if self.bias is None else raw + self.bias)


def _chunk_tokens(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab)


class _ChunkedDistillation(torch.autograd.Function):
    """Per-token (1 − α)·CE + α·D for hidden states [n, H] of the counted positions, chunk by chunk.

    Returns the combined per-token loss [n] (differentiable in the student's hidden states) and,
    without gradient, the CE, the divergence, the student's entropy and whether its top token is
    the label, each [n]. Each token's loss depends only on its own hidden state, so the gradient of
    every chunk is formed in the forward pass ([n, H], the hidden states' size) and the backward
    scales it row by row: exact for any weighting of the tokens downstream.
    """

    @staticmethod
    def forward(ctx, student_hidden, teacher_hidden, labels, student: Head, teacher: Head, options: DistillationLoss):
        n, vocab = student_hidden.shape[0], student.weight.shape[0]
        alpha, beta, inv_t = options.weight, options.beta, 1.0 / options.temperature
        outputs = [torch.empty(n, dtype=torch.float32, device=student_hidden.device) for _ in range(5)]
        loss, ce, div, entropy, correct = outputs
        grad = torch.empty_like(student_hidden)
        for start in range(0, n, _chunk_tokens(vocab)):
            part = slice(start, start + _chunk_tokens(vocab))
            logits = student.project(student_hidden[part])  # [c, V] fp32
            label = labels[part]
            logp = torch.log_softmax(logits, dim=-1)
            label_logp = logp.gather(1, label[:, None]).squeeze(1)
            ce[part] = -label_logp
            probs = logp.exp()
            entropy[part] = -(probs * logp).sum(-1)
            correct[part] = (logits.argmax(-1) == label).float()
            d_logits = probs.mul_(1.0 - alpha)  # d CE / d logits = p - onehot(label), weighted
            d_logits.scatter_add_(1, label[:, None], torch.full_like(label_logp[:, None], alpha - 1.0))
            if alpha > 0.0:
                tempered = logp if inv_t == 1.0 else torch.log_softmax(logits * inv_t, dim=-1)
                teacher_logp = torch.log_softmax(teacher.project(teacher_hidden[part]) * inv_t, dim=-1)
                div[part] = divergence(tempered, teacher_logp, beta)
                d_logits.add_(divergence_gradient(tempered, teacher_logp, beta), alpha=alpha * inv_t)
                del teacher_logp, tempered
            else:
                div[part] = 0.0
            loss[part] = (1.0 - alpha) * ce[part] + alpha * div[part]
            d_raw = d_logits * student.logits.slope(logits)
            grad[part] = (d_raw.to(student.weight.dtype) @ student.weight).to(grad.dtype)
            del logits, logp, probs, d_logits, d_raw
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(ce, div, entropy, correct)
        return loss, ce, div, entropy, correct

    @staticmethod
    def backward(ctx, grad_loss, *_):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss[:, None].to(grad.dtype), None, None, None, None, None


def hidden_state_distance(student_states, teacher_states, mask: torch.Tensor) -> torch.Tensor:
    """SquareHead's ``‖h_s − h_t‖² / ‖h_t‖²`` averaged over layers, at the positions of ``mask`` -> [n].

    ``student_states``/``teacher_states``: one [B, T, H] tensor per decoder layer's output.
    """
    total = None
    for student, teacher in zip(student_states, teacher_states, strict=True):
        s, t = student[mask].float(), teacher[mask].float()
        term = (s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp(min=torch.finfo(torch.float32).tiny)
        total = term if total is None else total + term
    return total / len(student_states)


# ---------------------------------------------------------------------------------- models
def add_backbone_forward(model: nn.Module) -> nn.Module:
    """Let ``model(..., seft_backbone=True)`` return its backbone's outputs (hidden states, no LM head).

    Called through ``model`` itself, so whatever wraps it (DDP, FSDP2's hooks, accelerate's
    autocast) runs as for an ordinary forward; any other call is the forward it had. Patched once.
    """
    if getattr(model, "_seft_backbone_forward", False):
        return model
    inner = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, seft_backbone: bool = False, **kwargs):
        if not seft_backbone:
            return inner(*args, **kwargs)
        kwargs["use_cache"] = False
        return self.base_model(*args, **kwargs)

    model.forward = types.MethodType(forward, model)
    model._seft_backbone_forward = True
    return model


def backbone_states(model: nn.Module, inputs: dict, all_layers: bool) -> tuple[torch.Tensor, tuple]:
    """(last hidden state [B, T, H], each decoder layer's output when ``all_layers``) of ``model`` on ``inputs``.

    ``model`` is the module to call (a wrapper is fine): its innermost model must have been given
    :func:`add_backbone_forward`.
    """
    outputs = model(**inputs, seft_backbone=True, output_hidden_states=all_layers)
    layers = tuple(outputs.hidden_states[1:]) if all_layers else ()
    return outputs.last_hidden_state, layers


def next_token_labels(inputs: dict) -> torch.Tensor:
    """The label each position predicts, [B, T − 1]: ``labels`` shifted (or ``input_ids`` when there are none)."""
    labels = inputs.get("labels")
    return (inputs["input_ids"] if labels is None else labels)[:, 1:]


def distillation_loss(
    student: nn.Module,
    teacher: nn.Module,
    inputs: dict,
    options: DistillationLoss,
    num_items_in_batch: torch.Tensor | int | None = None,
    student_head: nn.Module | None = None,
    teacher_head: nn.Module | None = None,
) -> LossParts:
    """The distillation loss of one micro-batch (module docstring): student forward with grad, teacher without.

    ``student``/``teacher``: the modules to call (wrappers allowed; the inner models need
    :func:`add_backbone_forward`). ``inputs``: the model inputs with ``labels`` (``-100`` where not
    counted; without ``labels`` every position counts). ``student_head``/``teacher_head``: the inner
    models, whose LM heads and configs are read (default: ``student``/``teacher`` themselves).
    """
    labels = next_token_labels(inputs)
    model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
    all_layers = options.hidden_weight > 0.0
    student_last, student_layers = backbone_states(student, model_inputs, all_layers)
    was_training = teacher.training
    teacher.eval()
    try:
        with torch.no_grad():
            teacher_last, teacher_layers = backbone_states(teacher, model_inputs, all_layers)
    finally:
        teacher.train(was_training)
    student_head, teacher_head = Head.of(student_head or student), Head.of(teacher_head or teacher)
    if student_head.weight.shape[0] != teacher_head.weight.shape[0]:
        raise ValueError(
            f"The teacher's vocabulary has {teacher_head.weight.shape[0]} entries, the student's "
            f"{student_head.weight.shape[0]}: distillation compares next-token distributions token by token, so "
            "the teacher must be the student's dense parent (same tokenizer and vocabulary)."
        )
    mask = labels != IGNORE_INDEX  # [B, T - 1]
    hidden = student_last[:, :-1][mask]  # [n, H]
    loss, ce, div, entropy, correct = _ChunkedDistillation.apply(
        hidden, teacher_last[:, :-1][mask].to(hidden.device), labels[mask], student_head, teacher_head, options
    )
    if all_layers:
        layer_term = hidden_state_distance([s[:, :-1] for s in student_layers], [t[:, :-1] for t in teacher_layers], mask)
        loss = loss + options.hidden_weight * layer_term
        hidden_sum = layer_term.detach().sum()
    else:
        hidden_sum = loss.new_zeros(())
    tokens = mask.sum()
    divisor = tokens.clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    if isinstance(divisor, torch.Tensor):
        divisor = divisor.to(loss.device)
    return LossParts(
        loss=loss.sum() / divisor, tokens=tokens, ce_sum=ce.sum(), divergence_sum=div.sum(), hidden_sum=hidden_sum,
        entropy_sum=entropy.sum(), correct=correct.sum(),
    )
