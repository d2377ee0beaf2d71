"""``seft-trl`` and its subcommands: help, prune → report → eval on a tiny checkpoint, SEFT checkpoint budgets."""

from __future__ import annotations

import enum
import json
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from seft_trl import SEFTConfig, SEFTSFTTrainer, sparsity_report
from seft_trl.apps.cli import COMMANDS, main
from seft_trl.apps.noise import NOISE, silence_import_noise
from seft_trl.apps.report import checkpoint_report
from seft_trl.pruning import prune
from seft_trl.testing import byte_tokenizer, tiny_model
from trainer_helpers import seft_args, text_dataset

SEFT_TRL = Path(sys.executable).parent / "seft-trl"  # the console script pip installed
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
TEXT = " ".join(f"Sentence {i} says that {i} plus one is {i + 1}." for i in range(60))


def tiny_checkpoint(folder: Path) -> Path:
    tiny_model("llama").save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def test_the_console_script_runs_and_lists_the_subcommands():
    top = subprocess.run([str(SEFT_TRL), "--help"], env=ENV, capture_output=True, text=True, timeout=120)
    assert top.returncode == 0 and all(name in top.stdout for name in COMMANDS), top.stdout + top.stderr


HEAVY = ("torch", "transformers", "trl", "numpy", "accelerate", "peft")
# Runs the command line as the console script does, then lists the heavy modules it imported.
MAIN_THEN_IMPORTS = f"""
import sys
from seft_trl.apps.cli import main
try:
    main()
finally:
    print("imported:", *sorted(m for m in {HEAVY!r} if m in sys.modules), flush=True)
"""


@pytest.mark.parametrize(
    "argv, first_line",
    [(["--help"], "usage: seft-trl {"), ([], "usage: seft-trl {"), (["squash"], "seft-trl: unknown subcommand 'squash'")],
)
def test_the_top_level_answers_without_importing_torch_or_trl(argv, first_line):
    result = subprocess.run([sys.executable, "-c", MAIN_THEN_IMPORTS, *argv], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=120)
    lines = result.stdout.splitlines()
    assert "imported:" in lines, result.stdout  # with nothing after it
    lines.remove("imported:")
    assert lines[0].startswith(first_line), result.stdout


def test_a_subcommand_help_starts_with_its_usage_line():
    """No import notice of torch, torchao or bitsandbytes before it, on stdout and stderr as a terminal shows them."""
    result = subprocess.run([str(SEFT_TRL), "report", "--help"], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.startswith("usage: seft-trl report"), result.stdout


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_the_noise_filters_drop_those_notices_only(monkeypatch):
    so = "/env/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so"
    enum_notice = ("%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type. "
                   "Calling register_constant() on Enum subclasses is deprecated and will be an error in a future release.")
    torchao_enum = enum.Enum("KernelPreference", "AUTO", module="torchao.quantization.quantize_.common.kernel_preference")
    own_enum = enum.Enum("Scope", "ROW", module="seft_trl.patterns")
    # logger -> (message, args, whether it is a notice to drop), as the packages log them
    logged = {
        "torchao": [(f"Failed to load {so}: Could not load this library: {so}", (), True),
                    ("Skipping import of cpp extensions due to incompatible torch version.", (), False)],
        "torch.utils._pytree": [(enum_notice, (torchao_enum,), True), (enum_notice, (own_enum,), False)],
        "bitsandbytes.backends.cpu.ops": [
            ("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already `pip "
             "install kernels` and the kernels >= 0.11.1", (ImportError("kernels"),), True),
            ("Failed to load the CPU library: %s", ("libbitsandbytes_cpu.so",), False),
        ],
    }
    assert logged.keys() == NOISE.keys()
    collect = Collect()
    for name in logged:  # this test's filters and handler only, restored afterwards
        logger = logging.getLogger(name)
        monkeypatch.setattr(logger, "filters", [])
        monkeypatch.setattr(logger, "handlers", [collect])
        monkeypatch.setattr(logger, "propagate", False)
    warning_filters = list(warnings.filters)

    silence_import_noise()
    silence_import_noise()
    assert all(len(logging.getLogger(name).filters) == 1 for name in logged)  # once, however often it is called
    for name, records in logged.items():
        for message, args, _ in records:
            logging.getLogger(name).warning(message, *args)
    kept = [message % args for records in logged.values() for message, args, dropped in records if not dropped]
    assert collect.messages == kept
    assert warnings.filters == warning_filters  # warnings.warn, ours and transformers', is never touched


@pytest.mark.parametrize(
    "name, option",
    [("prune", "--prune_method"), ("repair", "--seft_density"), ("eval", "--eval_tasks"), ("report", "--model_name_or_path"),
     ("memory", "--gpu_memory_gb")],
)
def test_every_subcommand_has_help(name, option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0 and option in capsys.readouterr().out


def test_an_unknown_subcommand_is_refused_with_the_list(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["squash"])
    assert "unknown subcommand 'squash'" in str(exit_info.value.code) and "repair" in str(exit_info.value.code)


def test_prune_then_report_then_eval(tmp_path, capsys):
    source, pruned = tiny_checkpoint(tmp_path / "dense"), tmp_path / "pruned"
    main(["prune", "--model_name_or_path", str(source), "--prune_method", "magnitude", "--output_dir", str(pruned)])
    saved = json.loads((pruned / "sparsity_report.json").read_text())
    assert saved["pruning"]["method"] == "magnitude" and saved["total"]["sparsity"] == pytest.approx(0.5)

    main(["report", "--model_name_or_path", str(pruned), "--output_dir", str(tmp_path / "report")])
    assert "pattern unstructured" in capsys.readouterr().out
    report = json.loads((tmp_path / "report" / "sparsity_report.json").read_text())
    assert report["total"]["nonzeros"] == saved["total"]["nonzeros"] and report["layers"].keys() == saved["layers"].keys()

    text = tmp_path / "heldout.txt"
    text.write_text(TEXT)
    main(["eval", "--model_name_or_path", str(pruned), "--eval_text", str(text), "--eval_seqlen", "64",
          "--output_dir", str(tmp_path / "eval")])
    results = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert results["perplexity"] > 1 and results["eval_seqlen"] == 64 and results["eval_note"] == ""


@pytest.mark.parametrize(
    "argv, message",
    [
        (["prune", "--prune_method", "wanda", "--output_dir", "x"], "needs --model_name_or_path"),
        (["prune", "--model_name_or_path", "m", "--prune_pattern", "4:2"], "0 < N < M"),
        (["eval", "--model_name_or_path", "m"], "needs --eval_text"),
        (["eval", "--model_name_or_path", "m", "--eval_text", "/no/such.txt"], "does not exist"),
        (["memory", "--model_name_or_path", "m", "--optim", "lion"], "seft-trl memory knows"),
        (["memory", "--model_name_or_path", "m", "--sparsity", "1.5"], "give the pruned fraction"),
        (["memory", "--model_name_or_path", "m", "--sparsity_pattern", "2-4"], "N:M"),
    ],
)
def test_bad_options_stop_with_a_message_before_loading(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_report_of_a_seft_checkpoint_checks_its_budgets(tmp_path):
    model = tiny_model()
    prune(model, "magnitude", sparsity=0.5)
    args = SEFTConfig(**seft_args(tmp_path / "run", max_steps=4, save_strategy="steps", save_steps=4))
    trainer = SEFTSFTTrainer(model=model, args=args, train_dataset=text_dataset(), processing_class=byte_tokenizer())
    trainer.train()
    folder = tmp_path / "run" / "checkpoint-4"
    report = checkpoint_report(folder)
    live = {layer.name: layer for layer in sparsity_report(trainer.model).layers}
    assert report.within_budget and len(report.layers) == len(live)
    for layer in report.layers:
        assert layer.budget == live[layer.name].budget and layer.support == live[layer.name].support, layer.name

    # One more nonzero outside the support of a layer that is at its budget: the report must see it.
    weights_file = folder / "model.safetensors"
    tensors = load_file(weights_file)
    name = report.layers[0].name
    weight, index = tensors[f"{name}.weight"], tensors[f"{name}.delta_index"].long()
    outside = torch.ones(weight.numel(), dtype=torch.bool)
    outside[weight.reshape(-1) != 0] = False
    outside[index] = False
    weight.view(-1)[outside.nonzero()[0]] = 1.0
    for key in [k for k in tensors if k.endswith("support_budget") and k.startswith(name)]:
        tensors[key] = torch.tensor(report.layers[0].support)  # exactly at budget before the extra nonzero
    save_file(tensors, weights_file, metadata={"format": "pt"})
    tampered = checkpoint_report(folder)
    assert not tampered.layers[0].within_budget and not tampered.within_budget


def test_the_demo_parses_through_the_shared_option_classes():
    from seft_trl.apps.demo import parse_args
    from seft_trl.apps.options import EvalArguments, PruningArguments

    demo, pruning, evaluation = parse_args([])
    assert isinstance(pruning, PruningArguments) and isinstance(evaluation, EvalArguments)
    assert (pruning.prune_method, pruning.prune_nsamples, evaluation.eval_seqlen, demo.train_seqlen) == ("wanda", 32, 512, 256)
    assert demo.keep_cpu_heap is True and demo.use_parent is True  # the repair with the dense parent
    demo, pruning, _ = parse_args(["--model", "m", "--sparsity", "0.6", "--steps", "5"])  # the first flags still work
    assert (demo.model_name_or_path, pruning.prune_sparsity, demo.steps) == ("m", 0.6, 5)
    assert parse_args(["--keep_cpu_heap", "false"])[0].keep_cpu_heap is False
    with pytest.raises(SystemExit):
        parse_args(["--pattern", "4:2"])


def test_report_of_a_sharded_fsdp_checkpoint_says_to_report_the_merged_save(tmp_path):
    (tmp_path / "checkpoint-3" / "pytorch_model_fsdp_0").mkdir(parents=True)
    with pytest.raises(ValueError, match="sharded FSDP checkpoint.*save_model"):
        checkpoint_report(tmp_path / "checkpoint-3")


def test_user_mistakes_end_in_one_line_and_exit_status_2_and_debug_shows_the_traceback(tmp_path, capsys):
    model = tiny_checkpoint(tmp_path / "model")
    bad_json = tmp_path / "alpaca.jsonl"
    bad_json.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": "d"\n')
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    truncated = tmp_path / "truncated"
    tiny_checkpoint(truncated)
    weights = truncated / "model.safetensors"
    with open(weights, "r+b") as file:
        file.truncate(weights.stat().st_size - 100)
    no_config = tiny_checkpoint(tmp_path / "no_config")
    (no_config / "config.json").unlink()
    missing = str(tmp_path / "no" / "such" / "model")
    cpu = ["--use_cpu", "true", "--bf16", "false", "--report_to", "none"]
    cases = [
        (["prune", "--model_name_or_path", missing, "--prune_method", "magnitude", "--output_dir", str(tmp_path / "p")],
         "does not exist"),
        (["repair", "--model_name_or_path", missing, "--dataset_name", str(bad_json), "--output_dir", str(tmp_path / "r"),
          *cpu], "does not exist"),
        (["repair", "--model_name_or_path", str(model), "--dataset_name", str(bad_json), "--output_dir",
          str(tmp_path / "r"), *cpu], f"{bad_json}: line 3 is not valid JSON"),
        (["report", "--model_name_or_path", missing], "does not exist"),
        (["report", "--model_name_or_path", str(not_a_model)], "no config.json"),
        (["report", "--model_name_or_path", str(no_config)], "has no config.json"),
        (["report", "--model_name_or_path", str(truncated)], f"{weights} is damaged: .*truncated"),
    ]
    capsys.readouterr()  # the setup's progress bars
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, (argv, err)
        assert len(err.strip().splitlines()) == 1 and re.search(message, err), (argv, err)
        assert "Traceback" not in err and "Repo id" not in err
    with pytest.raises(ValueError, match="line 3 is not valid JSON"):  # --debug: the exception itself, traceback and all
        main(["repair", "--model_name_or_path", str(model), "--dataset_name", str(bad_json), "--output_dir",
              str(tmp_path / "r"), *cpu, "--debug"])


def test_memory_projects_every_method_from_the_config_alone_and_finds_the_density_that_fits(tmp_path, capsys):
    from seft_trl.memory import ModelShape, Workload, largest_density, per_device_bytes, training_memory, Method

    model = tiny_model("llama")
    model.config.save_pretrained(tmp_path)  # no weights: memory reads config.json only
    shape = ModelShape.from_config(model.config)
    work = Workload(batch=2, seqlen=64)
    fits = largest_density(shape, 1.2e6, work, "adamw_8bit")
    assert fits is not None and 0 < fits < 1
    step = lambda d: per_device_bytes(training_memory(shape, Method("seft", density=d), work, "adamw_8bit"))  # noqa: E731
    assert step(fits) <= 1.2e6 < step(fits + 0.001)
    main(["memory", "--model_name_or_path", str(tmp_path), "--gpu_memory_gb", "0.0012", "--per_device_train_batch_size",
          "2", "--max_length", "64", "--sparsity", "0.5"])
    out = capsys.readouterr().out
    assert f"largest seft_density that fits: {min(fits, 0.5):g}" in out
    assert "masked_full" in out and "spp r=64" in out
    # Layers taking turns at updates hold fewer windows at once: a larger density fits the same GPU.
    in_turns = largest_density(shape, 1.2e6, work, "adamw_8bit", window_groups=4)
    assert in_turns > fits
    main(["memory", "--model_name_or_path", str(tmp_path), "--gpu_memory_gb", "0.0012", "--per_device_train_batch_size",
          "2", "--max_length", "64", "--sparsity", "0.5", "--seft_window_groups", "4"])
    out = capsys.readouterr().out
    assert f"largest seft_density that fits: {min(in_turns, 0.5):g}" in out and "windows in 4 turns" in out
    # A 2:4 model: SEFT grows inside the pattern, its windows hold no removal candidates.
    in_pattern = largest_density(shape, 1.2e6, work, "adamw_8bit", regrow_pruned=False)
    assert in_pattern > fits
    main(["memory", "--model_name_or_path", str(tmp_path), "--gpu_memory_gb", "0.0012", "--per_device_train_batch_size",
          "2", "--max_length", "64", "--sparsity", "0.5", "--sparsity_pattern", "2:4"])
    out = capsys.readouterr().out
    assert f"largest seft_density that fits: {min(in_pattern, 0.5):g}" in out and "no revival" in out
