"""Evaluation of pruned and repaired models: WikiText-style perplexity and the zero-shot suite of pruning papers.

``perplexity`` follows the protocol of SparseGPT and Wanda (non-overlapping windows over the concatenated
text), so numbers are comparable with theirs. ``zero_shot`` runs lm-evaluation-harness on the tasks those
papers report; it needs the ``eval`` extra (``pip install 'seft_trl[eval]'``) and imports it only when called.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .text import TextSource, token_ids

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# The zero-shot tasks of Wanda (Sun et al., 2023) and the papers that follow it, plus PIQA, as named in
# lm-evaluation-harness 0.4.
PRUNING_TASKS: tuple[str, ...] = (
    "boolq",
    "rte",
    "hellaswag",
    "winogrande",
    "arc_easy",
    "arc_challenge",
    "openbookqa",
    "piqa",
)

# The metric reported per task. Wanda's tables report plain accuracy ("acc") for every task, HellaSwag,
# ARC-Challenge and OpenBookQA included (e.g. 56.9 for dense LLaMA-7B on HellaSwag is its acc; acc_norm is
# about 76). Kept explicit so that a reader sees the convention; boolq, rte and winogrande only have acc.
# Papers that report length-normalized accuracy instead pass ``metrics={"hellaswag": "acc_norm", ...}``.
PRUNING_METRICS: Mapping[str, str] = {
    "boolq": "acc",
    "rte": "acc",
    "hellaswag": "acc",
    "winogrande": "acc",
    "arc_easy": "acc",
    "arc_challenge": "acc",
    "openbookqa": "acc",
    "piqa": "acc",
}
DEFAULT_METRIC = "acc"  # tasks missing from PRUNING_METRICS and from the caller's ``metrics``

TextInput = TextSource | torch.Tensor


# --------------------------------------------------------------------------------------------- perplexity


def perplexity(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase | None,
    texts_or_dataset: TextInput,
    seqlen: int = 2048,
    *,
    batch_size: int = 1,
    text_field: str = "text",
    progress: bool = True,
) -> float:
    """Perplexity of ``model`` on a text, with the protocol of SparseGPT and Wanda.

    The texts are joined with ``"\\n\\n"`` (how those papers join WikiText-2's test split), tokenized once
    with the tokenizer's defaults (so one BOS at the very start for LLaMA tokenizers), and cut into
    ``n // seqlen`` non-overlapping windows; the remainder is dropped, as in the papers. Each window is
    scored on its own, without context from the previous one: its ``seqlen - 1`` next-token predictions
    (the first token has nothing to condition on). The result is ``exp`` of the mean NLL over all
    ``windows * (seqlen - 1)`` predictions. Wanda writes it as ``exp(sum(mean_w * seqlen) / (windows *
    seqlen))`` with ``mean_w`` each window's mean over its ``seqlen - 1`` predictions: the factor
    ``seqlen`` cancels, so the two are the same number.

    The NLL is computed here from the logits in float32 (per window, so a large vocabulary costs one
    window's float32 logits at a time), not from the model's own ``loss``, a mean over the whole batch:
    summing per window keeps the result independent of ``batch_size``. Plain ``model(input_ids=...)`` is
    used, which returns logits also after TRL patched the forward with its fused LM head (that head only
    replaces them when called with ``fused_lm_head=True``).

    Args:
        model: a Hugging Face causal LM (``model(input_ids=...).logits``); inputs go to the device of its
            input embeddings. It runs in eval mode; each module's train/eval mode is restored afterwards.
        tokenizer: used for text input; may be None when ``texts_or_dataset`` is already token ids.
        texts_or_dataset: text (a string or a list of strings), a ``pathlib.Path`` of a .txt / .jsonl /
            .json file or saved dataset folder, a ``datasets.Dataset`` (column ``text_field``; see
            :mod:`seft_trl.text`), or a LongTensor of token ids of shape ``[n]`` or ``[1, n]``.
        seqlen: tokens per window (2048 in the papers for LLaMA).
        batch_size: windows per forward pass; it changes speed and memory, not the result.
        progress: show a tqdm bar over the windows.
    """
    if seqlen < 2:
        raise ValueError(f"seqlen={seqlen}: a window needs at least 2 tokens to score one prediction.")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: use a positive number of windows per forward pass.")
    windows = _windows(_token_ids(tokenizer, texts_or_dataset, text_field), seqlen)
    device = model.get_input_embeddings().weight.device
    with _eval_mode(model):
        total = _total_nll(model, windows, batch_size, device, progress)
    return math.exp(total / (windows.shape[0] * (seqlen - 1)))


def _token_ids(tokenizer: PreTrainedTokenizerBase | None, source: TextInput, text_field: str) -> torch.Tensor:
    """The 1-D token ids of ``source``: given ids as they are, texts joined and tokenized once."""
    if isinstance(source, torch.Tensor):
        return _check_ids(source)
    return token_ids(tokenizer, source, text_field)


def _check_ids(ids: torch.Tensor) -> torch.Tensor:
    """Token ids given as a tensor, flattened from ``[1, n]``; anything else is a caller's mistake."""
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"Token ids must be an integer tensor, got {ids.dtype}; pass tokenizer output ids.")
    if ids.dim() == 2 and ids.shape[0] == 1:
        return ids[0].long()
    if ids.dim() == 1:
        return ids.long()
    raise ValueError(
        f"Token ids of shape {tuple(ids.shape)}: pass one sequence, shape [n] or [1, n] "
        "(concatenate several documents first)."
    )


def _windows(ids: torch.Tensor, seqlen: int) -> torch.Tensor:
    """``[n // seqlen, seqlen]`` non-overlapping windows; the tail shorter than a window is dropped."""
    count = ids.numel() // seqlen
    if count == 0:
        raise ValueError(
            f"The text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}: "
            "give more text or a smaller seqlen."
        )
    return ids[: count * seqlen].view(count, seqlen)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside, and each module's own mode back after: a caller mid-training may keep parts frozen in eval."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@torch.inference_mode()
def _total_nll(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device, progress: bool) -> float:
    """Sum over all windows of the NLL of their ``seqlen - 1`` next-token predictions."""
    total = 0.0
    with tqdm(total=windows.shape[0], desc="perplexity", unit="window", disable=not progress) as bar:
        for batch in windows.split(batch_size):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            for row_logits, row_ids in zip(logits, batch):
                total += float(F.cross_entropy(row_logits[:-1].float(), row_ids[1:], reduction="sum"))
            bar.update(batch.shape[0])
    return total


# ---------------------------------------------------------------------------------- zero-shot (lm-eval)


@dataclass(frozen=True)
class TaskScore:
    """One task's reported metric: a fraction in [0, 1], its standard error, and how many docs were scored."""

    task: str
    metric: str
    value: float
    stderr: float | None
    docs: int


@dataclass(frozen=True)
class ZeroShotResult:
    """The reported score of each task, their plain average (as the papers report it), and lm-eval's output.

    ``raw`` is what ``lm_eval.simple_evaluate`` returned: every metric, the configs, and per-doc samples
    (``raw["samples"][task]``, with each choice's log-likelihood) for anyone who needs more than the table.
    """

    scores: tuple[TaskScore, ...]
    raw: dict[str, Any]

    @property
    def average(self) -> float:
        """The unweighted mean over tasks, whatever their sizes: the "average" column of the papers."""
        return sum(score.value for score in self.scores) / len(self.scores)

    def table(self) -> str:
        """A Markdown table in percent, as in the papers, with the average as its last row."""
        lines = ["| Task | Metric | Value (%) | ± stderr | Docs |", "| --- | --- | ---: | ---: | ---: |"]
        for score in self.scores:
            stderr = "-" if score.stderr is None else f"{100 * score.stderr:.2f}"
            lines.append(f"| {score.task} | {score.metric} | {100 * score.value:.2f} | {stderr} | {score.docs} |")
        lines.append(f"| **average** | | **{100 * self.average:.2f}** | | |")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """The scores as plain JSON-ready data (fractions, not percent); ``raw`` is left out."""
        tasks = {
            score.task: {"metric": score.metric, "value": score.value, "stderr": score.stderr, "docs": score.docs}
            for score in self.scores
        }
        return {"tasks": tasks, "average": self.average}


def zero_shot(
    model: PreTrainedModel | str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase | str | None = None,
    tasks: Sequence[str] = PRUNING_TASKS,
    *,
    batch_size: int | str = 8,
    limit: int | float | None = None,
    num_fewshot: int = 0,
    metrics: Mapping[str, str] | None = None,
    include_path: str | os.PathLike | None = None,
    include_defaults: bool = True,
    device: str | None = None,
    print_table: bool = True,
) -> ZeroShotResult:
    """Run lm-evaluation-harness on ``tasks`` and return (and print) each task's score and the average.

    The default tasks and metrics are those of the pruning papers (see ``PRUNING_TASKS`` and
    ``PRUNING_METRICS``). Built-in tasks download their datasets from the Hub on first use; offline, point
    ``include_path`` at a folder of your own task YAMLs over local data.

    Args:
        model: an in-memory causal LM (evaluated where it is; its train/eval mode is restored afterwards),
            or the folder of a saved one (loaded on ``device``).
        tokenizer: the model's tokenizer; for a saved model it defaults to the same folder. An in-memory
            tokenizer is copied first, since lm-eval may set its pad token.
        tasks: single task names (not groups or tags, whose rows would not line up with the table).
        batch_size: an int, or lm-eval's ``"auto"``.
        limit: score only the first ``limit`` docs of each task (a fraction if below 1): for smoke tests.
        metrics: per task, the metric to report instead of ``PRUNING_METRICS`` (default ``"acc"``).
        include_path: a folder of extra task YAMLs.
        include_defaults: index lm-eval's built-in tasks too. Indexing its thousands of YAML files takes
            seconds; turn it off when every task comes from ``include_path``.
        device: where to load a saved model (default: cuda if available, else cpu). An in-memory model is
            not moved: move it yourself.
        print_table: print ``result.table()`` when done.
    """
    in_memory = not isinstance(model, (str, os.PathLike))
    _check_arguments(in_memory, tokenizer, device, tasks, metrics)
    lm_eval, HFLM, TaskManager = _import_lm_eval()
    task_manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    _check_known(task_manager, tasks)
    if in_memory:
        # HFLM switches the model to eval mode and may give the tokenizer a pad token: keep both the caller's.
        with _eval_mode(model):
            lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
            raw = _evaluate(lm_eval, lm, task_manager, tasks, limit, num_fewshot)
    else:
        tokenizer = model if tokenizer is None else tokenizer
        lm = HFLM(
            pretrained=str(model),
            tokenizer=str(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer,
            device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
            batch_size=batch_size,
        )
        raw = _evaluate(lm_eval, lm, task_manager, tasks, limit, num_fewshot)
    chosen = {**PRUNING_METRICS, **(metrics or {})}
    result = ZeroShotResult(tuple(_score(raw, task, chosen.get(task, DEFAULT_METRIC)) for task in tasks), raw)
    if print_table:
        print(result.table())
    return result


def _import_lm_eval() -> tuple[Any, Any, Any]:
    """lm_eval, its HFLM and TaskManager, imported on first use: it is an optional, heavy dependency."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ImportError(
            "zero_shot needs lm-evaluation-harness: pip install 'seft_trl[eval]'"
        ) from error
    return lm_eval, HFLM, TaskManager


def _check_arguments(
    in_memory: bool, tokenizer: Any, device: str | None, tasks: Sequence[str], metrics: Mapping[str, str] | None
) -> None:
    """Reject inconsistent arguments before paying for lm-eval's import, its task index and the model."""
    if in_memory and tokenizer is None:
        raise ValueError("An in-memory model needs its tokenizer: pass tokenizer=.")
    if in_memory and device is not None:
        raise ValueError("device= only places a saved model; move an in-memory model with model.to(device).")
    if isinstance(tasks, str):
        raise TypeError(f"tasks must be a list of names, got the string {tasks!r}: write [{tasks!r}].")
    if not tasks:
        raise ValueError("No tasks given: pass task names, e.g. seft_trl.evaluation.PRUNING_TASKS.")
    stray = sorted(set(metrics or {}) - set(tasks))
    if stray:
        raise ValueError(f"metrics= names tasks that are not evaluated: {stray}; the tasks are {list(tasks)}.")


def _check_known(task_manager: Any, tasks: Sequence[str]) -> None:
    """Reject unknown names, groups and tags before any model or dataset is loaded."""
    subtasks = set(task_manager.all_subtasks)
    for task in tasks:
        if task in subtasks:
            continue
        if task in task_manager.all_tasks:
            raise ValueError(f"{task!r} is a group or tag of lm-eval tasks: list its tasks one by one instead.")
        raise ValueError(
            f"Unknown task {task!r}: check the name against lm-eval's task list, or put its YAML in a "
            "folder passed as include_path= (with include_defaults=True for built-in tasks)."
        )


def _evaluate(
    lm_eval: Any, lm: Any, task_manager: Any, tasks: Sequence[str], limit: int | float | None, num_fewshot: int
) -> dict[str, Any]:
    """lm-eval's simple_evaluate, leaving the caller's global random states alone.

    Zero-shot log-likelihood scoring draws no random numbers; the few-shot sampler has its own seeded
    generator (``fewshot_random_seed``), so reseeding Python, NumPy and torch would only disturb a caller
    that evaluates in the middle of training.
    """
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=task_manager,
        random_seed=None,
        numpy_random_seed=None,
        torch_random_seed=None,
    )


def _score(raw: dict[str, Any], task: str, metric: str) -> TaskScore:
    """The reported metric of ``task`` from lm-eval's results (keys are ``"metric,filter"``)."""
    values = raw["results"][task]
    key = f"{metric},none"
    if key not in values:
        available = sorted(name.split(",")[0] for name in values if "," in name and "_stderr" not in name)
        raise ValueError(f"Task {task!r} has no metric {metric!r} (it has {available}); choose one with metrics=.")
    stderr = values.get(f"{metric}_stderr,none")
    return TaskScore(
        task=task,
        metric=metric,
        value=float(values[key]),
        stderr=float(stderr) if isinstance(stderr, (int, float)) else None,
        docs=int(raw["n-samples"][task]["effective"]),
    )
