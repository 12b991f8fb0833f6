"""Joining the parts of a distributed preparation into one dataset.

Each part (`tools/prepare_data.py --shard-index i --shard-count n`) is a dataset folder
of its own whose manifest has a `part` entry. The merge checks that the parts belong to
one preparation (the same tokenizer file, packing, sequence length, seed, input and
split settings, and every index 0 .. n-1 once) and writes one manifest whose splits list
the shards of part 0, then part 1, ...: each split's documents are in input order, as
in a one-shot preparation (only the samples at the seams between parts differ).

Shards of a part inside the output folder are referenced where they are; those of a
part elsewhere are hard-linked (copied across file systems) into `part-NNNNN/`.
"""
from __future__ import annotations

import os
import shutil

from megatron_transnormer.data.manifest import DataError, load_dataset_info, write_manifest

# What must be equal in every part (the tokenizer by its file's checksum).
SHARED = ("format", "version", "source", "vocab_size", "dtype", "byte_order", "seq_len", "sample_len", "packing",
          "seed", "special", "input")
TOKENIZER = ("type", "sha256", "vocab_size")
SUMMED = ("samples", "tokens", "dropped_tokens", "words", "lines", "documents", "text_bytes")


def _place(src: str, dst: str) -> None:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = dst + ".tmp"
    if os.path.exists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def merge_parts(part_dirs: list[str], output: str) -> dict:
    if not part_dirs:
        raise DataError("--merge needs the part folders")
    infos = []
    for d in part_dirs:
        info = load_dataset_info(d)
        if "part" not in info.manifest:
            raise DataError(f"part {d}: {info.path} is not a part of a distributed preparation (no 'part' entry; "
                            f"prepare it with --shard-index/--shard-count)")
        infos.append(info)
    first = infos[0]
    count = first.manifest["part"]["count"]
    for d, info in zip(part_dirs, infos):
        m = info.manifest
        for key in SHARED:
            if m.get(key) != first.manifest.get(key):
                raise DataError(f"part {d}: {key} is {m.get(key)!r}, but part {part_dirs[0]} has "
                                f"{first.manifest.get(key)!r}; every part must be prepared with the same settings")
        for key in TOKENIZER:
            if m["tokenizer"].get(key) != first.manifest["tokenizer"].get(key):
                raise DataError(f"part {d}: tokenizer {key} {m['tokenizer'].get(key)!r} differs from part "
                                f"{part_dirs[0]}'s {first.manifest['tokenizer'].get(key)!r}; every part must use "
                                f"the same --tokenizer-model (or --bpe-dir)")
        if m["part"]["count"] != count:
            raise DataError(f"part {d}: one of {m['part']['count']} parts, but part {part_dirs[0]} is one of {count}")
    by_index = {}
    for d, info in zip(part_dirs, infos):
        index = info.manifest["part"]["index"]
        if index in by_index:
            raise DataError(f"part {d}: index {index} is also part {by_index[index][0]}")
        by_index[index] = (d, info)
    missing = [i for i in range(count) if i not in by_index]
    if missing:
        raise DataError(f"--merge: parts {', '.join(map(str, missing))} of {count} are missing")

    os.makedirs(output, exist_ok=True)
    out_root = os.path.realpath(output)
    tok_name = first.manifest["tokenizer"]["file"]
    if os.path.realpath(os.path.join(first.root, tok_name)) != os.path.join(out_root, tok_name):
        _place(os.path.join(first.root, tok_name), os.path.join(output, tok_name))
    splits: dict[str, dict] = {}
    for index in range(count):
        d, info = by_index[index]
        root = os.path.realpath(info.root)
        inside = root == out_root or root.startswith(out_root + os.sep)
        for name, split in info.manifest["splits"].items():
            entry = splits.setdefault(name, {"shards": [], **{k: 0 for k in SUMMED}})
            for key in SUMMED:
                entry[key] += split.get(key, 0)
            for shard in split["shards"]:
                src = os.path.join(info.root, shard["name"])
                if not os.path.isfile(src):
                    raise DataError(f"part {d}: shard {shard['name']} is missing")
                if inside:
                    name_out = os.path.relpath(os.path.join(root, shard["name"]), out_root)
                else:
                    name_out = f"part-{index:05d}/{shard['name']}"
                    _place(src, os.path.join(output, name_out))
                entry["shards"].append({**shard, "name": name_out.replace(os.sep, "/")})
    for name, split in splits.items():
        if split["samples"] == 0:
            raise DataError(f"split {name}: the parts hold no sample of {first.sample_len} ids; use a smaller "
                            f"--seq-len")
    manifest = {k: v for k, v in first.manifest.items() if k != "part"}
    manifest["splits"] = splits
    manifest["parts"] = count
    write_manifest(output, manifest)
    return manifest
