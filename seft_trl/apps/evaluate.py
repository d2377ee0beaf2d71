"""``seft-trl eval``: perplexity on a local text and the zero-shot suite of the pruning papers."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .options import CheckpointArguments, EvalArguments
from .recipes import measure_perplexity

EVAL_ARGUMENTS = (CheckpointArguments, EvalArguments)


def evaluate_checkpoint(checkpoint: CheckpointArguments, evaluation: EvalArguments) -> dict:
    """Perplexity on ``eval_text`` and, when tasks are named, the zero-shot suite; printed and returned."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if evaluation.eval_text is None and not evaluation.eval_tasks:
        raise ValueError("eval needs --eval_text (perplexity) or --eval_tasks (zero-shot), or both.")
    model_path = checkpoint.require_model("eval")
    device = checkpoint.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=checkpoint.torch_dtype()).to(device).eval()
    results: dict = {"model": model_path}
    if evaluation.eval_text is not None:
        measured = measure_perplexity(model, tokenizer, evaluation.eval_source(), evaluation.eval_seqlen)
        results.update(perplexity=measured.value, eval_seqlen=measured.seqlen, eval_note=measured.note)
        print(f"perplexity: {'-' if measured.value is None else f'{measured.value:.3f}'} "
              f"({measured.seqlen}-token windows{'; ' + measured.note if measured.note else ''})")
    if evaluation.eval_tasks:
        from ..evaluation import zero_shot

        scores = zero_shot(model, tokenizer, evaluation.eval_tasks, limit=evaluation.eval_limit)
        results["zero_shot"] = scores.as_dict()
    if checkpoint.output_dir:
        folder = Path(checkpoint.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "eval_results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
