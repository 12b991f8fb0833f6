"""Image (CIFAR-10 binary release), Pathfinder and Path-X: pixels, seeded splits, errors."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from megatron_transnormer.data.lra import lra_batches, load_lra_info
from megatron_transnormer.data.lra.image import grayscale
from megatron_transnormer.data.lra.prepare import LRAOptions, prepare_lra
from megatron_transnormer.data.manifest import DataError
from tests.data.test_lra_fakes import pathfinder_pixels, run_tool, write_cifar, write_pathfinder


def all_rows(path, split, batch_size=64):
    """(tokens, labels) of a whole split in manifest order."""
    batches = list(lra_batches(path, split, batch_size, shuffle=False))
    tokens = torch.cat([b.tokens for b in batches])
    labels = torch.cat([b.labels for b in batches])
    keep = labels >= 0
    return tokens[keep], labels[keep]


def test_cifar_grayscale_labels_and_seeded_validation_split(tmp_path):
    write_cifar(str(tmp_path / "raw"))
    r = run_tool("--task", "image", "--input", str(tmp_path / "raw"), "--output", str(tmp_path / "ds"))
    assert r.returncode == 0, r.stderr
    info = load_lra_info(str(tmp_path / "ds"))
    assert (info.vocab_size, info.max_length, info.num_classes, info.pad_id) == (256, 1024, 10, -1)
    m = info.dataset.manifest
    assert {k: s["samples"] for k, s in m["splits"].items()} == {"train": 18, "valid": 2, "test": 3}
    tokens, labels = all_rows(str(tmp_path / "ds"), "train")
    valid, valid_labels = all_rows(str(tmp_path / "ds"), "valid")
    # LRA's tf.image.rgb_to_grayscale: red 0.2989 * 255.5 -> 76, green 0.5870 * 255.5 -> 149
    assert tokens[:, 0].unique().tolist() == [76] and tokens[:, 2].unique().tolist() == [149]
    assert tokens[:, 3].unique().tolist() == [124]
    records = tokens[:, 1].tolist() + valid[:, 1].tolist()  # pixel 1 is the record's number
    assert sorted(records) == list(range(20))  # disjoint, and every training record once
    assert labels.tolist() == [k % 10 for k in tokens[:, 1].tolist()]
    assert valid_labels.tolist() == [k % 10 for k in valid[:, 1].tolist()]
    # the reference code's split: torch random_split, seed 42, int(0.9 n) for training
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(42)).tolist()
    assert tokens[:, 1].tolist() == perm[:18] and valid[:, 1].tolist() == perm[18:]
    test, test_labels = all_rows(str(tmp_path / "ds"), "test")
    assert test[:, 1].tolist() == [100, 101, 102] and test_labels.tolist() == [3, 4, 5]
    # the whole image: the pattern of the record, through the same formula
    k = int(tokens[0, 1])
    plane = ((np.arange(1020) * 3 + k) % 256).astype(np.float32) / np.float32(255)
    assert tokens[0, 4:].tolist() == (plane * np.float32(0.9999) * np.float32(255.5)).astype(np.uint8).tolist()


def test_cifar_pil_grayscale_matches_pillow(tmp_path):
    from PIL import Image
    rgb = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(rgb).convert("L")).reshape(-1)
    planes = rgb.reshape(-1, 3).T[None]  # [1, 3, P]
    assert grayscale(planes, "pil")[0].tolist() == expected.tolist()
    write_cifar(str(tmp_path / "raw"), per_batch=2, test=1)
    prepare_lra(LRAOptions(task="image", input=str(tmp_path / "raw"), output=str(tmp_path / "ds"), grayscale="pil",
                           progress=False))
    tokens, _ = all_rows(str(tmp_path / "ds"), "train")
    assert tokens[:, 2].unique().tolist() == [150]  # (38470 * 255 + 32768) >> 16
    assert "PIL" in load_lra_info(str(tmp_path / "ds")).section["grayscale"]


def test_cifar_split_is_the_same_every_time(tmp_path):
    write_cifar(str(tmp_path / "raw"))
    digests = []
    for name in ("a", "b"):
        m = prepare_lra(LRAOptions(task="image", input=str(tmp_path / "raw"), output=str(tmp_path / name),
                                   shard_samples=5, progress=False))
        digests.append([(s["sha256"], s["labels"]["sha256"]) for split in m["splits"].values()
                        for s in split["shards"]] + [m["splits"]["valid"]["indices_sha256"]])
    assert digests[0] == digests[1] and len(digests[0]) == 4 + 1 + 1 + 1


def test_cifar_errors_name_the_file(tmp_path):
    base = write_cifar(str(tmp_path / "raw"))
    path = os.path.join(base, "data_batch_3.bin")
    with open(path, "ab") as f:
        f.write(b"\0" * 5)
    r = run_tool("--task", "image", "--input", base, "--output", str(tmp_path / "ds"))
    assert r.returncode == 2 and f"{path}: {4 * 3073 + 5} bytes is not a whole number of 3073-byte" in r.stderr
    write_cifar(str(tmp_path / "raw"))
    with open(path, "r+b") as f:
        f.seek(3073)
        f.write(bytes([12]))
    r = run_tool("--task", "image", "--input", base, "--output", str(tmp_path / "ds"))
    assert r.returncode == 2 and f"{path}: record 1 has label byte 12" in r.stderr
    os.remove(os.path.join(base, "test_batch.bin"))
    r = run_tool("--task", "image", "--input", base, "--output", str(tmp_path / "ds"))
    assert r.returncode == 2 and f"{os.path.join(base, 'test_batch.bin')} is missing" in r.stderr


def test_pathfinder_pixels_labels_and_80_10_10_split(tmp_path):
    write_pathfinder(str(tmp_path / "raw"), 20, 32)
    r = run_tool("--task", "pathfinder", "--input", str(tmp_path / "raw"), "--output", str(tmp_path / "ds"),
                 "--shard-samples", "6")
    assert r.returncode == 0, r.stderr
    info = load_lra_info(str(tmp_path / "ds"))
    assert (info.max_length, info.num_classes, info.vocab_size) == (1024, 2, 256)
    m = info.dataset.manifest
    assert {k: s["samples"] for k, s in m["splits"].items()} == {"train": 16, "valid": 2, "test": 2}
    # metadata files in numeric order (2.npy lists images 0-9, 10.npy 10-19), lines in order
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(42)).tolist()
    seen = []
    for split, ids in (("train", perm[:16]), ("valid", perm[16:18]), ("test", perm[18:])):
        tokens, labels = all_rows(str(tmp_path / "ds"), split)
        assert tokens[:, 0].tolist() == ids
        assert labels.tolist() == [i % 2 for i in ids]
        for row, i in zip(tokens, ids):
            assert row.tolist() == pathfinder_pixels(i, 32).reshape(-1).tolist()
        seen += ids
    assert sorted(seen) == list(range(20))
    # decoding in two processes gives the same bytes
    again = prepare_lra(LRAOptions(task="pathfinder", input=str(tmp_path / "raw"), output=str(tmp_path / "ds2"),
                                   shard_samples=6, workers=2, progress=False))
    assert [s["sha256"] for s in again["splits"]["train"]["shards"]] == \
        [s["sha256"] for s in m["splits"]["train"]["shards"]]


def test_pathx_reads_128_pixel_images(tmp_path):
    write_pathfinder(str(tmp_path / "raw"), 10, 128, release_dir="pathfinder128", files=(0,))
    m = prepare_lra(LRAOptions(task="pathx", input=str(tmp_path / "raw"), output=str(tmp_path / "ds"),
                               shard_samples=3, progress=False))
    assert m["seq_len"] == 16384 and m["classification"]["image_shape"] == [128, 128]
    assert {k: s["samples"] for k, s in m["splits"].items()} == {"train": 8, "valid": 1, "test": 1}
    tokens, _ = all_rows(str(tmp_path / "ds"), "test", batch_size=1)
    i = int(tokens[0, 0])
    assert tokens[0].tolist() == pathfinder_pixels(i, 128).reshape(-1).tolist()


@pytest.mark.parametrize("damage, message", [
    ("missing", "{image}: missing image (listed in {meta}: line 4)"),
    ("garbage", "{image}: cannot decode the image"),
    ("size", "{image}: image is 16x16, expected 32x32 (listed in {meta}: line 4)"),
    ("label", "{meta}: line 4: label '7' is not 0 or 1"),
    ("short", "{meta}: line 4: expected at least 4 fields"),
])
def test_pathfinder_errors_name_the_file_and_line(tmp_path, damage, message):
    from PIL import Image
    base = write_pathfinder(str(tmp_path / "raw"), 20, 32)
    image, meta = os.path.join(base, "imgs", "0", "sample_3.png"), os.path.join(base, "metadata", "2.npy")
    if damage == "missing":
        os.remove(image)
    elif damage == "garbage":
        with open(image, "wb") as f:
            f.write(b"not a png")
    elif damage == "size":
        Image.new("L", (16, 16)).save(image)
    else:
        with open(meta, encoding="utf-8") as f:
            lines = f.read().splitlines()
        lines[3] = "imgs/0 sample_3.png 3 7 2" if damage == "label" else "imgs/0 sample_3.png"
        with open(meta, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        prepare_lra(LRAOptions(task="pathfinder", input=base, output=str(tmp_path / "ds"), progress=False))
    assert message.format(image=image, meta=meta) in str(e.value)


def test_pathfinder_index_must_stay_in_its_folder(tmp_path):
    base = write_pathfinder(str(tmp_path / "raw"), 10, 32, files=(0,))
    with open(os.path.join(base, "metadata", "0.npy"), "a", encoding="utf-8") as f:
        f.write("../../elsewhere secret.png 0 1\n")
    with pytest.raises(DataError, match="0.npy: line 11: image '../../elsewhere/secret.png' is a path that leaves"):
        prepare_lra(LRAOptions(task="pathfinder", input=base, output=str(tmp_path / "ds"), progress=False))
    os.rename(os.path.join(base, "metadata", "0.npy"), os.path.join(base, "metadata", "first.npy"))
    with pytest.raises(DataError, match="first.npy: metadata files are named <number>.npy"):
        prepare_lra(LRAOptions(task="pathfinder", input=base, output=str(tmp_path / "ds"), progress=False))
