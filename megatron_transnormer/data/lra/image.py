"""Image (CIFAR-10): the binary release `cifar-10-batches-bin/` to train / valid / test.

`data_batch_{1..5}.bin` (training, in that order) and `test_batch.bin` are records of
1 label byte and 3072 pixel bytes: the R, G and B planes of a 32x32 image, rows first.
Nothing is unpickled. Each image becomes 1024 grayscale intensities 0-255 in row-major
order (a token per pixel, vocabulary 256, never padded):

- `lra` (default), LRA's `tf.image.rgb_to_grayscale` on uint8 images: in float32,
  g = 0.2989 R/255 + 0.5870 G/255 + 0.1140 B/255, stored as trunc(g * 255.5);
- `pil`, torchvision's `Grayscale()` (PIL's "L" conversion, the S4-derived code):
  (19595 R + 38470 G + 7471 B + 32768) >> 16.

The validation split is 10% of the training images, drawn as the reference code draws
it (`splits.random_split`, seed 42; 45,000 / 5,000 of 50,000).
"""
from __future__ import annotations

import os

import numpy as np

from megatron_transnormer.data.manifest import DataError
from megatron_transnormer.data.lra.files import find_base, require_files
from megatron_transnormer.data.lra.splits import LRA_SPLIT_SEED, indices_digest, random_split
from megatron_transnormer.data.lra.writer import SplitWriter

TRAIN_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)]
TEST_FILE = "test_batch.bin"
RECORD = 1 + 3 * 1024
NUM_CLASSES, SIDE = 10, 32
LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
GRAYSCALE = {
    "lra": "tf.image.rgb_to_grayscale: trunc(float32(0.2989 R/255 + 0.5870 G/255 + 0.1140 B/255) * 255.5)",
    "pil": "PIL 'L' (torchvision Grayscale): (19595 R + 38470 G + 7471 B + 32768) >> 16",
}


def grayscale(rgb: np.ndarray, method: str) -> np.ndarray:
    """[n, 3, P] uint8 planes -> [n, P] uint8."""
    if method == "lra":
        scale = np.float32(1.0 / 255)
        r, g, b = (rgb[:, c].astype(np.float32) * scale for c in range(3))
        gray = r * np.float32(0.2989) + g * np.float32(0.5870) + b * np.float32(0.1140)
        return (gray * np.float32(255.5)).astype(np.uint8)
    if method == "pil":
        r, g, b = (rgb[:, c].astype(np.uint32) for c in range(3))
        return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)
    raise DataError(f"--grayscale {method!r} is not one of {', '.join(GRAYSCALE)}")


def read_batch(path: str, method: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels [n], gray pixels [n, 1024]) of one .bin file."""
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if raw.size == 0 or raw.size % RECORD:
        raise DataError(f"{path}: {raw.size} bytes is not a whole number of {RECORD}-byte CIFAR-10 records "
                        f"(1 label byte + 3072 pixel bytes)")
    records = raw.reshape(-1, RECORD)
    labels = records[:, 0].astype(np.int64)
    bad = np.flatnonzero(labels >= NUM_CLASSES)
    if bad.size:
        raise DataError(f"{path}: record {int(bad[0])} has label byte {int(labels[bad[0]])}, not a class 0-9")
    return labels, grayscale(records[:, 1:].reshape(-1, 3, SIDE * SIDE), method)


def _write(output, split, labels, pixels, order, o) -> SplitWriter:
    writer = SplitWriter(output, split, SIDE * SIDE, NUM_CLASSES, -1, o.shard_samples)
    for i in order:
        writer.next_row()[:] = pixels[i]
        writer.add(int(labels[i]))
    return writer


def prepare(input_dir: str, output: str, o) -> dict:
    base = find_base(input_dir, ["", "cifar-10-batches-bin"], TRAIN_FILES[0], "image")
    require_files([os.path.join(base, f) for f in TRAIN_FILES + [TEST_FILE]], "image")
    if o.max_length and o.max_length != SIDE * SIDE:
        raise DataError(f"image: --max-length {o.max_length}: CIFAR-10 images are {SIDE * SIDE} pixels")
    # One file at a time; the training images are kept in gray (50,000 x 1 KB) to be split.
    parts = [read_batch(os.path.join(base, f), o.grayscale) for f in TRAIN_FILES]
    labels = np.concatenate([p[0] for p in parts])
    pixels = np.concatenate([p[1] for p in parts])
    n = len(labels)
    train_len = int(n * (1.0 - 0.1))  # as the reference code computes it
    train_idx, valid_idx = random_split(n, [train_len, n - train_len], LRA_SPLIT_SEED)
    splits = {}
    for split, idx in (("train", train_idx), ("valid", valid_idx)):
        splits[split] = _write(output, split, labels, pixels, idx, o).close(
            source=" ".join(TRAIN_FILES), indices_sha256=indices_digest(idx))
    del labels, pixels, parts
    test_labels, test_pixels = read_batch(os.path.join(base, TEST_FILE), o.grayscale)
    splits["test"] = _write(output, "test", test_labels, test_pixels, range(len(test_labels)), o).close(
        source=TEST_FILE)
    return dict(task="image", tokenizer={"type": "pixels", "vocab_size": 256, "source": os.path.abspath(base)},
                vocab_size=256, max_length=SIDE * SIDE, inputs=1, num_classes=NUM_CLASSES, special={},
                splits=splits,
                classification={"input_kind": "pixels", "image_shape": [SIDE, SIDE], "label_names": LABEL_NAMES,
                                "grayscale": GRAYSCALE[o.grayscale],
                                "split": f"valid: 10% of train, torch random_split seed {LRA_SPLIT_SEED}"})
