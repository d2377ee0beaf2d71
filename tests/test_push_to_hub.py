"""push_to_hub uploads the merged folder only: never a checkpoint, never SEFT state (hub calls faked)."""

from __future__ import annotations

import shutil
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.utils import filter_repo_objects
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from seft_trl import SEFTConfig, SEFTSFTTrainer, sparsity_report
from seft_trl.pruning import prune
from seft_trl.testing import tiny_model
from trainer_helpers import byte_tokenizer, seft_args, text_dataset


class FakeHub:
    """Stands in for the hub: records created repos and snapshots what each upload would send."""

    def __init__(self, root: Path) -> None:
        self.root, self.repos, self.uploads = root, [], []

    def create_repo(self, api: HfApi, repo_id: str, **kwargs) -> SimpleNamespace:
        self.repos.append(repo_id)
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, api: HfApi, *, folder_path, run_as_future: bool = False, **kwargs):
        folder = Path(folder_path)
        files = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*")) if p.is_file()]
        # The filter upload_folder itself applies to the folder's files.
        sent = sorted(filter_repo_objects(files, allow_patterns=kwargs.get("allow_patterns"),
                                          ignore_patterns=kwargs.get("ignore_patterns")))
        snapshot = self.root / f"upload-{len(self.uploads)}"
        for name in sent:
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(folder / name, snapshot / name)
        self.uploads.append(dict(kwargs, folder=folder, files=set(sent), snapshot=snapshot))
        if run_as_future:
            future: Future = Future()
            future.set_result(None)
            return future
        return SimpleNamespace(commit_url="fake")


@pytest.fixture
def hub(tmp_path, monkeypatch) -> FakeHub:
    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: fake.create_repo(api, repo_id, **kw))
    monkeypatch.setattr(HfApi, "upload_folder", lambda api, **kw: fake.upload_folder(api, **kw))
    return fake


def pruned():
    model = tiny_model()
    prune(model, "magnitude", sparsity=0.5)
    return model


def plain_save_files(model, tmp_path: Path) -> tuple[set[str], set[str]]:
    """The files and weight keys of a plain (never SEFT-wrapped) model and tokenizer save."""
    folder = tmp_path / "plain"
    LlamaForCausalLM(model.config).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    files = {p.name for p in folder.iterdir()} | {"README.md", "sparsity_report.json"}
    return files, set(load_file(folder / "model.safetensors"))


def check_merged_upload(upload: dict, trainer: SEFTSFTTrainer, files: set[str], keys: set[str]) -> None:
    assert upload["repo_id"] == "org/name"
    assert upload["files"] == files
    assert not any(name.startswith("checkpoint-") or "/" in name for name in upload["files"])
    weights = load_file(upload["snapshot"] / "model.safetensors")
    assert set(weights) == keys  # no delta / delta_index / SEFT buffer
    trained = trainer.model.state_dict()
    assert all(torch.equal(weights[key], trained[key].cpu()) for key in keys)
    loaded = AutoModelForCausalLM.from_pretrained(upload["snapshot"])  # a plain model, without seft_trl
    report, final = sparsity_report(loaded), sparsity_report(trainer.model)
    assert report.nonzeros == final.nonzeros and report.numel == final.numel  # exact zeros
    card = ModelCard.load(upload["snapshot"] / "README.md")
    assert "seft" in card.data.tags and f"{final.sparsity:.2%} sparse" in card.text


def test_training_pushes_no_checkpoint_and_push_to_hub_uploads_the_merged_folder(tmp_path, hub):
    out = tmp_path / "run"
    args = SEFTConfig(**seft_args(out, max_steps=4, save_strategy="steps", save_steps=2, push_to_hub=True,
                                  hub_model_id="org/name"))
    with pytest.warns(UserWarning, match="every_save"):
        trainer = SEFTSFTTrainer(model=pruned(), args=args, train_dataset=text_dataset(),
                                 processing_class=byte_tokenizer())
    assert hub.repos == ["org/name"]
    trainer.train()
    assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-4").is_dir()
    assert hub.uploads == []  # transformers would push at every save (hub_strategy="every_save")
    files, keys = plain_save_files(trainer.model, tmp_path)

    # save_model() with args.push_to_hub uploads the folder it wrote, as in transformers.
    trainer.save_model(tmp_path / "final")
    [upload] = hub.uploads
    assert upload["folder"] == tmp_path / "final" and upload["commit_message"] == "Model save"
    check_merged_upload(upload, trainer, files, keys)

    # push_to_hub() saves merged into output_dir, beside checkpoints and other files, and uploads only that save.
    (out / "notes.txt").write_text("not part of the model")
    (out / "runs").mkdir()
    (out / "runs" / "events").write_text("logs")
    trainer.push_to_hub(dataset_name="some/data")
    upload = hub.uploads[1]
    assert upload["folder"] == out and upload["commit_message"] == "End of training"
    check_merged_upload(upload, trainer, files, keys)
    assert ModelCard.load(upload["snapshot"] / "README.md").data.datasets == ["some/data"]


def test_push_to_hub_without_the_option_creates_the_repo_then_uploads_merged(tmp_path, hub):
    args = SEFTConfig(**seft_args(tmp_path / "name", max_steps=2, hub_model_id="org/name"))
    trainer = SEFTSFTTrainer(model=pruned(), args=args, train_dataset=text_dataset(), processing_class=byte_tokenizer())
    trainer.train()
    assert hub.repos == [] and hub.uploads == []
    trainer.push_to_hub()
    assert hub.repos == ["org/name"]
    check_merged_upload(hub.uploads[0], trainer, *plain_save_files(trainer.model, tmp_path))


@pytest.mark.parametrize("strategy", ["checkpoint", "all_checkpoints"])
def test_checkpoint_hub_strategies_are_refused_at_construction(tmp_path, hub, strategy):
    args = SEFTConfig(**seft_args(tmp_path, push_to_hub=True, hub_model_id="org/name", hub_strategy=strategy))
    with pytest.raises(ValueError, match=f"hub_strategy='{strategy}'.*merged"):
        SEFTSFTTrainer(model=pruned(), args=args, train_dataset=text_dataset(), processing_class=byte_tokenizer())
    assert hub.repos == []  # refused before the repo is created
