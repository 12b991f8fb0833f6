"""tools/prepare_data.py: round trip, tokenizers, packing, determinism, manifest."""
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron_transnormer.config.schema import DataConfig
from megatron_transnormer.data import DataError, TokenStream, load_dataset_info
from megatron_transnormer.data import sources
from megatron_transnormer.data.prepare import prepare
from megatron_transnormer.data.tokenizers import WordTokenizer, dataset_tokenizer

from .conftest import small_options

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "prepare_data.py")


def test_text_to_shards_to_loader_to_text(dataset, corpus):
    path, manifest = dataset
    info = load_dataset_info(path)
    tok = dataset_tokenizer(info)
    docs = sources.text_files([os.path.join(corpus[0], "*.txt")], (6, 1, 1), 1)
    for split in ("train", "valid"):
        s = TokenStream(DataConfig(path=path), split, micro_batch_size=1, shuffle=False, infinite=False)
        samples = [b.tokens[0].numpy() for b in s]
        ids = np.concatenate([samples[0]] + [x[1:] for x in samples[1:]])
        entry = manifest["splits"][split]
        assert len(ids) == entry["tokens"] - entry["dropped_tokens"]
        text = "".join(docs[split])
        decoded = tok.decode(ids.tolist())
        assert text.startswith(decoded) and len(text) - len(decoded) < 8 * 32
        assert entry["words"] == len(text.split())
        # document ends are marked: one end-of-document id per document kept whole
        assert (ids == info.eod_id).sum() >= entry["documents"] - 1
    assert tok.decode(tok.encode("Thou  art\n\tà la mode 漢\n")) == "Thou  art\n\tà la mode 漢\n"
    info.check_model(vocab_size=512, seq_len=32)
    with pytest.raises(ValueError, match="model.vocab_size=300"):
        info.check_model(vocab_size=300)
    with pytest.raises(ValueError, match="data.seq_len: 64"):
        info.check_model(seq_len=64)


def _digest(directory):
    return {n: hashlib.sha256(open(os.path.join(directory, n), "rb").read()).hexdigest()
            for n in sorted(os.listdir(directory))}


def test_cli_is_deterministic_and_worker_independent(tmp_path, corpus):
    out = []
    for i, workers in enumerate((1, 2)):
        d = tmp_path / f"run{i}"
        r = subprocess.run([sys.executable, TOOL, "--source", "input", "--input", os.path.join(corpus[0], "*.txt"),
                            "--split", "6,1,1", "--vocab-size", "400", "--spm-type", "unigram", "--seq-len", "32",
                            "--shard-samples", "40", "--workers", str(workers), "--output", str(d)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "tokenize train" in r.stderr  # the progress bar goes to stderr
        out.append(_digest(d))
    assert out[0] == out[1] and len(out[0]) > 10
    help_text = subprocess.run([sys.executable, TOOL, "--help"], capture_output=True, text=True).stdout
    for option in ("--source", "--input", "--tokenizer", "--vocab-size", "--packing", "--seq-len", "--workers",
                   "--wikitext-dir", "--download", "--seed", "--split", "--shard-samples", "--no-byte-fallback"):
        assert option in help_text


def test_word_tokenizer_matches_fairseq_dictionary(tmp_path):
    tok = WordTokenizer.build(["b a c a", "", "b  a <unk> d"])
    # specials first; then count desc, ties in string order; padded to a multiple of 8
    assert tok.symbols[:8] == ["<s>", "<pad>", "</s>", "<unk>", "a", "b", "c", "d"]
    assert tok.vocab_size % 8 == 0
    assert tok.encode("a zz\n\nb\n") == [4, 3, 2, 2, 5, 2]
    assert tok.decode([4, 3, 2, 2, 5, 2]) == "a <unk>\n\nb\n"
    # WikiText-style folder, word-level, masked-LM packing
    wt = tmp_path / "wt"
    wt.mkdir()
    art = " = Alpha = \n \n the cat sat on the mat . \n the dog sat . \n = = Sub = = \n a b c d e f g h i j k \n"
    for split, n in (("train", 3), ("valid", 1), ("test", 1)):
        (wt / f"wiki.{split}.tokens").write_text(art.replace("Alpha", f"T{split}") * n + " = Beta = \n x y \n")
    m = prepare(small_options(tmp_path / "out", "", source="wikitext-103", wikitext_dir=str(wt), tokenizer="word",
                              packing="mlm", seq_len=8, shard_samples=4))
    assert m["splits"]["train"]["documents"] == 4 and m["tokenizer"]["type"] == "word"
    info = load_dataset_info(str(tmp_path / "out"))
    assert info.split_words("valid") == len((wt / "wiki.valid.tokens").read_text().split())
    batch = next(iter(TokenStream(DataConfig(path=info.path), "valid", micro_batch_size=2, shuffle=False,
                                  infinite=False))).tokens
    sp = m["special"]
    for row in batch.tolist():
        assert row[0] == sp["bos_id"] and len(row) == 8
        body = row[1:row.index(sp["pad_id"]) - 1] if sp["pad_id"] in row else row[1:-1]
        assert row[len(body) + 1] == sp["eod_id"]
    # the first sample holds whole lines: the title line and the empty line
    # the title is unseen in train; </s> closes the sample
    assert dataset_tokenizer(info).decode(batch[0].tolist()) == "= <unk> =\n\n\n"


def test_missing_sources_are_clear(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="wiki.train.tokens"):
        prepare(small_options(tmp_path / "o", "", source="wikitext-103", wikitext_dir=str(tmp_path)))
    import urllib.request

    def offline(*a, **k):
        raise OSError("network unreachable")
    monkeypatch.setattr(urllib.request, "urlretrieve", offline)
    with pytest.raises(DataError, match="download of https://.*wikitext-103-v1.zip failed.*--wikitext-dir"):
        prepare(small_options(tmp_path / "o", "", source="wikitext-103", download=True))
    with pytest.raises(DataError, match="--input .*nothing-here.*matches no file"):
        prepare(small_options(tmp_path / "o", "", inputs=[str(tmp_path / "nothing-here*.txt")]))
    with pytest.raises(DataError, match="data.path: no manifest at .*manifest.json; prepare it with"):
        load_dataset_info(str(tmp_path / "absent"))


def test_an_empty_validation_or_test_split_is_an_error_naming_it(tmp_path, corpus):
    # 8 documents: 98,1,1 leaves valid none (round(0.98 * 8) = round(0.99 * 8) = 8)
    r = subprocess.run([sys.executable, TOOL, "--input", os.path.join(corpus[0], "*.txt"), "--vocab-size", "400",
                        "--seq-len", "32", "--output", str(tmp_path / "a"), "--quiet"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == ("prepare_data: error: source input: the valid split would be empty (--split 98,1,1 "
                                "gives it none of the 8 documents; use more documents, --paragraphs or a larger "
                                "proportion)")
    assert not os.path.exists(tmp_path / "a" / "manifest.json")
    with pytest.raises(DataError, match=r"the test split would be empty \(--split 6,2,0.01 gives it none"):
        prepare(small_options(tmp_path / "b", corpus[0], split_ratios=(6, 2, 0.01)))
    # A proportion of 0 leaves the split out on purpose.
    m = prepare(small_options(tmp_path / "c", corpus[0], split_ratios=(6, 2, 0)))
    assert sorted(m["splits"]) == ["train", "valid"]


def test_input_implies_source_input(tmp_path, corpus):
    from megatron_transnormer.commands import prepare as prepare_data
    opts, _ = prepare_data.parse_args(["--input", "a.txt", "--output", str(tmp_path)])
    assert (opts.source, opts.inputs) == ("input", ["a.txt"])
    assert prepare_data.parse_args(["--output", str(tmp_path)])[0].source == "shakespeare"
    r = subprocess.run([sys.executable, TOOL, "--source", "wikitext-103", "--input", "a.txt", "--output",
                        str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--input is read only with --source input (got --source wikitext-103)" in r.stderr
