"""Repair with the dense parent: the distillation loss, the teacher in the trainer, dense-value revival, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from datasets import Dataset

import seft_trl.distillation as distillation
from conftest import prune_linears, random_batch
from seft_trl import SEFTConfig, SEFTSFTTrainer, SparseDeltaLinear, SparsityEvolution, SparsityEvolutionConfig
from seft_trl import sparsity_report
from seft_trl.distillation import DistillationLoss, add_backbone_forward, distillation_loss
from seft_trl.parent import ModuleParent, SafetensorsParent
from seft_trl.testing import tiny_model
from trainer_helpers import byte_tokenizer, seft_args, text_dataset


def hand_loss(student, teacher, ids, labels, attention_mask, options: DistillationLoss) -> torch.Tensor:
    """The loss from the full logits and the textbook formulas, position by position."""
    out = student(input_ids=ids, attention_mask=attention_mask, output_hidden_states=True)
    with torch.no_grad():
        ref = teacher(input_ids=ids, attention_mask=attention_mask, output_hidden_states=True)
    total, count = 0.0, 0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            label = int(labels[b, t + 1])
            if label == -100:
                continue
            zs, zt = out.logits[b, t], ref.logits[b, t]
            ce = -torch.log_softmax(zs, -1)[label]
            ps = torch.softmax(zs / options.temperature, -1)
            pt = torch.softmax(zt / options.temperature, -1)
            if options.beta == 0.0:
                div = (pt * (pt.log() - ps.log())).sum()
            elif options.beta == 1.0:
                div = (ps * (ps.log() - pt.log())).sum()
            else:
                m = (1 - options.beta) * ps + options.beta * pt
                div = options.beta * (pt * (pt / m).log()).sum() + (1 - options.beta) * (ps * (ps / m).log()).sum()
            layers = [((hs[b, t] - ht[b, t]).pow(2).sum() / ht[b, t].pow(2).sum())
                      for hs, ht in zip(out.hidden_states[1:], ref.hidden_states[1:])]
            hidden = sum(layers) / len(layers)
            total = total + (1 - options.weight) * ce + options.weight * div + options.hidden_weight * hidden
            count += 1
    return total / count


@pytest.mark.parametrize("options", [
    DistillationLoss(weight=0.3, beta=0.0, temperature=1.0),
    DistillationLoss(weight=0.7, beta=1.0, temperature=2.0),
    DistillationLoss(weight=1.0, beta=0.5, temperature=0.5, hidden_weight=0.25),
], ids=["forward-kl", "reverse-kl-t2", "jsd-t0.5-hidden"])
def test_the_chunked_loss_and_its_gradient_equal_a_hand_computation(options, monkeypatch):
    monkeypatch.setattr(distillation, "CHUNK_ELEMENTS", 259 * 3)  # 3 tokens a chunk: several chunks per batch
    student, teacher = prune_linears(tiny_model(seed=1)), tiny_model(seed=2)
    student.lm_head.requires_grad_(False)
    ids = random_batch(3, 9, seed=0)
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt (completion-only loss)
    attention_mask = torch.ones_like(ids)
    attention_mask[2, 6:] = 0  # right padding, which the collator labels -100
    labels[2, 6:] = -100

    parts = distillation_loss(add_backbone_forward(student), add_backbone_forward(teacher),
                              {"input_ids": ids, "attention_mask": attention_mask, "labels": labels}, options)
    parts.loss.backward()
    chunked = {name: p.grad.clone() for name, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()
    expected = hand_loss(student, teacher, ids, labels, attention_mask, options)
    expected.backward()

    assert int(parts.tokens) == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(parts.loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    for name, p in student.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(chunked[name], p.grad, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in teacher.parameters())


def test_padding_and_masked_positions_change_nothing_and_accumulation_divides_by_the_items(monkeypatch):
    student, teacher = add_backbone_forward(prune_linears(tiny_model(seed=1))), add_backbone_forward(tiny_model(seed=2))
    options = DistillationLoss(weight=0.5)
    ids = random_batch(1, 8, seed=3)
    alone = distillation_loss(student, teacher, {"input_ids": ids, "labels": ids}, options)
    padded_ids = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 8, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)], 1)
    labels = torch.cat([ids, torch.full((1, 4), -100)], 1)
    padded = distillation_loss(student, teacher, {"input_ids": padded_ids, "attention_mask": mask, "labels": labels},
                               options)
    torch.testing.assert_close(padded.loss, alone.loss)
    halved = distillation_loss(student, teacher, {"input_ids": ids, "labels": ids}, options, num_items_in_batch=14)
    torch.testing.assert_close(halved.loss, alone.loss / 2)  # 7 counted tokens over 14 items of the whole batch


def test_the_trainer_distils_from_a_frozen_teacher_on_completions_only(tmp_path):
    dense = tiny_model()
    before = {key: value.clone() for key, value in dense.state_dict().items()}
    rows = [{"prompt": f"What follows {i}? ", "completion": f"{i + 1}."} for i in range(32)]
    args = SEFTConfig(**seft_args(tmp_path, completion_only_loss=True, distillation_weight=0.5, max_steps=4))
    trainer = SEFTSFTTrainer(model=prune_linears(copy.deepcopy(dense)), args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=byte_tokenizer(), teacher_model=dense)
    captured = []
    original = trainer.compute_loss

    def spy(model, inputs, *rest, **kwargs):
        captured.append(inputs["labels"].clone())
        return original(model, inputs, *rest, **kwargs)

    trainer.compute_loss = spy
    trainer.train()
    assert all(torch.equal(before[key], value) for key, value in dense.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in dense.parameters())
    logged = [entry for entry in trainer.state.log_history if "distill/divergence" in entry]
    assert len(logged) == 4 and all(entry["distill/divergence"] > 0 for entry in logged)
    assert all((labels == -100).any() for labels in captured)  # the prompts were masked
    assert isinstance(trainer.seft.parent, ModuleParent) and sparsity_report(trainer.model).within_budget

    # Without a distillation term the parent only seeds revivals: the loss is SFTTrainer's CE, no teacher runs.
    plain = SEFTSFTTrainer(model=prune_linears(copy.deepcopy(dense)), args=SEFTConfig(**seft_args(tmp_path,
                           distillation_weight=0.0)), train_dataset=text_dataset(), processing_class=byte_tokenizer(),
                           teacher_model=dense)
    assert plain.teacher is None and isinstance(plain.seft.parent, ModuleParent)


def test_packed_sequences_are_distilled_with_the_teacher_seeing_the_same_packing(tmp_path):
    dense = tiny_model()
    args = SEFTConfig(**seft_args(tmp_path, packing=True, activation_checkpointing=False, max_steps=2))
    trainer = SEFTSFTTrainer(model=prune_linears(copy.deepcopy(dense)), args=args, train_dataset=text_dataset(),
                             processing_class=byte_tokenizer(), teacher_model=dense)
    seen = []
    forward = trainer._teacher_model.forward
    trainer._teacher_model.forward = lambda *a, **kw: seen.append(sorted(kw)) or forward(*a, **kw)
    trainer.train()
    assert seen and all("position_ids" in keys for keys in seen)  # padding-free packing: positions restart per sequence
    assert all(entry["distill/divergence"] >= 0 for entry in trainer.state.log_history if "distill/divergence" in entry)


def test_a_teacher_held_in_8_bits_distils_and_revivals_read_the_parents_files(tmp_path):
    dense = tiny_model()
    dense.save_pretrained(tmp_path / "dense")
    args = SEFTConfig(**seft_args(tmp_path / "out", max_steps=2, teacher_model_name_or_path=str(tmp_path / "dense"),
                                  teacher_model_init_kwargs={"quantization_config": {"load_in_8bit": True}}))
    trainer = SEFTSFTTrainer(model=prune_linears(copy.deepcopy(dense)), args=args, train_dataset=text_dataset(),
                             processing_class=byte_tokenizer())
    assert type(trainer._teacher_model.model.layers[0].mlp.up_proj).__name__ == "Linear8bitLt"
    assert isinstance(trainer.seft.parent, SafetensorsParent)  # quantized weights are no starting values
    trainer.train()
    assert all(entry["distill/divergence"] > 0 for entry in trainer.state.log_history if "distill/divergence" in entry)


def test_a_revived_slot_starts_at_the_parents_value_and_every_layer_stays_within_budget(tmp_path):
    dense = tiny_model()
    dense.save_pretrained(tmp_path / "dense")
    for parent in (dense, tmp_path / "dense"):  # the loaded teacher, or the parent's files read lazily
        model = prune_linears(copy.deepcopy(dense))
        config = SparsityEvolutionConfig(density=0.05, update_interval=2, accumulation_steps=1, update_end=1.0,
                                         swap_test="none")
        seft = SparsityEvolution(model, config, parent=parent)
        assert isinstance(seft.parent, ModuleParent if parent is dense else SafetensorsParent)
        optimizer = torch.optim.AdamW(seft.parameters(), lr=1e-2)
        seft.attach(optimizer, total_steps=4)
        checked = revived_total = 0
        for step in range(4):
            before = {name: layer.weight.detach().clone() for name, layer in seft.layers.items()}
            batch = random_batch(seed=step)
            model(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            assert all(layer.budget_violations() == 0 for layer in seft.layers.values())
            for name, layer in seft.layers.items():
                index = layer.delta_index.long()
                revived = (before[name].view(-1)[index] == 0) & (layer.delta.detach() == 0)
                dense_values = dense.get_submodule(name).weight.detach().view(-1)[index[revived]]
                assert torch.equal(layer.delta_base[revived], dense_values)
                assert torch.equal(layer.weight.detach().view(-1)[index[revived]], dense_values)
                checked += int(revived.sum())
            revived_total += sum(stats.revived for stats in seft.last_update.values())
        assert checked == revived_total > 0  # every revival of the run, each at its parent's value


def test_dense_revival_prices_the_jump_and_leaves_newton_decisions_as_at_zero():
    from seft_trl.criteria import dense_revival, newton_gain, reachable_gain

    mean = torch.tensor([0.5, -0.2, 0.3])
    mean_sq = mean * mean  # noiseless: the debiasing, clamped at zero, would blur the identity below
    curvature = torch.tensor([2.0, 1.0, 4.0])
    revives = torch.tensor([True, True, False])
    values = torch.tensor([-0.25, 1.0])
    priced = dense_revival(revives, lambda index: values, torch.arange(3), mean, mean_sq, 4, curvature, math.inf,
                           newton_gain)
    assert torch.equal(priced.start, torch.tensor([-0.25, 1.0, 0.0]))
    torch.testing.assert_close(priced.gain, newton_gain(mean, mean_sq, 4, curvature))  # a quadratic's minimum
    reached = dense_revival(revives, lambda index: values, torch.arange(3), mean, mean_sq, 4, curvature, 1e-3,
                            reachable_gain)
    jump = -(priced.start * mean + 0.5 * priced.start ** 2 * curvature)
    assert reached.gain[0] > reachable_gain(mean, mean_sq, 4, curvature, 1e-3)[0]  # the jump goes downhill
    assert float(jump[1]) < 0 and reached.gain[1] < priced.gain[1]  # uphill: charged


# ------------------------------------------------------------------------------ bad input
def test_a_teacher_that_is_not_the_dense_parent_is_refused_before_the_model_changes(tmp_path):
    tokenizer = byte_tokenizer()
    args = SEFTConfig(**seft_args(tmp_path))

    def build(teacher, **config):
        student = prune_linears(tiny_model())
        with pytest.raises(ValueError) as refused:
            SEFTSFTTrainer(model=student, args=SEFTConfig(**seft_args(tmp_path, **config)) if config else args,
                           train_dataset=text_dataset(), processing_class=tokenizer, teacher_model=teacher)
        assert not any(isinstance(m, SparseDeltaLinear) for m in student.modules())  # untouched
        return str(refused.value)

    assert "vocabulary" in build(tiny_model(vocab_size=300))
    assert "does not exist" in build(str(tmp_path / "no-such-folder"))
    other = tiny_model()
    other.config.intermediate_size = 96
    wider = type(other)(other.config)  # same vocabulary, other MLP shapes
    assert "does not match the model's layers" in build(wider)
    # Distillation alone needs only the vocabulary: with revivals at zero the same teacher is accepted.
    student = prune_linears(tiny_model())
    SEFTSFTTrainer(model=student, args=SEFTConfig(**seft_args(tmp_path, seft_dense_revival=False)),
                   train_dataset=text_dataset(), processing_class=tokenizer, teacher_model=wider)
    folder = tmp_path / "parent"
    tiny_model().save_pretrained(folder)
    shuffled = byte_tokenizer()
    shuffled.add_tokens(["<extra>"])  # ids the student's tokenizer does not have
    shuffled.save_pretrained(folder)
    assert "tokenizer" in build(str(folder))


def test_distillation_options_are_checked_when_the_config_is_built(tmp_path):
    for bad, message in ((dict(distillation_weight=1.5), "distillation_weight"), (dict(beta=-0.1), "beta"),
                         (dict(temperature=0.0), "temperature"), (dict(hidden_state_weight=-1.0), "hidden_state_weight")):
        with pytest.raises(ValueError, match=message):
            SEFTConfig(**seft_args(tmp_path, **bad))
    with pytest.raises(ValueError, match="parent"):
        SparsityEvolution(prune_linears(tiny_model()), SparsityEvolutionConfig(density=0.05, dense_revival=True))
