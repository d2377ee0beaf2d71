"""seft_trl.evaluation: perplexity against a hand-computed reference, and the lm-eval wrapper on offline tasks.

The zero-shot tests run lm-evaluation-harness on two local tasks (tests/data/zero_shot_tasks, docs in jsonl)
with the tiny random LLaMA, and check the wrapper against a direct computation of every choice's
log-likelihood: what lm-eval scores must be what the model assigns to "<question prompt> <choice>".
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset

import seft_trl.evaluation as evaluation
from seft_trl.evaluation import PRUNING_TASKS, perplexity, zero_shot
from seft_trl.testing import byte_tokenizer, tiny_model

TASKS_DIR = Path(__file__).parent / "data" / "zero_shot_tasks"
LOCAL_TASKS = ("shortest_answer", "pick_a_word")
SEQLEN = 32

SENTENCES = [
    "Sparse models keep most of their weights at zero.",
    "",
    "Fine-tuning repairs what pruning broke, one update at a time.",
    "The quick brown fox jumps over the lazy dog, twice.",
    "Perplexity is the exponential of the mean negative log-likelihood.",
]  # 235 bytes joined with "\n\n": 7 windows of 32 tokens under the byte tokenizer, and 11 left over


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def reference_perplexity(model, ids: torch.Tensor, seqlen: int) -> float:
    """Each window's NLL of its seqlen - 1 next tokens, in float64, averaged over all predictions."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.numel() - seqlen + 1, seqlen):
            window = ids[start : start + seqlen]
            log_probs = torch.log_softmax(model(input_ids=window[None]).logits[0].double(), dim=-1)
            for position in range(seqlen - 1):
                total -= log_probs[position, window[position + 1]].item()
                count += 1
    return math.exp(total / count)


def joined_ids(tokenizer) -> torch.Tensor:
    return torch.tensor(tokenizer("\n\n".join(SENTENCES))["input_ids"])


# ------------------------------------------------------------------------------------------- perplexity


def test_perplexity_matches_a_hand_computed_reference(model, tokenizer):
    ids = joined_ids(tokenizer)
    assert ids.numel() // SEQLEN == 7 and ids.numel() % SEQLEN > 0  # the test text has a remainder to drop
    expected = reference_perplexity(model, ids, SEQLEN)
    assert perplexity(model, tokenizer, SENTENCES, seqlen=SEQLEN, progress=False) == pytest.approx(expected, rel=1e-5)


def test_batching_does_not_change_the_result(model, tokenizer):
    one = perplexity(model, tokenizer, SENTENCES, seqlen=SEQLEN, batch_size=1, progress=False)
    three = perplexity(model, tokenizer, SENTENCES, seqlen=SEQLEN, batch_size=3, progress=False)  # 3 + 3 + 1
    assert three == pytest.approx(one, rel=1e-5)


def test_the_remainder_is_dropped_and_full_windows_count(model, tokenizer):
    ids = joined_ids(tokenizer)
    whole = ids[: 7 * SEQLEN]
    base = perplexity(model, None, whole, seqlen=SEQLEN, progress=False)
    assert perplexity(model, None, ids, seqlen=SEQLEN, progress=False) == base  # the 11-token tail is ignored
    shorter = perplexity(model, None, ids[: 6 * SEQLEN], seqlen=SEQLEN, progress=False)
    assert shorter != pytest.approx(base, rel=1e-6)  # while every full window is scored


def test_every_input_form_gives_the_same_number(model, tokenizer):
    expected = perplexity(model, tokenizer, SENTENCES, seqlen=SEQLEN, progress=False)
    ids = joined_ids(tokenizer)
    dataset = Dataset.from_dict({"body": SENTENCES, "other": list(range(len(SENTENCES)))})
    assert perplexity(model, tokenizer, dataset, seqlen=SEQLEN, text_field="body", progress=False) == expected
    assert perplexity(model, tokenizer, "\n\n".join(SENTENCES), seqlen=SEQLEN, progress=False) == expected
    assert perplexity(model, None, ids, seqlen=SEQLEN, progress=False) == expected
    assert perplexity(model, None, ids[None], seqlen=SEQLEN, progress=False) == expected


def test_too_short_text_is_a_clear_error(model, tokenizer):
    with pytest.raises(ValueError, match="fewer than one window of seqlen=2048"):
        perplexity(model, tokenizer, SENTENCES, progress=False)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(texts_or_dataset=SENTENCES, seqlen=1), ValueError, "at least 2 tokens"),
        (dict(texts_or_dataset=SENTENCES, batch_size=0), ValueError, "positive number"),
        (dict(texts_or_dataset=Dataset.from_dict({"body": SENTENCES})), ValueError, "no column 'text'.*text_field="),
        (dict(texts_or_dataset=torch.zeros(2, 64, dtype=torch.long)), ValueError, r"shape \[n\] or \[1, n\]"),
        (dict(texts_or_dataset=torch.zeros(64)), TypeError, "integer tensor"),
        (dict(texts_or_dataset=[1, 2, 3]), TypeError, "list of strings"),
        (dict(texts_or_dataset=SENTENCES, tokenizer=None), ValueError, "needs a tokenizer"),
    ],
)
def test_bad_input_says_what_to_do(model, tokenizer, kwargs, error, match):
    arguments = dict(tokenizer=tokenizer, seqlen=SEQLEN, progress=False) | kwargs
    with pytest.raises(error, match=match):
        perplexity(model, **arguments)


def test_each_module_keeps_its_mode_and_no_graph_is_built(tokenizer):
    model = tiny_model("llama").train()
    model.model.layers[0].eval()  # a part kept frozen in eval mode while the rest trains
    perplexity(model, tokenizer, SENTENCES, seqlen=SEQLEN, progress=False)
    assert model.training and model.model.layers[1].mlp.training
    assert not model.model.layers[0].training and not model.model.layers[0].mlp.training
    assert all(parameter.grad is None for parameter in model.parameters())


def test_a_forward_patched_by_trl_gives_the_same_number(tokenizer):
    """TRL's trainers patch the forward with a fused LM head: plain calls must still return the logits."""
    from trl.trainer.utils import add_fused_lm_head

    model = tiny_model("llama")
    expected = perplexity(model, tokenizer, SENTENCES, seqlen=SEQLEN, progress=False)
    add_fused_lm_head(model)
    assert perplexity(model, tokenizer, SENTENCES, seqlen=SEQLEN, progress=False) == expected


# ---------------------------------------------------------------------------------- zero-shot (lm-eval)


def read_docs(task: str) -> list[dict]:
    return [json.loads(line) for line in (TASKS_DIR / f"{task}.jsonl").read_text().splitlines() if line.strip()]


def choice_logliks(model, tokenizer, doc: dict) -> list[float]:
    """log p(" <choice>" | "Question: <question>\\nAnswer:") of each choice, computed directly in float64."""
    context = tokenizer(f"Question: {doc['question']}\nAnswer:")["input_ids"]
    logliks = []
    with torch.no_grad():
        for choice in doc["choices"]:
            continuation = tokenizer(" " + choice)["input_ids"]
            ids = torch.tensor([context + continuation])
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            logliks.append(sum(log_probs[len(context) + i - 1, token].item() for i, token in enumerate(continuation)))
    return logliks


def expected_accuracy(model, tokenizer, task: str) -> tuple[float, float]:
    """acc (best log-likelihood) and acc_norm (best log-likelihood per character) from the direct computation."""
    hits = hits_norm = 0
    docs = read_docs(task)
    for doc in docs:
        logliks = choice_logliks(model, tokenizer, doc)
        per_char = [value / len(choice) for value, choice in zip(logliks, doc["choices"])]
        hits += max(range(len(logliks)), key=logliks.__getitem__) == doc["label"]
        hits_norm += max(range(len(per_char)), key=per_char.__getitem__) == doc["label"]
    return hits / len(docs), hits_norm / len(docs)


@pytest.fixture(scope="module")
def in_memory_run(model, tokenizer):
    """One wrapper run over both local tasks, with the model in training mode to check that it is restored."""
    model.train()
    try:
        result = zero_shot(
            model, tokenizer, LOCAL_TASKS, batch_size=4, include_path=TASKS_DIR, include_defaults=False,
            print_table=False,
        )
        return result, model.training
    finally:
        model.eval()


def test_zero_shot_scores_every_doc_and_restores_the_model(in_memory_run):
    result, still_training = in_memory_run
    assert still_training
    assert [score.task for score in result.scores] == list(LOCAL_TASKS)
    for score in result.scores:
        assert score.docs == len(read_docs(score.task))
        assert score.metric == "acc" and 0.0 <= score.value <= 1.0
        assert len(result.raw["samples"][score.task]) == score.docs


def test_zero_shot_scores_what_the_model_assigns_to_each_choice(model, tokenizer, in_memory_run):
    result, _ = in_memory_run
    for task in LOCAL_TASKS:
        docs = {sample["doc_id"]: sample for sample in result.raw["samples"][task]}
        for doc_id, doc in enumerate(read_docs(task)):
            scored = [loglik for loglik, _ in docs[doc_id]["filtered_resps"]]
            assert scored == pytest.approx(choice_logliks(model, tokenizer, doc), abs=1e-3)
        acc, acc_norm = expected_accuracy(model, tokenizer, task)
        values = result.raw["results"][task]
        assert (values["acc,none"], values["acc_norm,none"]) == pytest.approx((acc, acc_norm))


def test_the_shortest_answer_always_wins_on_a_random_model(in_memory_run):
    """Under a near-uniform random model each byte costs about log(259) nats: a 1-3 byte answer beats 30 bytes."""
    result, _ = in_memory_run
    assert result.as_dict()["tasks"]["shortest_answer"]["value"] == 1.0


def test_table_and_dict_report_the_average(in_memory_run):
    result, _ = in_memory_run
    values = [score.value for score in result.scores]
    summary = result.as_dict()
    assert summary["average"] == pytest.approx(sum(values) / 2)
    assert json.loads(json.dumps(summary)) == summary
    rows = result.table().splitlines()
    assert len(rows) == 2 + len(LOCAL_TASKS) + 1
    assert rows[2].startswith("| shortest_answer | acc | 100.00 |")
    assert rows[-1] == f"| **average** | | **{100 * summary['average']:.2f}** | | |"


def test_a_saved_model_gives_the_same_scores_and_prints_the_table(model, tokenizer, in_memory_run, tmp_path, capsys):
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    result = zero_shot(
        tmp_path, tasks=LOCAL_TASKS, batch_size=4, include_path=TASKS_DIR, include_defaults=False, device="cpu"
    )
    assert result.as_dict() == in_memory_run[0].as_dict()
    assert capsys.readouterr().out.strip().endswith(result.table().splitlines()[-1])


def test_another_metric_can_be_chosen_and_a_missing_one_is_named(model, tokenizer):
    common = dict(batch_size=4, include_path=TASKS_DIR, include_defaults=False, print_table=False)
    result = zero_shot(model, tokenizer, ["pick_a_word"], metrics={"pick_a_word": "acc_norm"}, **common)
    assert result.scores[0].metric == "acc_norm"
    assert result.scores[0].value == result.raw["results"]["pick_a_word"]["acc_norm,none"]
    with pytest.raises(ValueError, match=r"no metric 'f1' \(it has \['acc', 'acc_norm'\]\)"):
        zero_shot(model, tokenizer, ["pick_a_word"], metrics={"pick_a_word": "f1"}, **common)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(tokenizer=None), ValueError, "needs its tokenizer"),
        (dict(device="cpu"), ValueError, r"model.to\(device\)"),
        (dict(tasks="pick_a_word"), TypeError, r"write \['pick_a_word'\]"),
        (dict(tasks=[]), ValueError, "No tasks given"),
        (dict(metrics={"boolq": "acc"}), ValueError, "not evaluated: \\['boolq'\\]"),
        (dict(tasks=["no_such_task"]), ValueError, "Unknown task 'no_such_task'.*include_path="),
    ],
)
def test_zero_shot_rejects_bad_arguments_before_running(model, tokenizer, kwargs, error, match):
    arguments = dict(tokenizer=tokenizer, tasks=LOCAL_TASKS, include_path=TASKS_DIR, include_defaults=False) | kwargs
    with pytest.raises(error, match=match):
        zero_shot(model, **arguments)


def test_the_pruning_tasks_are_known_to_the_pinned_lm_eval(model, tokenizer):
    """Indexes lm-eval's built-in tasks (seconds): every default name resolves, a tag is refused before running."""
    with pytest.raises(ValueError, match="'ai2_arc' is a group or tag"):
        zero_shot(model, tokenizer, [*PRUNING_TASKS, "ai2_arc"])


def test_without_lm_eval_the_module_imports_and_zero_shot_says_what_to_install(monkeypatch, model, tokenizer):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail as if it were not installed
    spec = importlib.util.spec_from_file_location("seft_trl.evaluation_without_lm_eval", evaluation.__file__)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    with pytest.raises(ImportError, match=r"pip install 'seft_trl\[eval\]'"):
        module.zero_shot(model, tokenizer, ["pick_a_word"])
