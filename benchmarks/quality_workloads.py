"""What every method of the quality benchmark shares in one regime: model, text, token budget, cadence.

* short: the Lee news corpus (~80k training tokens), 32 steps × 4 × 128 tokens;
* long: the Wikipedia sample of gensim's test data (see :func:`seft_trl.apps.assets.wikipedia_texts`),
  256 steps × 4 × 256 tokens in one epoch, validation and test capped at ~12k and ~25k tokens;
* narrow (and its short screen): the repair a user runs on narrow data: trained on the Lee news corpus,
  pruned and validated on Wikipedia like the long regime, tested on Wikipedia (general text) and on
  held-out news (the repair's own domain);
* quick: a tiny random LLaMA on the README's and the documentation's paragraphs, the same code path as the regime it stands in for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from common import documentation_paragraphs
from seft_trl.text import token_ids

VAL_TOKENS, TEST_TOKENS = 24 * 512, 48 * 512  # long regime: whole 512-token evaluation windows
SMOLLM2 = "SmolLM2-135M-Instruct"


@dataclass
class Workload:
    """Everything that is the same for every method: model, text, budget."""

    load_model: Callable[[], nn.Module]
    tokenizer: object
    calibration_texts: list[str]
    train_ids: torch.Tensor  # [chunks, seqlen]
    val_ids: torch.Tensor  # [tokens]
    test_ids: torch.Tensor  # [tokens]
    steps: int
    batch_size: int
    eval_seqlen: int
    calibration: dict  # nsamples, seqlen of the Wanda calibration
    rank: int
    model_name: str
    corpus: str  # for the report: what the training text is
    val_source: str  # for the report: where the validation tokens come from
    test_source: str
    # SEFT options that set its topology cadence; empty: the engine's defaults.
    cadence: dict[str, int] = field(default_factory=dict)
    # More held-out texts measured with every run, by name (e.g. the training domain's validation and test
    # when validation and test are general text), and what each one is for the report.
    extra_evals: dict[str, torch.Tensor] = field(default_factory=dict)
    extra_sources: dict[str, str] = field(default_factory=dict)

    @property
    def seqlen(self) -> int:
        return self.train_ids.shape[1]

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size * self.seqlen

    def batches(self, seed: int) -> list[torch.Tensor]:
        """``steps`` batches of ``batch_size`` chunks in a seeded order (epochs repeat when the text runs out)."""
        generator = torch.Generator().manual_seed(seed)
        needed = self.steps * self.batch_size
        order = torch.cat([torch.randperm(len(self.train_ids), generator=generator)
                           for _ in range(-(-needed // len(self.train_ids)))])[:needed]
        return list(self.train_ids[order].split(self.batch_size))


def scaled_cadence(steps: int) -> dict[str, int]:
    """A topology cadence for a run of a few dozen steps: 8 intervals, a window of half an interval.

    The engine's defaults (interval 20, window 5) suit runs of hundreds of steps or more; a 32-step
    run would get one update at most.
    """
    interval = max(2, steps // 8)
    return {"update_interval": interval, "accumulation_steps": max(1, interval // 2)}


def chunks(ids: torch.Tensor, seqlen: int) -> torch.Tensor:
    """[tokens] -> [tokens // seqlen, seqlen]: consecutive, non-overlapping training sequences."""
    return ids[: len(ids) // seqlen * seqlen].view(-1, seqlen)


def capped_ids(tokenizer, texts: list[str], cap: int) -> torch.Tensor:
    """At most ``cap`` tokens spread evenly over ``texts``: the opening of each, an equal share apiece.

    A Wikipedia article runs to tens of thousands of tokens, so capping the joined text would measure
    one or two articles; an equal share of each keeps every held-out article in the measurement.
    Shares are dealt shortest article first, so what a short article leaves goes to the longer ones.
    """
    separator = token_ids(tokenizer, ["\n\n"])
    pieces = [torch.cat([token_ids(tokenizer, [text]), separator]) for text in texts]
    shares, left = {}, cap
    for dealt, index in enumerate(sorted(range(len(pieces)), key=lambda i: len(pieces[i]))):
        shares[index] = min(len(pieces[index]), left // (len(pieces) - dealt))
        left -= shares[index]
    return torch.cat([torch.cat([piece[: shares[i] - len(separator)], separator]) for i, piece in enumerate(pieces)])


def one_epoch(work: Workload) -> Workload:
    """``work`` unchanged, after checking that its batches use every training sequence at most once."""
    if work.steps * work.batch_size > len(work.train_ids):
        raise ValueError(
            f"{work.steps} steps × {work.batch_size} sequences need {work.tokens:,} training tokens; the corpus has "
            f"{work.train_ids.numel():,} in sequences of {work.seqlen}: lower --steps or --seqlen."
        )
    return work


def lee_workload(steps: int, batch_size: int, seqlen: int, eval_seqlen: int, rank: int, val_articles: int) -> Workload:
    """Short regime: the Lee news corpus; validation = the last ``val_articles`` training-side articles."""
    from seft_trl.apps.assets import english_texts, load_smollm2

    train_texts, test_texts = english_texts()
    train_texts, val_texts = train_texts[:-val_articles], train_texts[-val_articles:]
    _, tokenizer = load_smollm2()
    return Workload(
        load_model=lambda: load_smollm2()[0], tokenizer=tokenizer, calibration_texts=train_texts,
        train_ids=chunks(token_ids(tokenizer, train_texts), seqlen),
        val_ids=token_ids(tokenizer, val_texts), test_ids=token_ids(tokenizer, test_texts),
        steps=steps, batch_size=batch_size, eval_seqlen=eval_seqlen,
        calibration={"nsamples": 32, "seqlen": 512}, rank=rank, model_name=SMOLLM2,
        corpus="the Lee news corpus (Australian news, gensim's test data)",
        val_source="training-side articles never trained on", test_source="held-out articles (the demo's held-out set)",
        cadence=scaled_cadence(steps),
    )


def wikipedia_workload(steps: int, batch_size: int, seqlen: int, eval_seqlen: int, rank: int) -> Workload:
    """Long regime: Wikipedia articles, one epoch, the engine's own topology cadence."""
    from seft_trl.apps.assets import load_smollm2, wikipedia_texts

    train_texts, val_texts, test_texts = wikipedia_texts()
    _, tokenizer = load_smollm2()
    return one_epoch(Workload(
        load_model=lambda: load_smollm2()[0], tokenizer=tokenizer, calibration_texts=train_texts,
        train_ids=chunks(token_ids(tokenizer, train_texts), seqlen),
        val_ids=capped_ids(tokenizer, val_texts, VAL_TOKENS), test_ids=capped_ids(tokenizer, test_texts, TEST_TOKENS),
        steps=steps, batch_size=batch_size, eval_seqlen=eval_seqlen,
        calibration={"nsamples": 32, "seqlen": 512}, rank=rank, model_name=SMOLLM2,
        corpus=f"{len(train_texts)} English Wikipedia articles (the dump sample in gensim's test data, as prose)",
        val_source=opening_of(val_texts, "validation"), test_source=opening_of(test_texts, "test"),
    ))


def narrow_workload(steps: int, batch_size: int, seqlen: int, eval_seqlen: int, rank: int, val_articles: int,
                    cadence: dict[str, int], eval_share: float = 1.0) -> Workload:
    """A repair on narrow data: Lee news to train, Wikipedia to prune, validate and test on, held-out news as well.

    Pruning is the long regime's (Wanda calibrated on the Wikipedia training articles), so both settings
    start from the same pruned model and differ only in the repair text. The run repeats the news text
    in epochs, as instruction tuning on a small set does. ``eval_share``: the held-out texts are cut to
    this share of the long regime's caps (the screen's runs are shorter than their evaluation).
    """
    from seft_trl.apps.assets import english_texts, load_smollm2, wikipedia_texts

    news_train, news_test = english_texts()
    news_train, news_val = news_train[:-val_articles], news_train[-val_articles:]
    wiki_train, wiki_val, wiki_test = wikipedia_texts()
    _, tokenizer = load_smollm2()
    return Workload(
        load_model=lambda: load_smollm2()[0], tokenizer=tokenizer, calibration_texts=wiki_train,
        train_ids=chunks(token_ids(tokenizer, news_train), seqlen),
        val_ids=capped_ids(tokenizer, wiki_val, round(VAL_TOKENS * eval_share)),
        test_ids=capped_ids(tokenizer, wiki_test, round(TEST_TOKENS * eval_share)),
        steps=steps, batch_size=batch_size, eval_seqlen=eval_seqlen,
        calibration={"nsamples": 32, "seqlen": 512}, rank=rank, model_name=SMOLLM2,
        corpus=f"{len(news_train)} Lee news articles (Australian news, gensim's test data): narrow text",
        val_source=opening_of(wiki_val, "Wikipedia validation") + " (general text)",
        test_source=opening_of(wiki_test, "Wikipedia test") + " (general text)",
        cadence=cadence,
        extra_evals={"news_val": capped_ids(tokenizer, news_val, round(VAL_TOKENS * eval_share)),
                     "news_test": capped_ids(tokenizer, news_test, round(TEST_TOKENS * eval_share))},
        extra_sources={"news_val": f"the {len(news_val)} news articles held out of training (validation)",
                       "news_test": f"the {len(news_test)} held-out news articles of the demo (test)"},
    )


def opening_of(texts: list[str], split: str) -> str:
    return f"the opening of each of the {len(texts)} {split} articles in equal shares, short ones whole"


def quick_workload(steps: int, long: bool, narrow: bool = False) -> Workload:
    """A tiny random LLaMA and the README's and the docs' paragraphs: exercises every method in seconds.

    ``long`` takes the long regime's path (split by article order, capped held-out text, one epoch)
    with a cadence scaled to the few steps, so that topology updates happen; ``narrow`` adds the
    narrow regimes' extra held-out texts.
    """
    from seft_trl.apps.assets import split_by_order
    from seft_trl.testing import byte_tokenizer, tiny_model

    paragraphs = [p for p in documentation_paragraphs() if len(p) > 40]
    tokenizer = byte_tokenizer()
    if long:
        train, val, test = split_by_order(paragraphs)
        val_ids, test_ids = capped_ids(tokenizer, val, 512), capped_ids(tokenizer, test, 512)
    else:
        train, held_out = paragraphs[: len(paragraphs) // 2], paragraphs[len(paragraphs) // 2:]
        val_ids, test_ids = token_ids(tokenizer, held_out[::2])[:512], token_ids(tokenizer, held_out[1::2])[:512]
    extra = {"news_val": test_ids[:256], "news_test": val_ids[:256]} if narrow else {}
    work = Workload(
        load_model=tiny_model, tokenizer=tokenizer, calibration_texts=train,
        train_ids=chunks(token_ids(tokenizer, train), 32), val_ids=val_ids, test_ids=test_ids,
        steps=steps, batch_size=2, eval_seqlen=64, calibration={"nsamples": 4, "seqlen": 64}, rank=2,
        model_name="tiny random LLaMA (--quick)", corpus="the README's and the docs' paragraphs", val_source="other paragraphs",
        test_source="other paragraphs", cadence=scaled_cadence(steps), extra_evals=extra,
        extra_sources=dict.fromkeys(extra, "other paragraphs"),
    )
    return one_epoch(work) if long else work
