"""Text (IMDB) and Retrieval (AAN): character vocabularies, two-document rows, errors."""
from __future__ import annotations

import os

import numpy as np

from megatron_transnormer.data.lra import lra_batches, load_lra_info
from megatron_transnormer.data.lra.prepare import LRAOptions, prepare_lra
from tests.data.test_lra_fakes import run_tool, write_aan, write_imdb

# counts in train: a 4, b 3, c 2, d 2, z 1 (and "é" 1)
IMDB = {"train": {"pos": ["abba", "cdcd"], "neg": ["aaz", "bé"]},
        "test": {"pos": ["dcbaz"], "neg": ["ab", "c"]}}


def batch_rows(batch, second=False):
    tokens, lengths = (batch.tokens2, batch.lengths2) if second else (batch.tokens, batch.lengths)
    return [t[:n].tolist() for t, n in zip(tokens, lengths)]


def test_imdb_vocabulary_ids_and_labels(tmp_path):
    write_imdb(str(tmp_path / "raw"), IMDB)
    r = run_tool("--task", "text", "--input", str(tmp_path / "raw"), "--output", str(tmp_path / "ds"),
                 "--min-freq", "2")
    assert r.returncode == 0, r.stderr
    info = load_lra_info(str(tmp_path / "ds"))
    # characters seen at least twice, by count, ties in character order
    assert info.vocab == ["<pad>", "<unk>", "<eos>", "a", "b", "c", "d"]
    assert (info.max_length, info.num_classes, info.pad_id, info.inputs) == (4096, 2, 0, 1)
    (batch,) = list(lra_batches(str(tmp_path / "ds"), "test", 3))
    got = sorted(zip(batch_rows(batch), batch.labels.tolist()))
    assert got == sorted([([6, 5, 4, 3, 1, 2], 1), ([3, 4, 2], 0), ([5, 2], 0)])  # z -> <unk>, then <eos>
    assert batch.tokens.shape == (3, 4096) and not batch.tokens[:, 6:].any()
    (train,) = list(lra_batches(str(tmp_path / "ds"), "train", 4, shuffle=False))
    assert sorted(zip(batch_rows(train), train.labels.tolist())) == sorted(
        [([3, 4, 4, 3, 2], 1), ([5, 6, 5, 6, 2], 1), ([3, 3, 1, 2], 0), ([4, 1, 2], 0)])
    # no validation split of its own: valid is the test split, as in LRA
    m = info.dataset.manifest
    assert m["splits"]["valid"]["same_as"] == "test"
    (valid,) = list(lra_batches(str(tmp_path / "ds"), "valid", 3))
    assert valid.tokens.equal(batch.tokens) and valid.labels.equal(batch.labels)


def test_imdb_cut_to_max_length_and_default_min_freq(tmp_path):
    write_imdb(str(tmp_path / "raw"), IMDB)
    m = prepare_lra(LRAOptions(task="text", input=str(tmp_path / "raw" / "aclImdb"), output=str(tmp_path / "ds"),
                               max_length=3, progress=False))
    info = load_lra_info(str(tmp_path / "ds"))
    assert info.vocab == ["<pad>", "<unk>", "<eos>"]  # nothing reaches 15 occurrences
    assert m["splits"]["train"]["truncated"] == 3 and m["tokenizer"]["min_freq"] == 15
    (batch,) = list(lra_batches(str(tmp_path / "ds"), "train", 4, shuffle=False))
    # every review keeps its first 2 characters (all <unk> here) and <eos>; "bé" was not cut
    assert batch.tokens.tolist() == [[1, 1, 2]] * 4 and batch.lengths.tolist() == [3] * 4


def test_imdb_write_order_is_seeded_and_mixes_classes(tmp_path):
    texts = {"train": {"pos": [f"p{i}" for i in range(20)], "neg": [f"n{i}" for i in range(20)]},
             "test": {"pos": ["p"], "neg": ["n"]}}
    write_imdb(str(tmp_path / "raw"), texts)
    labels = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        prepare_lra(LRAOptions(task="text", input=str(tmp_path / "raw"), output=str(tmp_path / name), seed=seed,
                               progress=False))
        labels[name] = np.fromfile(tmp_path / name / "train-00000.label", dtype="<u2").tolist()
    assert labels["a"] == labels["b"] != labels["c"]
    assert sorted(labels["a"]) == [0] * 20 + [1] * 20 and labels["a"] != sorted(labels["a"])


def test_imdb_errors_name_the_folder_or_file(tmp_path):
    base = write_imdb(str(tmp_path / "raw"), {"train": {"pos": ["a"], "neg": ["b"]}, "test": {"pos": ["a"]}})
    r = run_tool("--task", "text", "--input", base, "--output", str(tmp_path / "ds"))
    assert r.returncode == 2 and f"{os.path.join(base, 'test', 'neg')} is missing" in r.stderr
    write_imdb(str(tmp_path / "raw"), {"test": {"neg": ["b"]}})
    bad = os.path.join(base, "train", "neg", "9_1.txt")
    with open(bad, "wb") as f:
        f.write(b"caf\xe9")  # latin-1, not UTF-8
    r = run_tool("--task", "text", "--input", base, "--output", str(tmp_path / "ds"))
    assert r.returncode == 2 and f"{bad}: not UTF-8 text" in r.stderr


AAN = {"train": [("1", "abc", "cab"), ("0.0", "q", "cc")],
       "eval": [("1.0", "z", "ab")],
       "test": [("0", "", "bq"), ("1", "cccc", "a")]}


def test_retrieval_two_documents_per_row(tmp_path):
    write_aan(str(tmp_path / "raw"), AAN)
    r = run_tool("--task", "retrieval", "--input", str(tmp_path / "raw"), "--output", str(tmp_path / "ds"),
                 "--max-length", "4")
    assert r.returncode == 0, r.stderr
    info = load_lra_info(str(tmp_path / "ds"))
    # train characters: c 4, a 2, b 2, q 1 (every character is kept)
    assert info.vocab == ["<pad>", "<unk>", "<eos>", "c", "a", "b", "q"]
    assert info.inputs == 2 and info.dataset.sample_len == 8 and info.dataset.seq_len == 4
    (valid,) = list(lra_batches(str(tmp_path / "ds"), "valid", 1))
    assert valid.tokens.tolist() == [[1, 2, 0, 0]] and valid.tokens2.tolist() == [[4, 5, 2, 0]]
    assert valid.lengths.tolist() == [2] and valid.lengths2.tolist() == [3] and valid.labels.tolist() == [1]
    assert valid.padding_mask(second=True).tolist() == [[True, True, True, False]]
    (test,) = list(lra_batches(str(tmp_path / "ds"), "test", 2))
    assert batch_rows(test) == [[2], [3, 3, 3, 2]]  # an empty document is <eos>; "cccc" is cut to 3 + <eos>
    assert batch_rows(test, second=True) == [[5, 6, 2], [4, 2]] and test.labels.tolist() == [0, 1]
    assert info.dataset.manifest["splits"]["test"]["truncated"] == 1


def test_retrieval_malformed_rows_name_file_and_line(tmp_path):
    base = write_aan(str(tmp_path / "raw"), AAN)
    train = os.path.join(base, "new_aan_pairs.train.tsv")
    with open(train, "a", encoding="utf-8") as f:
        f.write("1\tx\ty\tonly four\n")
    r = run_tool("--task", "retrieval", "--input", str(tmp_path / "raw"), "--output", str(tmp_path / "ds"))
    assert r.returncode == 2 and f"{train}: line 3: expected 5 tab-separated fields" in r.stderr
    write_aan(str(tmp_path / "raw"), {**AAN, "train": [("2", "a", "b")]})
    r = run_tool("--task", "retrieval", "--input", base, "--output", str(tmp_path / "ds"))
    assert r.returncode == 2 and f"{train}: line 1: label '2' is not 0 or 1" in r.stderr
    os.remove(os.path.join(base, "new_aan_pairs.eval.tsv"))
    r = run_tool("--task", "retrieval", "--input", base, "--output", str(tmp_path / "ds"))
    assert r.returncode == 2 and "new_aan_pairs.eval.tsv is missing" in r.stderr
