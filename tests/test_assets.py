"""Offline assets without the asset packages: the text split, the model cache, and the GGUF rebuild step."""

from __future__ import annotations

import bz2
import json
from xml.sax.saxutils import escape

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_model
from seft_trl.apps import assets
from seft_trl.apps.assets import english_texts, load_smollm2, package_dir, plain_copy, wikipedia_texts, wikitext_to_prose
from seft_trl.saving import save_checkpoint
from seft_trl.testing import byte_tokenizer


def test_english_texts_split_is_disjoint_deterministic_and_reads_latin1(tmp_path):
    background = [f"Background article {i}." for i in range(25)] + ["Background article 3."]  # one repeat
    (tmp_path / "lee_background.cor").write_text("\n".join(background) + "\n\n")
    (tmp_path / "lee.cor").write_bytes("Caf\xe9 society returns.\nSecond test article.\n".encode("latin-1"))
    train, heldout = english_texts(tmp_path)
    assert heldout == ["Café society returns.", "Second test article.", "Background article 9.",
                       "Background article 19."]
    assert len(train) == 23 and not set(train) & set(heldout)  # the repeated article is kept once
    assert english_texts(tmp_path) == (train, heldout)


def test_missing_asset_packages_name_the_install_command(tmp_path):
    with pytest.raises(ModuleNotFoundError, match="make assets"):
        package_dir("seft_trl_no_such_package")
    with pytest.raises(FileNotFoundError, match="make assets"):
        english_texts(tmp_path)


def test_load_smollm2_uses_the_cache_without_touching_the_gguf_file(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    save_checkpoint(tiny_model("llama"), byte_tokenizer(), cache)
    monkeypatch.setattr(assets, "smollm2_gguf", lambda: pytest.fail("a cached model must not be rebuilt"))
    model, tokenizer = load_smollm2(cache, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and not model.training
    expected = tiny_model("llama").model.layers[0].mlp.down_proj.weight.bfloat16()
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, expected)
    assert tokenizer("pruned")["input_ids"] == byte_tokenizer()("pruned")["input_ids"]


def test_concurrent_cache_builds_keep_the_first_published_and_leave_no_build_folder(tmp_path, monkeypatch):
    """Two benchmark lanes on a fresh machine build the cache at once; neither may break the other."""
    cache = tmp_path / "cache"

    def load_while_another_process_publishes(*args, **kwargs):
        save_checkpoint(tiny_model("mistral"), byte_tokenizer(), cache)  # the other process wins the race
        return tiny_model("llama")

    monkeypatch.setattr(assets.AutoTokenizer, "from_pretrained", lambda *a, **k: byte_tokenizer())
    monkeypatch.setattr(assets.AutoModelForCausalLM, "from_pretrained", load_while_another_process_publishes)
    assets._build_cache(tmp_path / "model.gguf", cache)
    assert json.loads((cache / "config.json").read_text())["model_type"] == "mistral"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]

    fresh = tmp_path / "fresh"
    monkeypatch.setattr(assets.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny_model("llama"))
    assets._build_cache(tmp_path / "model.gguf", fresh)
    assert json.loads((fresh / "config.json").read_text())["model_type"] == "llama"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "fresh"]


def test_plain_copy_drops_the_gguf_record_so_the_model_saves_and_reloads(tmp_path):
    model = tiny_model("mistral")
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "model.gguf", "dequantize": False}
    copy = plain_copy(model)
    assert not hasattr(copy.config, "quantization_config") and type(copy) is type(model)
    copy.save_pretrained(tmp_path / "plain")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


MARKUP = """{{Infobox person|name=Ada {{nowrap|Lovelace}}}}
'''Ada Lovelace''' ({{IPA|ˈeɪdə}}; 10 December 1815 – 27 November 1852) was an [[England|English]] [[mathematician]] and writer.<ref>{{cite book|title=A}}</ref>
{| class="wikitable"
|-
| a table cell || with many words that are not prose at all here
|}
== Early life ==
[[File:Ada.jpg|thumb|A portrait of [[Ada Lovelace|Ada]] in 1836 with many words]]
* She worked on ''Charles Babbage's'' proposed [http://example.org mechanical general-purpose computer], the Analytical Engine.<!-- a comment -->
Short line.
[[Category:Mathematicians]]
[[de:Ada Lovelace]]
== References ==
Babbage, Charles: a long reference line that is prose-like but belongs to the back matter of the article.
"""


def test_wikitext_to_prose_keeps_the_text_and_drops_the_markup():
    assert wikitext_to_prose(MARKUP) == (
        "Ada Lovelace (10 December 1815 – 27 November 1852) was an English mathematician and writer.\n"
        "She worked on Charles Babbage's proposed mechanical general-purpose computer, the Analytical Engine."
    )


def _page(title: str, text: str, namespace: int = 0, redirect: bool = False) -> str:
    marker = '<redirect title="Ada" />' if redirect else ""
    return (f"<page><title>{title}</title><ns>{namespace}</ns>{marker}"
            f"<revision><text>{escape(text)}</text></revision></page>")


def test_wikipedia_texts_streams_main_articles_and_splits_by_order(tmp_path):
    article = "Article {} is a plain paragraph of English prose with more than eight words."
    pages = [_page("Ada", MARKUP), _page("Redirect", "#REDIRECT [[Ada]]", redirect=True),
             _page("Wikipedia:About", article.format("meta"), namespace=4)]
    pages += [_page(f"A{i}", article.format(i)) for i in range(1, 11)]
    xml = '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">' + "".join(pages) + "</mediawiki>"
    dump = tmp_path / "dump.xml.bz2"
    dump.write_bytes(bz2.compress(xml.encode()))
    train, validation, test = wikipedia_texts(dump)
    assert test == [article.format(9)] and validation == [article.format(4)]  # the 10th and 5th of 11 articles
    assert train[0].startswith("Ada Lovelace") and len(train) == 9
    assert wikipedia_texts(dump) == (train, validation, test)
    with pytest.raises(FileNotFoundError, match="make assets"):
        wikipedia_texts(tmp_path / "missing.xml.bz2")
