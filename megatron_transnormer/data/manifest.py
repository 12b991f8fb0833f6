"""The dataset manifest: what a prepared dataset holds, and what training needs from it.

`manifest.json` lies beside the shards and the tokenizer file. Training reads it once
(`load_dataset_info`) to size the model's vocabulary and sequence length, and the
evaluation reads its per-split token and word counts to turn token perplexity into
word perplexity.

Every path a manifest holds (its shards, its tokenizer file) is relative to the
manifest's folder and stays inside it: a manifest comes with the data, and may come from
someone else, so it must not make training read `/etc/...`, `../../elsewhere` or run a
`pipe:` command. Shards are read from elsewhere only where the user's own config says
so (`data.shards`, see `locate_shards`).
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass

FORMAT = "megatron_transnormer.tokens"
VERSION = 1
MANIFEST_NAME = "manifest.json"
# Only this member extension is ever decoded: raw little-endian token ids.
SAMPLE_EXT = "tokens"
DTYPES = ("uint16", "uint32")


class DataError(ValueError):
    """Bad or inconsistent data on disk; the message names the file."""


def dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def manifest_path(path: str) -> str:
    return path if path.endswith(".json") else os.path.join(path, MANIFEST_NAME)


def _require(d: dict, key: str, where: str, kind=None):
    if key not in d:
        raise DataError(f"{where}: missing key {key!r}")
    value = d[key]
    if kind is not None and not isinstance(value, kind):
        raise DataError(f"{where}: key {key!r} has {type(value).__name__} {value!r}, expected {kind}")
    return value


_SHARDS_ELSEWHERE = " (to read shards from elsewhere, set data.shards in the config)"


def check_relative_name(name, what: str, hint: str = "") -> str:
    """`name` if it is a path inside the manifest's folder; else DataError naming `what`
    (e.g. '<manifest>: splits.train: shard') and the name."""
    reason = None
    if not isinstance(name, str) or not name:
        reason = "not a non-empty string"
    elif ":" in name.split("/", 1)[0]:  # what `locate_shards` users write as a URL or pipe:
        reason = "a URL or command, not a file name"
    elif os.path.isabs(name):
        reason = "an absolute path"
    elif ".." in name.split("/"):
        reason = "a path that leaves the manifest's folder"
    elif "\0" in name:
        reason = "not a file name (it holds a NUL byte)"
    if reason:
        raise DataError(f"{what} {name!r} is {reason}; a manifest names its files by paths relative to its "
                        f"own folder{hint}")
    return name


def validate_manifest(m: dict, where: str) -> dict:
    if m.get("format") != FORMAT:
        raise DataError(f"{where}: not a token dataset manifest (format={m.get('format')!r}, expected {FORMAT!r})")
    if m.get("version") != VERSION:
        raise DataError(f"{where}: manifest version {m.get('version')!r} is not supported (expected {VERSION})")
    for key in ("vocab_size", "seq_len", "sample_len"):
        if _require(m, key, where, int) <= 0:
            raise DataError(f"{where}: {key} must be positive, got {m[key]}")
    if _require(m, "dtype", where, str) not in DTYPES:
        raise DataError(f"{where}: dtype {m['dtype']!r} is not one of {DTYPES}")
    if m["vocab_size"] > 1 << 16 and m["dtype"] == "uint16":
        raise DataError(f"{where}: vocab_size {m['vocab_size']} does not fit dtype uint16")
    if _require(m, "packing", where, str) not in ("causal", "mlm"):
        raise DataError(f"{where}: packing {m['packing']!r} is not 'causal' or 'mlm'")
    tokenizer = _require(m, "tokenizer", where, dict)
    if "file" in tokenizer:
        check_relative_name(tokenizer["file"], f"{where}: tokenizer file")
    _require(m, "special", where, dict)
    for name, split in _require(m, "splits", where, dict).items():
        w = f"{where}: splits.{name}"
        for shard in _require(split, "shards", w, list):
            for key in ("name", "sha256", "samples", "tokens"):
                _require(shard, key, w)
            check_relative_name(shard["name"], f"{w}: shard", _SHARDS_ELSEWHERE)
        for key in ("tokens", "words", "samples"):
            _require(split, key, w, int)
    return m


@dataclass
class DatasetInfo:
    """A prepared dataset as training sees it (built by `load_dataset_info`); its tokenizer
    is loaded by `tokenizers.dataset_tokenizer`."""

    path: str  # the manifest file
    root: str  # the directory shard names are relative to
    manifest: dict

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    @property
    def seq_len(self) -> int:
        return self.manifest["seq_len"]

    @property
    def sample_len(self) -> int:
        return self.manifest["sample_len"]

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @property
    def packing(self) -> str:
        return self.manifest["packing"]

    @property
    def eod_id(self) -> int:
        return self.manifest["special"]["eod_id"]

    @property
    def pad_id(self) -> int:
        return self.manifest["special"]["pad_id"]

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    def split(self, name: str) -> dict:
        if name not in self.manifest["splits"]:
            raise DataError(f"{self.path}: no split {name!r} (has {', '.join(self.splits) or 'none'})")
        return self.manifest["splits"][name]

    def split_tokens(self, name: str) -> int:
        """Tokens of the whole tokenized split, document ends included."""
        return self.split(name)["tokens"]

    def split_words(self, name: str) -> int:
        """Whitespace-separated words of the split's original text."""
        return self.split(name)["words"]

    def shard_urls(self, name: str, location: str = "") -> list[str]:
        """Where each shard of a split is read from; see `locate_shards`."""
        return locate_shards([s["name"] for s in self.split(name)["shards"]], self.root, location)

    def check_model(self, vocab_size: int | None = None, seq_len: int | None = None) -> None:
        """Raise ValueError when the model cannot consume this dataset (0 or None: not checked,
        the config's "take it from the manifest")."""
        if vocab_size and vocab_size < self.vocab_size:
            raise ValueError(f"data.path: dataset {self.path} has vocabulary size {self.vocab_size}, larger than "
                             f"model.vocab_size={vocab_size}; set model.vocab_size >= {self.vocab_size} (or 0 "
                             f"to take it from the manifest)")
        if seq_len and seq_len != self.seq_len:
            raise ValueError(f"data.seq_len: {seq_len} does not match the sequence length {self.seq_len} the "
                             f"dataset {self.path} was packed with; re-prepare it with --seq-len {seq_len} "
                             f"or set data.seq_len=0")


def locate_shards(names: list[str], root: str, location: str = "") -> list[str]:
    """Shard URLs from a location: '' (the manifest's folder, which holds every shard its
    manifest names: `check_relative_name`), or, from the user's config only, a template
    holding {name} (e.g. 'pipe:curl -s https://host/ds/{name}'), a glob whose matches are
    taken by file name, or a folder / URL prefix."""
    base = [os.path.basename(n) for n in names]
    if not location:
        return [os.path.join(root, check_relative_name(n, f"{root}: shard", _SHARDS_ELSEWHERE)) for n in names]
    if "{name}" in location:
        return [location.replace("{name}", n) for n in base]
    if glob.has_magic(location):
        found = {os.path.basename(p): p for p in glob.glob(location)}
        missing = [n for n in base if n not in found]
        if missing:
            raise DataError(f"data.shards: {location!r} matches no file named {missing[0]}"
                            + (f" (and {len(missing) - 1} more shards)" if len(missing) > 1 else ""))
        return [found[n] for n in base]
    return [location.rstrip("/") + "/" + n for n in base]


def load_dataset_info(path: str) -> DatasetInfo:
    """Read and check the manifest of a prepared dataset (a directory or its manifest.json)."""
    if not path:
        raise DataError("data.path: empty; prepare a dataset with: python tools/prepare_data.py "
                        "--source shakespeare --output data/shakespeare")
    mpath = manifest_path(path)
    if not os.path.exists(mpath):
        raise DataError(f"data.path: no manifest at {mpath}; prepare it with: python tools/prepare_data.py "
                        f"--source shakespeare --output {os.path.dirname(mpath) or '.'}")
    try:
        with open(mpath, encoding="utf-8") as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{mpath}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{mpath}: expected a JSON object")
    validate_manifest(manifest, mpath)
    return DatasetInfo(path=mpath, root=os.path.dirname(os.path.abspath(mpath)), manifest=manifest)


def write_manifest(directory: str, manifest: dict) -> str:
    path = os.path.join(directory, MANIFEST_NAME)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path
