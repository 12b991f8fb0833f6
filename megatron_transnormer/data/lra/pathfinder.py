"""Pathfinder (32x32) and Path-X (128x128): `curv_contour_length_14/{imgs,metadata}` to
train / valid / test.

`metadata/<n>.npy` files are plain text despite their name, read as text (never through
numpy's loader): one image per line, `<dir> <file> <...> <label> ...`, the image being
`<dir>/<file>` under `curv_contour_length_14` and field 3 its label (0 or 1). The files
are taken in numeric order of <n> and their lines in order, as the reference code lists
them; 10% validation and 10% test are drawn as it draws them (`splits.random_split`,
seed 42). Images are decoded with Pillow (`convert("L")`, as the reference code) while a
shard fills (by `--workers` processes, in order), so Path-X (200,000 images of 16 KB) is
never held whole;
each becomes its side x side intensities 0-255 in row-major order (never padded).
"""
from __future__ import annotations

import multiprocessing as mp
import os
from dataclasses import dataclass

import numpy as np

from megatron_transnormer.data.manifest import DataError, check_relative_name
from megatron_transnormer.data.lra.files import find_base, text_lines
from megatron_transnormer.data.lra.splits import LRA_SPLIT_SEED, holdout_lengths, indices_digest, random_split
from megatron_transnormer.data.lra.writer import SplitWriter

LEVEL = "curv_contour_length_14"
SIDES = {"pathfinder": 32, "pathx": 128}
RELEASE_DIRS = {"pathfinder": "pathfinder32", "pathx": "pathfinder128"}
NUM_CLASSES = 2


@dataclass(frozen=True)
class Entry:
    image: str  # relative to the level's folder
    label: int
    where: str  # "<metadata file>: line N", for errors


def metadata_files(base: str) -> list[str]:
    folder = os.path.join(base, "metadata")
    names = [n for n in os.listdir(folder) if n.endswith(".npy")] if os.path.isdir(folder) else []
    if not names:
        raise DataError(f"{folder}: no metadata/*.npy index files")
    for n in names:
        if not n[:-4].isdigit():
            raise DataError(f"{os.path.join(folder, n)}: metadata files are named <number>.npy")
    return [os.path.join(folder, n) for n in sorted(names, key=lambda n: int(n[:-4]))]


def read_index(base: str) -> list[Entry]:
    entries = []
    for path in metadata_files(base):
        for number, line in text_lines(path):
            fields = line.split()
            if not fields:
                continue
            where = f"{path}: line {number}"
            if len(fields) < 4:
                raise DataError(f"{where}: expected at least 4 fields (dir, file, ..., label), got {len(fields)}")
            if fields[3] not in ("0", "1"):
                raise DataError(f"{where}: label {fields[3]!r} is not 0 or 1")
            # the index comes with the data: keep the images it names inside the level's folder
            image = check_relative_name(f"{fields[0]}/{fields[1]}", f"{where}: image")
            entries.append(Entry(image, int(fields[3]), where))
    if not entries:
        raise DataError(f"{os.path.join(base, 'metadata')}: the index files list no image")
    return entries


def decode(base: str, entry: Entry, side: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError
    path = os.path.join(base, entry.image)
    try:
        with Image.open(path) as img:
            img.load()
            if img.size != (side, side):
                raise DataError(f"{path}: image is {img.size[0]}x{img.size[1]}, expected {side}x{side} "
                                f"(listed in {entry.where})")
            return np.asarray(img.convert("L"), dtype=np.uint8).reshape(-1)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: missing image (listed in {entry.where})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot decode the image ({e}; listed in {entry.where})") from None


def _decode_job(job) -> np.ndarray:
    return decode(*job)


def prepare(input_dir: str, output: str, o) -> dict:
    task, side = o.task, SIDES[o.task]
    base = find_base(input_dir, ["", LEVEL, os.path.join(RELEASE_DIRS[task], LEVEL),
                                 os.path.join("lra_release", RELEASE_DIRS[task], LEVEL)], "metadata", task)
    if o.max_length and o.max_length != side * side:
        raise DataError(f"{task}: --max-length {o.max_length}: its images are {side * side} pixels")
    entries = read_index(base)
    lengths = holdout_lengths(len(entries), (0.1, 0.1))
    if min(lengths) < 1:
        raise DataError(f"{task}: {len(entries)} images in {base}/metadata make an empty split "
                        f"(train / valid / test {lengths})")
    pieces = random_split(len(entries), lengths, LRA_SPLIT_SEED)
    progress = _progress(o, len(entries), task)
    splits = {}
    pool = mp.get_context("spawn").Pool(o.workers) if o.workers > 1 else None
    try:
        for split, idx in zip(("train", "valid", "test"), pieces):
            writer = SplitWriter(output, split, side * side, NUM_CLASSES, -1, o.shard_samples)
            jobs = [(base, entries[i], side) for i in idx]
            # imap keeps the order, so the output does not depend on the number of workers
            images = pool.imap(_decode_job, jobs, chunksize=64) if pool else map(_decode_job, jobs)
            for i, pixels in zip(idx, images):
                writer.next_row()[:] = pixels
                writer.add(entries[i].label)
                progress.update(1)
            splits[split] = writer.close(indices_sha256=indices_digest(idx))
    finally:
        if pool:
            pool.terminate()
    progress.close()
    return dict(task=task, tokenizer={"type": "pixels", "vocab_size": 256, "source": os.path.abspath(base)},
                vocab_size=256, max_length=side * side, inputs=1, num_classes=NUM_CLASSES, special={},
                splits=splits,
                classification={"input_kind": "pixels", "image_shape": [side, side], "level": LEVEL,
                                "split": f"80/10/10, torch random_split seed {LRA_SPLIT_SEED}"})


def _progress(o, total: int, task: str):
    import sys

    from tqdm import tqdm
    return tqdm(total=total, unit="img", desc=f"decode {task}", file=sys.stderr, disable=not o.progress)
