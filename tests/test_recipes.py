"""The recipes run end to end on tiny random models of each architecture, and their configs parse."""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import LlamaConfig, LlamaForCausalLM
from trl import TrlParser

from seft_trl import SEFTConfig
from seft_trl.apps.recipes import REPAIR_ARGUMENTS, run, to_prompt_completion
from seft_trl.testing import byte_tokenizer, tiny_model

RECIPES = Path(__file__).parents[1] / "recipes"


def alpaca_jsonl(path: Path, n: int = 60) -> Path:
    rows = [
        {"instruction": f"Add one to {i}.", "input": "" if i % 2 else f"The number is {i}.", "output": f"{i + 1}"}
        for i in range(n)
    ]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def tiny_checkpoint(folder: Path, arch: str) -> Path:
    if arch == "deepseek":  # DeepSeek-LLM and R1-Distill-Llama are LLaMA architecture
        model = LlamaForCausalLM(LlamaConfig(vocab_size=259, hidden_size=64, intermediate_size=96,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4))
    else:
        model = tiny_model(arch)
    model.save_pretrained(folder)
    tokenizer = byte_tokenizer()
    if arch == "mistral":
        tokenizer.chat_template = None  # exercise the plain Alpaca prompt
    tokenizer.save_pretrained(folder)
    return folder


def recipe_argv(model: Path, data: Path, output: Path) -> list[str]:
    return [
        "--model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir", str(output),
        "--prune_method", "wanda", "--prune_nsamples", "4", "--prune_seqlen", "32", "--eval_seqlen", "32",
        "--heldout_fraction", "0.2", "--max_steps", "3", "--per_device_train_batch_size", "4",
        "--max_length", "64", "--use_cpu", "true", "--bf16", "false", "--report_to", "none",
        "--seft_density", "0.05", "--seft_update_interval", "1", "--seft_accumulation_steps", "1",
        "--learning_rate", "1e-3", "--save_strategy", "no",
    ]


@pytest.mark.parametrize("arch", ["llama", "deepseek", "mistral"])
def test_recipe_runs_on_a_tiny_model(arch, tmp_path, monkeypatch, capsys):
    model = tiny_checkpoint(tmp_path / "model", arch)
    data = alpaca_jsonl(tmp_path / "alpaca.jsonl")
    argv = recipe_argv(model, data, tmp_path / "out")
    monkeypatch.setattr(sys, "argv", [f"{arch}_alpaca.py", *argv])
    runpy.run_path(str(RECIPES / f"{arch}_alpaca.py"), run_name="__main__")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["pruned_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert summary["repaired_sparsity"] >= summary["pruned_sparsity"]
    assert summary["dense_ppl"] > 0 and summary["repaired_ppl"] > 0
    assert "perplexity repaired (SEFT)" in capsys.readouterr().out
    assert (tmp_path / "out" / "model.safetensors").exists() and (tmp_path / "out" / "sparsity_report.json").exists()
    assert summary["teacher"] == "the dense model before this run pruned it"  # distilled from the model it pruned


def test_a_repair_of_a_pruned_checkpoint_finds_the_parent_it_records(tmp_path):
    from seft_trl.apps.cli import main

    dense = tiny_checkpoint(tmp_path / "dense", "llama")
    main(["prune", "--model_name_or_path", str(dense), "--prune_method", "magnitude", "--output_dir", str(tmp_path / "pruned")])
    recorded = json.loads((tmp_path / "pruned" / "config.json").read_text())["pruning_config"]["parent"]
    assert recorded == str(dense.resolve())
    argv = recipe_argv(tmp_path / "pruned", alpaca_jsonl(tmp_path / "alpaca.jsonl"), tmp_path / "out")
    argv = argv[: argv.index("--prune_method")] + argv[argv.index("--prune_method") + 2:]  # already pruned
    assert run(default_model="unused", argv=argv)["teacher"] == recorded
    assert run(default_model="unused", argv=[*argv, "--use_parent", "false", "--output_dir", str(tmp_path / "ce")])["teacher"] is None
    shutil.rmtree(dense)  # a parent that is gone: the repair goes on with plain CE and says why
    with pytest.warns(UserWarning, match="names its dense parent, but it cannot be used"):
        assert run(default_model="unused", argv=[*argv, "--output_dir", str(tmp_path / "gone")])["teacher"] is None


def test_recipe_script_runs_as_a_process(tmp_path):
    model = tiny_checkpoint(tmp_path / "model", "llama")
    data = alpaca_jsonl(tmp_path / "alpaca.jsonl")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    result = subprocess.run([sys.executable, str(RECIPES / "llama_alpaca.py"), *recipe_argv(model, data, tmp_path / "out")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sparsity pruned / repaired" in result.stdout


def test_alpaca_formatting():
    row = {"instruction": "Say hi.", "input": "To Ada.", "output": "Hi Ada."}
    chat = to_prompt_completion(row, conversational=True)
    assert chat["prompt"] == [{"role": "user", "content": "Say hi.\n\nTo Ada."}]
    assert chat["completion"] == [{"role": "assistant", "content": "Hi Ada."}]
    plain = to_prompt_completion(row, conversational=False)
    assert plain["prompt"].endswith("### Response:\n") and "To Ada." in plain["prompt"] and plain["completion"] == "Hi Ada."


@pytest.mark.parametrize("config", sorted((RECIPES / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_recipe_config_parses(config):
    parser = TrlParser(REPAIR_ARGUMENTS)
    _, pruning, _, args, model_args, _ = parser.parse_args_and_config(["--config", str(config), "--use_cpu", "true", "--bf16", "false"])
    assert model_args.model_name_or_path and pruning.prune_method == "wanda"
    assert args.optim == "adamw_8bit" and args.seft_density == 0.01 and args.gradient_checkpointing


def test_the_learning_rate_defaults_to_one_that_moves_deltas_and_the_command_line_still_sets_it():
    parser = TrlParser((SEFTConfig,))
    cpu = ["--output_dir", "out", "--use_cpu", "true", "--bf16", "false"]
    (default,) = parser.parse_args_and_config(cpu)
    (chosen,) = parser.parse_args_and_config([*cpu, "--learning_rate", "1e-4"])
    assert default.learning_rate == 3e-3 and SEFTConfig(output_dir="out", use_cpu=True, bf16=False).learning_rate == 3e-3
    assert chosen.learning_rate == 1e-4


def test_a_tiny_dataset_never_aborts_the_run_on_its_held_out_perplexity(tmp_path):
    # 16 examples, 2% held out: one short example, far below the 2048-token default window.
    model = tiny_checkpoint(tmp_path / "model", "llama")
    data = alpaca_jsonl(tmp_path / "alpaca.jsonl", n=16)
    argv = recipe_argv(model, data, tmp_path / "out")
    argv[argv.index("--eval_seqlen") + 1] = "2048"
    argv[argv.index("--heldout_fraction") + 1] = "0.02"
    with pytest.warns(UserWarning, match="fewer than one window of 2048"):
        summary = run(default_model="unused", argv=argv)
    assert 2 <= summary["eval_seqlen"] < 2048 and "one window of" in summary["eval_note"]
    assert summary["pruned_ppl"] > 0 and summary["repaired_ppl"] > 0 and summary["dense_ppl"] > 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["eval_seqlen"] == summary["eval_seqlen"]


def test_recipe_runs_under_fsdp2_with_two_processes(tmp_path):
    # accelerate enables FSDP only on accelerator devices; tests/fsdp_on_cpu.py lets its FSDP2 path run on gloo.
    model = tiny_checkpoint(tmp_path / "model", "llama")
    data = alpaca_jsonl(tmp_path / "alpaca.jsonl")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(RECIPES / "accelerate" / "fsdp2_cpu.yaml"), str(Path(__file__).parent / "fsdp_on_cpu.py")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*launch, str(RECIPES / "llama_alpaca.py"), *recipe_argv(model, data, tmp_path / "out")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["launch"] == "FSDP2, 2 processes"
    assert summary["repaired_sparsity"] >= summary["pruned_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert summary["repaired_ppl"] > 0
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "out")  # the merged save is a plain checkpoint
    assert all(not hasattr(module, "delta") for module in merged.modules())
