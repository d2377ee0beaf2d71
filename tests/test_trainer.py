"""SEFTSFTTrainer: the SFTTrainer swap, data formats, 8-bit optimizers, checkpoints, resume, bad input."""

from __future__ import annotations

import json
import warnings

import bitsandbytes as bnb
import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
from trl import SFTConfig, SFTTrainer

from conftest import random_batch
from seft_trl.testing import tiny_model
from seft_trl import NonFiniteError, SEFTCallback, SEFTConfig, SEFTSFTTrainer, SparseDeltaLinear, SparsityEvolution
from seft_trl import SparsityEvolutionConfig, sparsity_report
from trainer_helpers import byte_tokenizer, pruned_model, seft_args, text_dataset

SEFT_ONLY = {key for key in seft_args("x") if key.startswith("seft_")}


def sft_script(trainer_cls, config_cls, model, **args):
    """An ordinary TRL SFT script; only the two class names change between SFT and SEFT."""
    config = config_cls(**args)
    trainer = trainer_cls(model=model, args=config, train_dataset=text_dataset(), processing_class=byte_tokenizer())
    trainer.train()
    return trainer


def test_an_sft_script_runs_unchanged_apart_from_the_class_names(tmp_path):
    sft_kwargs = {k: v for k, v in seft_args(tmp_path / "sft").items() if k not in SEFT_ONLY}
    sft = sft_script(SFTTrainer, SFTConfig, pruned_model(), **sft_kwargs)
    model = pruned_model()
    start = sparsity_report(model)
    seft = sft_script(SEFTSFTTrainer, SEFTConfig, model, **seft_args(tmp_path / "seft"))

    assert sparsity_report(sft.model).sparsity < start.sparsity  # plain SFT densifies the pruned model
    end = sparsity_report(seft.model)
    assert end.within_budget and end.nonzeros <= start.nonzeros
    trained = [p for p in seft.model.parameters() if p.requires_grad]
    assert trained and all(p is layer.delta for p, layer in zip(trained, seft.seft.layers.values()))
    losses = [entry["loss"] for entry in seft.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0]
    logged = set().union(*seft.state.log_history)
    for key in ("drop_fraction", "grown", "revived", "removed", "refused", "sparsity", "delta_norm", "final_sparsity"):
        assert f"seft/{key}" in logged
    updates = [entry for entry in seft.state.log_history if "seft/grown" in entry]
    assert [entry["step"] for entry in updates] == [2, 4]  # every 2 steps; at step 6 the cosine fraction is 0


CONVERSATIONS = [
    {"messages": [{"role": "user", "content": f"What follows {i}?"}, {"role": "assistant", "content": f"{i + 1}."}]}
    for i in range(32)
]
PROMPT_COMPLETION = [{"prompt": f"What follows {i}? ", "completion": f"{i + 1}."} for i in range(32)]


@pytest.mark.parametrize(
    "rows,extra",
    [
        (CONVERSATIONS, {}),
        (PROMPT_COMPLETION, {"completion_only_loss": True, "gradient_accumulation_steps": 2}),
        (None, {"packing": True, "activation_checkpointing": False}),
    ],
    ids=["conversational", "prompt-completion+grad-accumulation", "packing"],
)
def test_data_formats_eval_and_accumulation(tmp_path, rows, extra):
    dataset = Dataset.from_list(rows) if rows else text_dataset()
    args = SEFTConfig(**seft_args(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=4, **extra))
    trainer = SEFTSFTTrainer(
        model=pruned_model(), args=args, train_dataset=dataset, eval_dataset=dataset.select(range(8)),
        processing_class=byte_tokenizer(),
    )
    trainer.train()
    assert any("eval_loss" in entry for entry in trainer.state.log_history)
    assert sparsity_report(trainer.model).within_budget
    assert trainer.seft.step_count == 4


def test_8bit_optimizer_gets_8bit_state_for_small_deltas(tmp_path):
    args = SEFTConfig(**seft_args(tmp_path, optim="adamw_8bit", max_steps=4))
    trainer = SEFTSFTTrainer(model=pruned_model(), args=args, train_dataset=text_dataset(), processing_class=byte_tokenizer())
    trainer.train()
    optimizer = trainer.optimizer.optimizer
    assert isinstance(optimizer, bnb.optim.AdamW)
    for layer in trainer.seft.layers.values():
        assert layer.delta.numel() < 4096  # bitsandbytes' own default would keep these in 32-bit
        assert optimizer.state[layer.delta]["state1"].dtype == torch.uint8
    assert sparsity_report(trainer.model).within_budget


def test_merged_checkpoint_reloads_without_seft_and_keeps_exact_zeros(tmp_path):
    model = pruned_model()
    start = sparsity_report(model)
    trainer = SEFTSFTTrainer(
        model=model, args=SEFTConfig(**seft_args(tmp_path)), train_dataset=text_dataset(), processing_class=byte_tokenizer()
    )
    trainer.train()
    trainer.save_model(tmp_path / "final")
    ids = random_batch(seed=1)
    with torch.no_grad():
        expected = trainer.model(input_ids=ids).logits
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert not any(isinstance(m, SparseDeltaLinear) for m in reloaded.modules())
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - expected).abs().max().item() == 0.0
    end = sparsity_report(reloaded)
    assert end.nonzeros <= start.nonzeros and end.sparsity >= start.sparsity
    report = json.loads((tmp_path / "final" / "sparsity_report.json").read_text())
    assert report["total"]["within_budget"] and report["total"]["nonzeros"] == end.nonzeros
    assert (tmp_path / "final" / "tokenizer.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".final.tmp")]  # staging folder cleaned up


UPDATES = dict(seft_update_interval=4, seft_accumulation_steps=3)
# Two groups taking turns: updates at 5 and 10, and at 7 and 12; the second group's window opens at step 6.
UPDATES_IN_TURNS = dict(seft_update_interval=5, seft_accumulation_steps=2, seft_window_groups=2)


def resume_run(output_dir, max_steps, density, resume=None, teacher=False, updates=UPDATES):
    args = SEFTConfig(
        **seft_args(output_dir, max_steps=12, save_strategy="steps", save_steps=6, seft_density=density, **updates)
    )
    trainer = SEFTSFTTrainer(model=pruned_model(), args=args, train_dataset=text_dataset(), processing_class=byte_tokenizer(),
                             teacher_model=tiny_model() if teacher else None)  # the dense parent of pruned_model()
    if max_steps < 12:  # stop after the checkpoint, as an interrupted run would
        trainer.add_callback(StopAt(max_steps))
    trainer.train(resume_from_checkpoint=resume)
    losses = {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}
    state = {n: (l.delta_index.clone(), l.delta.detach().clone(), l.weight.detach().clone()) for n, l in trainer.seft.layers.items()}
    return losses, state


class StopAt(SEFTCallback.__mro__[1]):  # a TrainerCallback
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


# The dense-then-gather and the sampled δ-gradient paths, distillation from the dense parent, and layers
# taking turns at updates.
@pytest.mark.parametrize("density, teacher, updates", [(0.1, False, UPDATES), (0.01, False, UPDATES),
                                                       (0.1, True, UPDATES), (0.01, False, UPDATES_IN_TURNS)],
                         ids=["dense-gather", "sampled", "teacher", "window-groups"])
def test_resume_reproduces_the_uninterrupted_run_bitwise(tmp_path, density, teacher, updates):
    straight_losses, straight = resume_run(tmp_path / "straight", 12, density, teacher=teacher, updates=updates)
    resume_run(tmp_path / "interrupted", 6, density, teacher=teacher, updates=updates)
    checkpoint = tmp_path / "interrupted" / "checkpoint-6"
    from safetensors import safe_open

    with safe_open(checkpoint / "model.safetensors", "pt") as f:  # step 6 is inside a window (of update 8, or 7)
        assert any(key.endswith("window_grad_sum") for key in f.keys())
    resumed_losses, resumed = resume_run(tmp_path / "interrupted", 12, density, resume=str(checkpoint), teacher=teacher,
                                         updates=updates)
    assert all(resumed_losses[step] == straight_losses[step] for step in range(7, 13))
    for name, (index, delta, weight) in straight.items():
        assert torch.equal(resumed[name][0], index)
        assert torch.equal(resumed[name][1], delta)
        assert torch.equal(resumed[name][2], weight)


def test_plain_transformers_trainer_with_the_callback(tmp_path):
    model = pruned_model()
    seft = SparsityEvolution(model, SparsityEvolutionConfig(density=0.05, update_interval=2, accumulation_steps=1))
    tokenizer = byte_tokenizer()
    dataset = text_dataset().map(lambda row: tokenizer(row["text"]), remove_columns=["text"])
    from transformers import DataCollatorForLanguageModeling

    trainer = Trainer(
        model=model,
        args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, max_steps=4, per_device_train_batch_size=4,
                               learning_rate=1e-2, report_to=[], save_strategy="no"),
        train_dataset=dataset,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=[SEFTCallback(seft)],
    )
    start_index = {n: l.delta_index.clone() for n, l in seft.layers.items()}
    trainer.train()
    assert seft.step_count == 4 and sparsity_report(model).within_budget
    assert any(not torch.equal(start_index[n], l.delta_index) for n, l in seft.layers.items())


def test_bf16_autocast_with_gradient_checkpointing_tracks_the_fp32_run(tmp_path):
    def run(bf16: bool):
        args = SEFTConfig(**seft_args(tmp_path / f"bf16-{bf16}", bf16=bf16, activation_checkpointing=True, max_steps=8))
        trainer = SEFTSFTTrainer(model=pruned_model(), args=args, train_dataset=text_dataset(), processing_class=byte_tokenizer())
        trainer.train()
        assert trainer.accelerator.mixed_precision == ("bf16" if bf16 else "no")
        assert trainer.model.is_activation_checkpointing
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        return torch.tensor(losses), trainer.seft

    fp32_losses, fp32 = run(False)
    bf16_losses, bf16 = run(True)
    # bf16 autocast rounds the matmul inputs to 8 mantissa bits: the losses agree to about 1%.
    torch.testing.assert_close(bf16_losses, fp32_losses, rtol=2e-2, atol=0.0)
    assert sparsity_report(bf16.model).within_budget
    same = sum(int(torch.isin(layer.delta_index, fp32.layers[name].delta_index).sum()) for name, layer in bf16.layers.items())
    assert same / sum(layer.delta.numel() for layer in bf16.layers.values()) > 0.9  # nearly the same topology


def test_a_skipped_optimizer_step_skips_the_update(tmp_path):
    model = pruned_model()
    seft = SparsityEvolution(model, SparsityEvolutionConfig(density=0.05, update_interval=1, accumulation_steps=1))
    optimizer = torch.optim.AdamW(seft.parameters(), lr=1e-2)
    callback = SEFTCallback(seft)
    state = type("State", (), {"max_steps": 10, "global_step": 0})()
    callback.on_train_begin(None, state, None, optimizer=optimizer)
    ids = random_batch()
    model(input_ids=ids, labels=ids).loss.backward()
    index_before = {n: l.delta_index.clone() for n, l in seft.layers.items()}

    class SkippedStep:  # accelerate's AcceleratedOptimizer reports an fp16-overflow skip like this
        step_was_skipped = True

    callback.on_optimizer_step(None, state, None, optimizer=SkippedStep())
    assert seft.step_count == 1 and not seft.last_update
    assert all(torch.equal(index_before[n], l.delta_index) for n, l in seft.layers.items())


# ------------------------------------------------------------------------------ bad input
def test_bad_input_is_rejected_before_training(tmp_path):
    from peft import LoraConfig

    tokenizer, dataset = byte_tokenizer(), text_dataset()
    with pytest.raises(ValueError, match="peft_config"):
        SEFTSFTTrainer(model=pruned_model(), args=SEFTConfig(**seft_args(tmp_path)), train_dataset=dataset,
                       processing_class=tokenizer, peft_config=LoraConfig())
    with pytest.raises(ValueError, match="empty"):
        SEFTSFTTrainer(model=pruned_model(), args=SEFTConfig(**seft_args(tmp_path)), train_dataset=dataset.select([]),
                       processing_class=tokenizer)
    with pytest.raises(ValueError, match="density"):
        SEFTConfig(**seft_args(tmp_path, seft_density=0.0))
    with pytest.raises(ValueError, match="matches no module"):
        SEFTSFTTrainer(model=pruned_model(), args=SEFTConfig(**seft_args(tmp_path, seft_target_modules=["qkv"])),
                       train_dataset=dataset, processing_class=tokenizer)
    with pytest.raises(ValueError, match="adafactor"):
        SEFTSFTTrainer(model=pruned_model(), args=SEFTConfig(**seft_args(tmp_path, optim="adafactor")),
                       train_dataset=dataset, processing_class=tokenizer)
    with pytest.raises(ValueError, match="hub_strategy"):  # it would push unmerged checkpoints
        SEFTSFTTrainer(model=pruned_model(), args=SEFTConfig(**seft_args(tmp_path, push_to_hub=True, hub_model_id="x/y",
                                                                        hub_strategy="checkpoint")),
                       train_dataset=dataset, processing_class=tokenizer)


@pytest.mark.parametrize("env, message", [
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "FSDP version 1"),
    ({"ACCELERATE_USE_FSDP": "true"}, "FSDP version 1"),  # accelerate's default version
])
def test_deepspeed_and_fsdp1_launches_are_refused_with_the_way_to_fsdp2(tmp_path, monkeypatch, env, message):
    args = SEFTConfig(**seft_args(tmp_path))  # built before the launch environment, as accelerate launch would not
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=message) as refused:
        SEFTSFTTrainer(model=pruned_model(), args=args, train_dataset=text_dataset(), processing_class=byte_tokenizer())
    assert "fsdp2.yaml" in str(refused.value)


def test_bitsandbytes_optimizers_are_refused_under_fsdp2_with_the_way_to_torchao(tmp_path, monkeypatch):
    args = SEFTConfig(**seft_args(tmp_path, optim="adamw_8bit"))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(ValueError, match="adamw_torch_8bit"):
        SEFTSFTTrainer(model=pruned_model(), args=args, train_dataset=text_dataset(), processing_class=byte_tokenizer())


def test_an_fsdp2_launch_that_accelerate_turns_into_ddp_is_reported(tmp_path, monkeypatch):
    args = SEFTConfig(**seft_args(tmp_path))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.warns(UserWarning, match="did not enable it"):
        trainer = SEFTSFTTrainer(model=pruned_model(), args=args, train_dataset=text_dataset(),
                                 processing_class=byte_tokenizer())
    assert not trainer.is_fsdp_enabled


def test_dense_model_trains_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match="dense"):
        trainer = SEFTSFTTrainer(model=tiny_model(), args=SEFTConfig(**seft_args(tmp_path, max_steps=2)),
                                 train_dataset=text_dataset(), processing_class=byte_tokenizer())
    trainer.train()


def test_model_given_as_a_path(tmp_path):
    pruned_model().save_pretrained(tmp_path / "pruned")
    args = SEFTConfig(**seft_args(tmp_path / "out", max_steps=2))
    trainer = SEFTSFTTrainer(model=str(tmp_path / "pruned"), args=args, train_dataset=text_dataset(),
                             processing_class=byte_tokenizer())
    assert trainer.seft.layers and isinstance(trainer.model.model.layers[0].mlp.up_proj, SparseDeltaLinear)
    trainer.train()
    assert sparsity_report(trainer.model).within_budget


def test_a_plain_sft_config_is_accepted_and_its_full_fine_tuning_rate_is_flagged(tmp_path):
    sft_kwargs = {k: v for k, v in seft_args(tmp_path).items() if k not in SEFT_ONLY and k != "learning_rate"}
    with pytest.warns(UserWarning, match="learning_rate=2e-05 is a full fine-tuning default"):
        trainer = SEFTSFTTrainer(model=pruned_model(), args=SFTConfig(**sft_kwargs), train_dataset=text_dataset(),
                                 processing_class=byte_tokenizer())
    assert isinstance(trainer.args, SEFTConfig) and trainer.args.learning_rate == 2e-5  # the user's config is kept
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        chosen = SEFTSFTTrainer(model=pruned_model(), args=SFTConfig(**sft_kwargs, learning_rate=1e-2),
                                train_dataset=text_dataset(), processing_class=byte_tokenizer())
    assert chosen.args.learning_rate == 1e-2


@pytest.mark.parametrize("value, where", [(float("nan"), "kept"), (float("inf"), "pruned")])
def test_a_non_finite_target_weight_is_refused_with_its_name_before_any_change(tmp_path, value, where):
    model = pruned_model()
    weight = model.model.layers[1].mlp.up_proj.weight
    with torch.no_grad():
        flat = weight.view(-1)
        flat[torch.nonzero(flat != 0 if where == "kept" else flat == 0)[0]] = value
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(NonFiniteError, match=r"model\.layers\.1\.mlp\.up_proj"):
        SEFTSFTTrainer(model=model, args=SEFTConfig(**seft_args(tmp_path)), train_dataset=text_dataset(),
                       processing_class=byte_tokenizer())
    assert not any(isinstance(module, SparseDeltaLinear) for module in model.modules())
    torch.testing.assert_close(dict(model.state_dict()), before, rtol=0, atol=0, equal_nan=True)


def test_a_diverging_run_stops_with_the_error_keeps_finite_weights_and_its_last_checkpoint(tmp_path):
    args = SEFTConfig(**seft_args(tmp_path, learning_rate=1e30, max_steps=8, save_strategy="steps", save_steps=1,
                                  max_grad_norm=0.0, logging_nan_inf_filter=False))
    trainer = SEFTSFTTrainer(model=pruned_model(), args=args, train_dataset=text_dataset(),
                             processing_class=byte_tokenizer())
    with pytest.raises(NonFiniteError, match="NaN or infinite.*Lower the learning rate"):
        trainer.train()
    step = trainer.seft.step_count
    assert 1 <= step < 8
    assert all(bool(torch.isfinite(layer.weight).all()) for layer in trainer.seft.layers.values())
    checkpoints = sorted(tmp_path.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    assert checkpoints and int(checkpoints[-1].name.split("-")[1]) == step - 1  # the last good step, whole
    assert (checkpoints[-1] / "trainer_state.json").exists()


def test_resume_passes_over_an_interrupted_checkpoint_and_names_a_damaged_file(tmp_path):
    import shutil

    def run(resume=None, max_steps=4):
        args = SEFTConfig(**seft_args(tmp_path, max_steps=max_steps, save_strategy="steps", save_steps=2))
        trainer = SEFTSFTTrainer(model=pruned_model(), args=args, train_dataset=text_dataset(),
                                 processing_class=byte_tokenizer())
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    run()
    # A kill while checkpoint-6 was being written: everything but the trainer state, which transformers writes last.
    shutil.copytree(tmp_path / "checkpoint-4", tmp_path / "checkpoint-6")
    (tmp_path / "checkpoint-6" / "trainer_state.json").unlink()
    with pytest.warns(UserWarning, match=r"incomplete checkpoint.*checkpoint-6.*Resuming from .*checkpoint-4"):
        resumed = run(resume=True, max_steps=6)
    assert resumed.state.global_step == 6 and resumed.seft.step_count == 6

    for name in ("optimizer.pt", "rng_state.pth", "model.safetensors"):
        damaged = tmp_path / "damaged" / name
        shutil.rmtree(damaged.parent, ignore_errors=True)
        shutil.copytree(tmp_path / "checkpoint-4", damaged.parent)
        with open(damaged, "r+b") as file:
            file.truncate(damaged.stat().st_size // 2)
        with pytest.raises(ValueError, match=rf"{name} is damaged.*truncated.*Resume from an earlier checkpoint"):
            run(resume=str(damaged.parent), max_steps=6)
    with pytest.raises(ValueError, match="does not exist"):
        run(resume=str(tmp_path / "checkpoint-99"))
