"""The LRA reader: order by (seed, epoch), data-parallel shards, equal batch counts,
resume, labels from the .label files, and the manifest's compatibility."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from megatron_transnormer.data import load_dataset_info
from megatron_transnormer.data.lra import LRASplit, load_lra_info, lra_batches
from megatron_transnormer.data.lra.prepare import LRAOptions, prepare_lra
from megatron_transnormer.data.manifest import DataError
from tests.data.test_lra_fakes import evaluate_listops


@pytest.fixture(scope="module")
def listops(tmp_path_factory):
    """100 / 3 / 3 generated ListOps samples, 16 per shard (7 training shards)."""
    out = str(tmp_path_factory.mktemp("lra") / "listops")
    prepare_lra(LRAOptions(task="listops", generate=100, seed=4, output=out, shard_samples=16, progress=False))
    return out


def indices(batches):
    return [i for b in batches for i in b.indices.tolist()]


def test_rows_carry_their_labels(listops):
    info = load_lra_info(listops)
    for batch in lra_batches(listops, "train", 10, seed=3, epoch=1):
        for tokens, n, label in zip(batch.tokens, batch.lengths, batch.labels):
            symbols = [info.vocab[i] for i in tokens[:n - 1].tolist()]
            assert tokens[n - 1] == 2 and not tokens[n:].any()  # <eos> then padding
            assert evaluate_listops(" ".join("]" if s == "X" else s for s in symbols)) == label
        assert batch.padding_mask().sum(1).equal(batch.lengths)


def test_order_is_a_function_of_seed_and_epoch(listops):
    first = indices(lra_batches(listops, "train", 8, seed=3, epoch=0))
    assert first == indices(lra_batches(listops, "train", 8, seed=3, epoch=0))
    assert first != indices(lra_batches(listops, "train", 8, seed=3, epoch=1))
    assert first != indices(lra_batches(listops, "train", 8, seed=4, epoch=0))
    # drop_last: 12 whole batches of 8; which 4 of the 100 samples wait changes with the order
    assert len(set(first)) == 96 and set(first) <= set(range(100))
    assert indices(lra_batches(listops, "train", 8, shuffle=False))[:20] == list(range(20))


@pytest.mark.parametrize("dp", [1, 2, 3])
def test_ranks_share_an_epoch_without_overlap(listops, dp):
    readers = [LRASplit(listops, "train", 4, dp_rank=r, dp_size=dp, seed=9) for r in range(dp)]
    assert len({r.num_batches for r in readers}) == 1 and readers[0].num_batches == (100 // dp) // 4
    got = [indices(r.batches(epoch=2)) for r in readers]
    assert all(len(g) == readers[0].num_batches * 4 for g in got)
    flat = [i for g in got for i in g]
    assert len(set(flat)) == len(flat)
    # evaluation order: every sample exactly once, filler rows labelled -100, equal batch counts
    evals = [LRASplit(listops, "train", 6, dp_rank=r, dp_size=dp, shuffle=False) for r in range(dp)]
    batches = [list(e.batches()) for e in evals]
    assert len({len(b) for b in batches}) == 1
    real = [i for bs in batches for b in bs for i, y in zip(b.indices.tolist(), b.labels.tolist()) if y >= 0]
    assert sorted(real) == list(range(100))
    filler = [(i, y) for bs in batches for b in bs for i, y in zip(b.indices.tolist(), b.labels.tolist()) if i < 0]
    assert all(y == -100 for _, y in filler) and len(filler) == dp * len(batches[0]) * 6 - 100


def test_resume_from_a_batch_count(listops):
    reader = LRASplit(listops, "train", 5, dp_rank=1, dp_size=2, seed=2)
    whole = list(reader.batches(epoch=3))
    rest = list(reader.batches(epoch=3, start=4))
    assert len(rest) == len(whole) - 4
    for a, b in zip(whole[4:], rest):
        assert a.tokens.equal(b.tokens) and a.labels.equal(b.labels) and a.indices.equal(b.indices)


def test_more_ranks_than_samples_still_gives_every_rank_a_batch(listops):
    batches = [list(lra_batches(listops, "valid", 2, dp_rank=r, dp_size=4)) for r in range(4)]
    assert [len(b) for b in batches] == [1, 1, 1, 1]
    assert indices(batches[3]) == [-1, -1] and batches[3][0].labels.tolist() == [-100, -100]
    assert sorted(i for b in batches for i in indices(b) if i >= 0) == [0, 1, 2]
    with pytest.raises(DataError, match="fewer than a batch of 4 for each of 2 data-parallel ranks"):
        LRASplit(listops, "valid", 4, dp_size=2, shuffle=True)


def test_manifest_loads_as_a_token_dataset(listops):
    info = load_dataset_info(listops)  # the existing loader reads it unchanged
    assert info.packing == "mlm" and info.seq_len == info.sample_len == 2048 and info.vocab_size == 18
    assert info.manifest["special"]["mask_id"] == -1  # a masked LM refuses it
    section = info.manifest["classification"]
    assert section["num_classes"] == 10 and section["inputs"] == 1


def test_damaged_labels_and_manifests_are_named(listops, tmp_path):
    import shutil
    copy = str(tmp_path / "copy")
    shutil.copytree(listops, copy)
    label = os.path.join(copy, "train-00001.label")
    data = bytearray(open(label, "rb").read())
    data[0] ^= 1
    with open(label, "wb") as f:
        f.write(bytes(data))
    with pytest.raises(DataError, match=f"{label}: sha256 mismatch"):
        LRASplit(copy, "train", 4)
    with open(label, "wb") as f:
        f.write(b"\x0b\x00" * 16)  # class 11, with a matching checksum below
    path = os.path.join(copy, "manifest.json")
    m = json.load(open(path))
    import hashlib
    m["splits"]["train"]["shards"][1]["labels"]["sha256"] = hashlib.sha256(b"\x0b\x00" * 16).hexdigest()
    json.dump(m, open(path, "w"))
    with pytest.raises(DataError, match=f"{label}: label 11 outside 0..9"):
        LRASplit(copy, "train", 4)
    m["splits"]["train"]["shards"][1]["labels"]["name"] = "../elsewhere.label"
    json.dump(m, open(path, "w"))
    with pytest.raises(DataError, match="label file '../elsewhere.label' is a path that leaves"):
        load_lra_info(copy)
    del m["classification"]
    json.dump(m, open(path, "w"))
    with pytest.raises(DataError, match="no 'classification' section"):
        LRASplit(copy, "train", 4)


def test_token_ids_outside_the_vocabulary_are_refused(listops, tmp_path):
    import shutil
    copy = str(tmp_path / "copy")
    shutil.copytree(listops, copy)
    path = os.path.join(copy, "manifest.json")
    m = json.load(open(path))
    m["vocab_size"] = 12  # ids 12-17 ([MAX ... X) are now outside it
    json.dump(m, open(path, "w"))
    with pytest.raises(DataError, match="outside the manifest's vocabulary of 12"):
        list(lra_batches(copy, "test", 1))
    assert np.fromfile(os.path.join(copy, "test-00000.label"), dtype="<u2").size == 3
