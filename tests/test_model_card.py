"""Merged saves carry a model card with the model's provenance, and it loads as a hub card."""

from __future__ import annotations

from huggingface_hub import ModelCard

from seft_trl import SEFTConfig, SEFTSFTTrainer, sparsity_report
from seft_trl.pruning import prune
from seft_trl.testing import tiny_model
from seft_trl.trainer.model_card import final_metrics, hub_model_id
from trainer_helpers import byte_tokenizer, seft_args, text_dataset


def test_merged_save_writes_a_card_with_provenance_sparsity_and_metrics(tmp_path):
    model = tiny_model()
    prune(model, "magnitude", sparsity=0.5)
    assert model.config.pruning_config["method"] == "magnitude"
    model.config._name_or_path = "some-org/tiny-llama"  # as if loaded from the hub
    args = SEFTConfig(**seft_args(tmp_path / "run", max_steps=4, save_strategy="steps", save_steps=2))
    trainer = SEFTSFTTrainer(model=model, args=args, train_dataset=text_dataset(), processing_class=byte_tokenizer())
    trainer.train()
    # TRL writes a card beside every checkpoint; SEFT's replaces its generic one.
    assert "SEFT" in (tmp_path / "run" / "README.md").read_text()

    trainer.save_model(tmp_path / "final")
    card = ModelCard.load(tmp_path / "final" / "README.md")
    assert card.data.base_model == "some-org/tiny-llama"
    assert {"seft", "sparse", "trl", "sft"} <= set(card.data.tags)
    assert card.data.library_name == "transformers"
    final = sparsity_report(trainer.model)
    text = card.text
    assert f"{final.sparsity:.2%} sparse" in text and f"{final.nonzeros:,} nonzeros" in text
    assert "pruned with magnitude to 50%" in text
    assert "train_loss" in text and "| learning_rate | `0.01` |" in text and "| update_interval | `2` |" in text
    assert "- transformers: " in text and "- seft_trl: " in text
    # The pruning provenance also travels in config.json.
    assert '"pruning_config"' in (tmp_path / "final" / "config.json").read_text()


def test_card_helpers():
    assert hub_model_id("org/name") == "org/name"
    assert hub_model_id("/tmp") is None and hub_model_id("just-a-name") is None and hub_model_id(None) is None
    history = [{"loss": 2.0, "step": 1}, {"train_loss": 1.5, "train_runtime": 3.0, "step": 2}, {"eval_loss": 1.7, "step": 2}]
    assert final_metrics(history) == {"train_loss": 1.5, "train_runtime": 3.0, "eval_loss": 1.7, "global_step": 2}
