"""ListOps: the official TSV path, the generator, and their errors."""
from __future__ import annotations

import os

import numpy as np
import pytest

from megatron_transnormer.data.lra import listops_generator as gen
from megatron_transnormer.data.lra import load_lra_info
from megatron_transnormer.data.lra.listops import read_tsv
from megatron_transnormer.data.lra.prepare import LRAOptions, prepare_lra
from megatron_transnormer.data.lra.vocab import LISTOPS_SYMBOLS, listops_tokens
from megatron_transnormer.data.manifest import DataError, load_dataset_info
from megatron_transnormer.data.shards import read_samples
from tests.data.test_lra_fakes import evaluate_listops, run_tool, write_listops

MAX_OF_MIN = "( ( ( [MAX 2 ) ( ( ( [MIN 7 ) 3 ) ] ) ) ] )"  # MAX(2, MIN(7, 3)) = 3
MED_EVEN = "( ( ( ( ( [MED 2 ) 3 ) 8 ) 1 ) ] )"  # median of 1 2 3 8 is 2.5 -> 2
SUM_MOD = "( ( ( [SM 9 ) 8 ) ] )"  # 17 mod 10 = 7
ROWS = {"train": [(MAX_OF_MIN, 3), (MED_EVEN, 2), (SUM_MOD, 7)], "val": [(SUM_MOD, 7)], "test": [(MED_EVEN, 2)]}


def rows_of(directory: str, split: str) -> tuple[list[np.ndarray], list[int]]:
    """(token rows, labels) of a prepared split, read straight from its files."""
    info = load_dataset_info(directory)
    rows, labels = [], []
    for shard in info.split(split)["shards"]:
        rows += [r.copy() for r in read_samples(os.path.join(directory, shard["name"]), shard["sha256"],
                                                  info.sample_len, info.dtype, shard["samples"])]
        labels += np.fromfile(os.path.join(directory, shard["labels"]["name"]), dtype="<u2").tolist()
    return rows, labels


def test_official_files_give_hand_checked_ids_and_labels(tmp_path):
    write_listops(str(tmp_path / "release"), ROWS)
    r = run_tool("--task", "listops", "--input", str(tmp_path / "release"), "--output", str(tmp_path / "ds"))
    assert r.returncode == 0, r.stderr
    info = load_lra_info(str(tmp_path / "ds"))
    # <pad> <unk> <eos>, digits 0-9 (ids 3-12), [MAX 13, [MIN 14, [MED 15, [SM 16, ] as X 17
    assert info.vocab == ["<pad>", "<unk>", "<eos>"] + list("0123456789") + ["[MAX", "[MIN", "[MED", "[SM", "X"]
    assert (info.vocab_size, info.max_length, info.num_classes, info.pad_id) == (18, 2048, 10, 0)
    rows, labels = rows_of(str(tmp_path / "ds"), "train")
    assert labels == [3, 2, 7]
    assert rows[0][:9].tolist() == [13, 5, 14, 10, 6, 17, 17, 2, 0]  # [MAX 2 [MIN 7 3 ] ] <eos> <pad>
    assert rows[1][:8].tolist() == [15, 5, 6, 11, 4, 17, 2, 0]  # [MED 2 3 8 1 ] <eos>
    assert rows[2][:5].tolist() == [16, 12, 11, 17, 2] and not rows[2][5:].any()
    m = info.dataset.manifest
    assert m["splits"]["valid"]["samples"] == 1 and m["splits"]["valid"]["source"] == "basic_val.tsv"
    assert m["splits"]["train"]["class_counts"] == [0, 0, 1, 1, 0, 0, 0, 1, 0, 0]


def test_long_expressions_are_cut_to_max_length_with_eos(tmp_path):
    long = "( ( ( ( ( [SM 1 ) 2 ) 3 ) 4 ) ] )"
    write_listops(str(tmp_path / "r"), {"train": [(long, 0)], "val": [(long, 0)], "test": [(long, 0)]})
    m = prepare_lra(LRAOptions(task="listops", input=str(tmp_path / "r"), output=str(tmp_path / "ds"),
                               max_length=4, progress=False))
    rows, _ = rows_of(str(tmp_path / "ds"), "train")
    assert rows[0].tolist() == [16, 4, 5, 2]  # [SM 1 2 <eos>
    assert m["splits"]["train"]["truncated"] == 1 and m["seq_len"] == 4


@pytest.mark.parametrize("lines, message", [
    (["Source Target", f"{SUM_MOD}\t7"], "line 1: expected the header"),
    (["Source\tTarget", f"{SUM_MOD}\t7", f"{SUM_MOD}"], "line 3: expected 2 tab-separated fields"),
    (["Source\tTarget", f"{SUM_MOD}\t12"], "line 2: Target '12' is not a value 0-9"),
    (["Source\tTarget", "( ( [FIRST 3 ) ] )\t3"], "line 2: symbol '[FIRST' is not a ListOps symbol"),
])
def test_malformed_rows_name_file_and_line(tmp_path, lines, message):
    base = write_listops(str(tmp_path / "r"), ROWS)
    path = os.path.join(base, "basic_val.tsv")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    r = run_tool("--task", "listops", "--input", base, "--output", str(tmp_path / "ds"))
    assert r.returncode == 2
    assert f"{path}: {message}" in r.stderr


def test_missing_file_is_named_before_anything_is_written(tmp_path):
    base = write_listops(str(tmp_path / "r"), ROWS)
    os.remove(os.path.join(base, "basic_test.tsv"))
    r = run_tool("--task", "listops", "--input", base, "--output", str(tmp_path / "ds"))
    assert r.returncode == 2 and f"{os.path.join(base, 'basic_test.tsv')} is missing" in r.stderr
    assert not [f for f in os.listdir(tmp_path / "ds") if f.endswith(".tar")]


def test_generated_samples_evaluate_to_their_labels():
    samples = gen.generate(40, seed=11)
    assert len({s for s, _ in samples}) == 40
    used = set()
    for source, value in samples:
        tokens = listops_tokens(source)
        assert gen.MIN_LENGTH < len(tokens) < gen.MAX_LENGTH  # LRA's length limits, in symbols
        assert source.count("(") == source.count(")")
        assert evaluate_listops(source) == value
        used.update(t for t in tokens if t.startswith("["))
    assert used == {"[MAX", "[MIN", "[MED", "[SM"}
    assert {v for _, v in samples} >= {0, 9}


def test_generator_writes_lra_nesting_and_is_deterministic():
    tree = ((((gen.MAX, 2), (((gen.MIN, 7), 3), gen.END)), gen.END))
    assert gen.to_string(tree) == MAX_OF_MIN and gen.to_value(tree) == 3
    assert gen.to_value((((((gen.MED, 2), 3), 8), 1), gen.END)) == 2
    assert gen.generate(12, seed=5) == gen.generate(12, seed=5)
    assert gen.generate(12, seed=5) != gen.generate(12, seed=6)
    shallow = gen.generate(30, seed=1, max_depth=3, max_args=4, min_length=3, max_length=30)
    assert all(3 < len(listops_tokens(s)) < 30 and evaluate_listops(s) == v for s, v in shallow)
    with pytest.raises(ValueError, match="widen the limits"):
        gen.generate(2, seed=1, max_depth=2, max_args=2, min_length=100, max_length=200, max_draws=500)


def test_generate_cli_writes_tsv_and_prepares_it_through_the_same_reader(tmp_path):
    out = str(tmp_path / "gen")
    r = run_tool("--task", "listops", "--generate", "48", "--seed", "3", "--output", out, "--shard-samples", "20")
    assert r.returncode == 0, r.stderr
    info = load_lra_info(out)
    counts = {name: s["samples"] for name, s in info.dataset.manifest["splits"].items()}
    assert counts == {"train": 48, "valid": 1, "test": 1}
    assert len(info.dataset.split("train")["shards"]) == 3
    symbols = set(LISTOPS_SYMBOLS)
    for split, name in (("train", "basic_train.tsv"), ("test", "basic_test.tsv")):
        parsed = list(read_tsv(os.path.join(out, "generated", name), symbols))
        rows, labels = rows_of(out, split)
        assert labels == [value for _, _, value in parsed]
        for (_, tokens, value), row in zip(parsed, rows):
            assert evaluate_listops(" ".join("]" if t == "X" else t for t in tokens)) == value
            assert row[len(tokens)] == 2 and not row[len(tokens) + 1:].any()  # <eos>, then padding
            assert [info.vocab[i] for i in row[:len(tokens)]] == tokens
    # the same seed gives the same bytes
    again = run_tool("--task", "listops", "--generate", "48", "--seed", "3", "--output", str(tmp_path / "g2"),
                     "--shard-samples", "20")
    assert again.returncode == 0
    other = load_lra_info(str(tmp_path / "g2")).dataset.manifest["splits"]
    assert [s["sha256"] for s in other["train"]["shards"]] == \
        [s["sha256"] for s in info.dataset.manifest["splits"]["train"]["shards"]]


def test_cli_refuses_inconsistent_options(tmp_path):
    r = run_tool("--task", "text", "--generate", "10", "--output", str(tmp_path / "x"))
    assert r.returncode == 2 and "--generate is for --task listops" in r.stderr
    r = run_tool("--task", "listops", "--output", str(tmp_path / "x"))
    assert r.returncode == 2 and "needs --input DIR" in r.stderr
    r = run_tool("--task", "listops", "--input", str(tmp_path / "nowhere"), "--output", str(tmp_path / "x"))
    assert r.returncode == 2 and "nowhere: no such folder" in r.stderr


def test_preparing_again_replaces_the_previous_shards(tmp_path):
    out = str(tmp_path / "ds")
    prepare_lra(LRAOptions(task="listops", generate=30, output=out, shard_samples=8, progress=False))
    assert os.path.exists(os.path.join(out, "train-00003.tar"))
    prepare_lra(LRAOptions(task="listops", generate=30, output=out, shard_samples=16, progress=False))
    names = sorted(os.listdir(out))
    assert "train-00002.tar" not in names and "train-00002.label" not in names
    assert "train-00001.tar" in names and "train-00001.label" in names
    # a failed preparation leaves the dataset that was there as it was
    base = write_listops(str(tmp_path / "r"), {**ROWS, "test": [("( ( [NOPE 1 ) ] )", 1)]})
    with pytest.raises(DataError, match="basic_test.tsv: line 2: symbol '\\[NOPE'"):
        prepare_lra(LRAOptions(task="listops", input=base, output=out, progress=False))
    assert sorted(os.listdir(out)) == names
    assert load_lra_info(out).dataset.split("train")["samples"] == 30
    with pytest.raises(DataError, match="--generate writes its own files"):
        prepare_lra(LRAOptions(task="listops", generate=3, input=out, output=out))
