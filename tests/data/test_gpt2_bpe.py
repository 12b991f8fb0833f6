"""--tokenizer gpt2-bpe: GPT-2's byte-level BPE files, ids, specials, round trip, packing.

GPT-2's own files are not available offline, so a small byte-level BPE is trained on the
test corpus and written in GPT-2's published format: encoder.json ({token: id}) and
vocab.bpe ("#version: 0.2", then one merge per line).
"""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron_transnormer.config.schema import DataConfig
from megatron_transnormer.data import DataError, TokenStream, load_dataset_info
from megatron_transnormer.data import sources
from megatron_transnormer.data.prepare import prepare
from megatron_transnormer.data.tokenizers import ByteLevelBPETokenizer, dataset_tokenizer

from .conftest import small_options

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "prepare_data.py")
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
TRICKY = ["", "\n", "\n\n\n", "one line", "a\n\nb\n", "  leading and trailing  \n  \n", "\ttab\tin\t\n",
          "Ünïcode — 漢字 🎉 ﬁ\r\nwindows line\r\n", "<s> and </s> and <pad> are text here\n",
          "no newline at end"]


def write_gpt2_files(directory, lines, vocab_size=512):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(bpe.to_str())["model"]
    # merges are "left right" strings in older tokenizers releases, [left, right] pairs in newer ones
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "encoder.json"), "w", encoding="utf-8") as f:
        json.dump(model["vocab"], f, ensure_ascii=False)
    with open(os.path.join(directory, "vocab.bpe"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    return model["vocab"]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory, corpus):
    d = str(tmp_path_factory.mktemp("gpt2"))
    lines = [line for path in corpus[1] for line in open(path, encoding="utf-8").read().splitlines()]
    write_gpt2_files(d, lines)
    return d


@pytest.fixture(scope="module")
def mlm_dataset(tmp_path_factory, corpus, bpe_dir):
    out = str(tmp_path_factory.mktemp("bpe-mlm"))
    return out, prepare(small_options(out, corpus[0], tokenizer="gpt2-bpe", bpe_dir=bpe_dir, packing="mlm",
                                      seq_len=24))


def test_manifest_specials_and_gpt2_ids(mlm_dataset, bpe_dir):
    path, m = mlm_dataset
    encoder = json.load(open(os.path.join(bpe_dir, "encoder.json"), encoding="utf-8"))
    entry = m["tokenizer"]
    assert entry["type"] == "gpt2-bpe" and entry["file"] == "tokenizer.json"
    assert entry["sha256"] == hashlib.sha256(open(os.path.join(path, "tokenizer.json"), "rb").read()).hexdigest()
    assert entry["vocab_size"] == m["vocab_size"] == len(encoder) + len(SPECIALS) and m["dtype"] == "uint16"
    assert set(entry["source_sha256"]) == {"encoder.json", "vocab.bpe"}
    json.load(open(os.path.join(path, "tokenizer.json"), encoding="utf-8"))  # plain JSON
    assert not any(n.endswith((".pkl", ".pickle", ".bin")) for n in os.listdir(path))

    tok = dataset_tokenizer(load_dataset_info(path))
    assert isinstance(tok, ByteLevelBPETokenizer) and tok.vocab_size == m["vocab_size"]
    ids = [tok.bos_id, tok.pad_id, tok.eod_id, tok.unk_id, tok.mask_id]
    assert ids == list(range(len(encoder), len(encoder) + len(SPECIALS)))  # after the BPE vocabulary, distinct
    sp = m["special"]
    assert [sp["bos_id"], sp["pad_id"], sp["eod_id"], sp["unk_id"], sp["mask_id"]] == ids
    # GPT-2's ids are unchanged: the same token has the same id as in encoder.json
    assert tok.line_end_id == encoder["\u010a"] and tok.encode("\n") == [encoder["\u010a"]]
    assert tok.encode(" the") == [encoder["\u0120the"]] and tok.encode("A") == [encoder["A"]]
    assert all(tok.backend.token_to_id(t) == i for t, i in encoder.items())


def test_exact_round_trip_and_line_aligned_ids(mlm_dataset):
    tok = dataset_tokenizer(load_dataset_info(mlm_dataset[0]))
    for text in TRICKY:
        assert tok.decode(tok.encode(text)) == text
    whole = "".join(TRICKY)
    assert tok.decode(tok.encode(whole)) == whole
    # ids of line-aligned chunks concatenate to the ids of the whole text (parallel encoding)
    lines = whole.splitlines(keepends=True)
    assert sum((tok.encode(x) for x in ("".join(lines[:3]), "".join(lines[3:]))), []) == tok.encode(whole)
    # special tokens written in the text stay text
    assert not {tok.bos_id, tok.eod_id, tok.pad_id} & set(tok.encode("<s> </s> <pad> <mask> <unk>"))


def test_specials_the_vocabulary_holds_keep_their_ids(bpe_dir, tmp_path):
    encoder = json.load(open(os.path.join(bpe_dir, "encoder.json"), encoding="utf-8"))
    n = len(encoder)
    (tmp_path / "encoder.json").write_text(json.dumps(dict(encoder, **{"</s>": n})), encoding="utf-8")
    (tmp_path / "vocab.bpe").write_bytes(open(os.path.join(bpe_dir, "vocab.bpe"), "rb").read())
    tok = ByteLevelBPETokenizer.from_gpt2_files(str(tmp_path))
    assert tok.eod_id == n and [tok.bos_id, tok.pad_id, tok.unk_id, tok.mask_id] == [n + 1, n + 2, n + 3, n + 4]
    assert tok.vocab_size == n + 5 and tok.decode(tok.encode("a </s> b")) == "a </s> b"


def _samples(path, split):
    """All samples of a split, in manifest order."""
    stream = TokenStream(DataConfig(path=path), split, micro_batch_size=1, shuffle=False, infinite=False)
    return np.concatenate([batch.tokens.numpy() for batch in stream])


def test_mlm_samples_are_bos_lines_eod_padding(mlm_dataset, corpus):
    path, m = mlm_dataset
    tok = dataset_tokenizer(load_dataset_info(path))
    docs = sources.text_files([os.path.join(corpus[0], "*.txt")], (6, 1, 1), 1)
    for split in ("train", "valid"):
        rows = _samples(path, split)
        assert rows.shape[1] == 24 and len(rows) == m["splits"][split]["samples"]
        bodies = []
        for row in rows.tolist():
            end = row.index(tok.pad_id) if tok.pad_id in row else len(row)
            assert row[0] == tok.bos_id and row[end - 1] == tok.eod_id and end >= 3
            assert set(row[end:]) <= {tok.pad_id}
            assert tok.bos_id not in row[1:end] and tok.pad_id not in row[:end]
            assert tok.eod_id not in row[1:end - 1]  # one </s> closes a sample, none inside it
            bodies.extend(row[1:end - 1])
        # every id of the split is in exactly one sample, in order
        assert tok.decode(bodies) == "".join(docs[split])


def test_causal_packing(tmp_path, corpus, bpe_dir):
    m = prepare(small_options(tmp_path, corpus[0], tokenizer="gpt2-bpe", bpe_dir=bpe_dir, seq_len=32))
    tok = dataset_tokenizer(load_dataset_info(str(tmp_path)))
    rows = _samples(str(tmp_path), "valid")
    stream = np.concatenate([rows[0]] + [r[1:] for r in rows[1:]]).tolist()
    # the documents' ids, each closed by the end-of-document id, overlapping samples of seq_len + 1
    docs = sources.text_files([os.path.join(corpus[0], "*.txt")], (6, 1, 1), 1)["valid"]
    expected = sum((tok.encode(doc) + [tok.eod_id] for doc in docs), [])
    assert stream == expected[:len(stream)] and len(expected) - len(stream) < 32
    assert m["splits"]["valid"]["tokens"] == len(expected)


def _digest(directory):
    return {n: hashlib.sha256(open(os.path.join(directory, n), "rb").read()).hexdigest()
            for n in sorted(os.listdir(directory))}


def test_cli_with_two_workers_matches_one(mlm_dataset, corpus, bpe_dir, tmp_path):
    r = subprocess.run([sys.executable, TOOL, "--source", "input", "--input", os.path.join(corpus[0], "*.txt"),
                        "--split", "6,1,1", "--tokenizer", "gpt2-bpe", "--bpe-dir", bpe_dir, "--packing", "mlm",
                        "--seq-len", "24", "--shard-samples", "40", "--workers", "2", "--quiet",
                        "--output", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "(gpt2-bpe)" in r.stdout
    assert _digest(str(tmp_path)) == _digest(mlm_dataset[0])
    help_text = subprocess.run([sys.executable, TOOL, "--help"], capture_output=True, text=True).stdout
    assert "gpt2-bpe" in help_text and "--bpe-dir" in help_text


def test_bad_bpe_files_are_named(tmp_path, corpus, bpe_dir):
    def run(directory):
        return prepare(small_options(tmp_path / "out", corpus[0], tokenizer="gpt2-bpe", bpe_dir=str(directory)))

    with pytest.raises(DataError, match="--tokenizer gpt2-bpe needs --bpe-dir"):
        prepare(small_options(tmp_path / "out", corpus[0], tokenizer="gpt2-bpe"))
    d = tmp_path / "bad"
    d.mkdir()
    encoder = open(os.path.join(bpe_dir, "encoder.json"), encoding="utf-8").read()
    merges = open(os.path.join(bpe_dir, "vocab.bpe"), encoding="utf-8").read()
    (d / "encoder.json").write_text(encoder, encoding="utf-8")
    with pytest.raises(DataError, match=r"bad/vocab.bpe: not found; --bpe-dir needs"):
        run(d)
    for text, expect in [
        (merges.split("\n", 1)[1], r"vocab.bpe:1: expected GPT-2's '#version: 0.2' header"),
        (merges + "Ġ\n", r"vocab.bpe:\d+: expected a merge 'left right', got 'Ġ'"),
        (merges + "zq xw\n", r"vocab.bpe:\d+: merge 'zq xw' uses 'zq', which is not in encoder.json"),
    ]:
        (d / "vocab.bpe").write_text(text, encoding="utf-8")
        with pytest.raises(DataError, match=expect):
            run(d)
    (d / "vocab.bpe").write_text(merges, encoding="utf-8")
    vocab = json.loads(encoder)
    for text, expect in [
        (encoder[:-10], r"bad/encoder.json: not valid JSON"),
        ("[1, 2]", r"encoder.json: expected a non-empty JSON object"),
        (json.dumps(dict(vocab, extra="7")), r"encoder.json: token 'extra' has id '7', expected an integer"),
        (json.dumps(dict(vocab, extra=len(vocab) + 5)), r"encoder.json: ids must be 0\.\.\d+, each once"),
        (json.dumps({"<newline>" if t == "\u010a" else t: i for t, i in vocab.items()}),
         r"encoder.json: not a byte-level BPE vocabulary: 1 of the 256 byte pieces are missing \(e.g. 'Ċ'\)"),
    ]:
        (d / "encoder.json").write_text(text, encoding="utf-8")
        with pytest.raises(DataError, match=expect):
            run(d)
    r = subprocess.run([sys.executable, TOOL, "--source", "input", "--input", os.path.join(corpus[0], "*.txt"),
                        "--split", "6,1,1", "--tokenizer", "gpt2-bpe", "--bpe-dir", str(tmp_path / "absent"), "--quiet",
                        "--output", str(tmp_path / "cli")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "absent/encoder.json: not found" in r.stderr
