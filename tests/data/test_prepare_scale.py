"""tools/prepare_data.py at corpus scale: bounded memory, input formats, parts + merge."""
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron_transnormer.data import DataError, load_dataset_info
from megatron_transnormer.data.packing import pack_causal, pack_mlm
from megatron_transnormer.data.prepare import _MLMPacker, sample_lines
from megatron_transnormer.data.shards import read_samples
from megatron_transnormer.data.sources import SPLITS, assign_splits
from megatron_transnormer.data.tokenizers import dataset_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "prepare_data.py")
WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but "
         "thee thou hath doth king night lord good love sweet death fair heaven speak").split()


def tool(*args, timeout=120):
    return subprocess.run([sys.executable, TOOL, "--quiet", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def documents(n, seed=0, lines=(3, 12)):
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        body = [" ".join(rng.choice(WORDS, rng.integers(1, 14))) for _ in range(rng.integers(*lines))]
        docs.append("\n".join(body) + "\n")
    return docs


def samples(directory, split):
    info = load_dataset_info(str(directory))
    rows = [r for url in info.shard_urls(split) for r in read_samples(url, None, info.sample_len, info.dtype, None)]
    return np.stack(rows) if rows else np.zeros((0, info.sample_len), np.uint32)


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    corpus = d / "corpus.txt"
    corpus.write_text("".join(documents(300, seed=1)))
    r = tool("--input", corpus, "--train-tokenizer", "--sample-bytes", 20000, "--vocab-size", 300,
             "--packing", "mlm", "--output", d / "tok")
    assert r.returncode == 0, r.stderr
    assert not (d / "tok" / "manifest.json").exists()
    return str(d / "tok" / "tokenizer.model")


def test_every_input_format_gives_the_in_memory_result(tmp_path, tokenizer_model):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    docs = documents(40, seed=2)
    docs[5] = "Ünïcode — 漢字 line\r\nwith a windows ending\n"  # text files read \r\n as \n, records keep it
    txt = tmp_path / "txt"
    txt.mkdir()
    for i, d in enumerate(docs):
        (txt / f"d{i:03d}.txt").write_text(d, encoding="utf-8", newline="")
    records = [d.replace("\r\n", "\n") for d in docs]
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        for i, d in enumerate(records[:25]):
            f.write(json.dumps({"id": i, "body": d}) + "\n" + ("\n" if i == 3 else ""))  # a blank line is skipped
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"body": d}) + "\n" for d in records[25:]).encode("utf-8")))
    pq.write_table(pa.table({"body": records, "n": list(range(40))}), tmp_path / "c.parquet", row_group_size=7)
    common = ["--tokenizer-model", tokenizer_model, "--split", "8,1,1", "--seq-len", 16, "--shard-samples", 50]
    runs = {"txt": ["--input", txt / "*.txt"],
            "jsonl": ["--input", tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.zst", "--jsonl-field", "body"],
            "parquet": ["--input", tmp_path / "c.parquet", "--parquet-column", "body", "--workers", 2]}
    manifests = {}
    for name, args in runs.items():
        r = tool(*args, *common, "--output", tmp_path / name)
        assert r.returncode == 0, (name, r.stderr)
        manifests[name] = json.loads((tmp_path / name / "manifest.json").read_text())
    shards = {n: {s: [x["sha256"] for x in m["splits"][s]["shards"]] for s in SPLITS} for n, m in manifests.items()}
    assert shards["txt"] == shards["jsonl"] == shards["parquet"]
    # the in-memory reference: whole documents, the seeded split, encode, pack
    tok = dataset_tokenizer(load_dataset_info(str(tmp_path / "txt")))
    split_of = assign_splits(len(records), (8, 1, 1), 1)
    for i, split in enumerate(SPLITS):
        ids = [np.append(np.asarray(tok.encode(d), np.uint32), tok.eod_id) for d, s in zip(records, split_of)
               if s == i]
        expected, dropped = pack_causal(ids, 16)
        assert np.array_equal(samples(tmp_path / "parquet", split), expected)
        entry = manifests["parquet"]["splits"][split]
        assert (entry["dropped_tokens"], entry["documents"]) == (dropped, len(ids))
        assert entry["words"] == sum(len(d.split()) for d, s in zip(records, split_of) if s == i)


def test_memory_stays_bounded_on_an_input_larger_than_it(tmp_path, tokenizer_model):
    """40 MB of JSONL prepare under an address-space cap 8 MiB above what preparing 1 MB needed
    (the input is five times the headroom), and the resident peak barely moves: documents are
    streamed, shards written as they fill."""
    # VmPeak / VmHWM: the peak virtual / resident size of this process image (ru_maxrss would
    # include the parent's, from the fork). The cap (RLIMIT_AS) is set before the tool starts.
    probe = ("import resource, runpy, sys; cap = int(sys.argv[1]); sys.argv = sys.argv[2:]\n"
             "if cap: resource.setrlimit(resource.RLIMIT_AS, (cap, cap))\n"
             "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
             "except SystemExit as e:\n    assert not e.code, e.code\n"
             "status = dict(l.split(':', 1) for l in open('/proc/self/status'))\n"
             "print('peak_kb', status['VmPeak'].split()[0], status['VmHWM'].split()[0], file=sys.stderr)\n")
    line = json.dumps({"text": "".join(documents(1, seed=3, lines=(40, 41)))}) + "\n"
    peaks, cap = {}, 0
    for name, mb in (("small", 1), ("large", 40)):
        path = tmp_path / f"{name}.jsonl"
        with open(path, "w") as f:
            for _ in range(mb * (1 << 20) // len(line)):
                f.write(line)
        args = [TOOL, "--quiet", "--input", path, "--tokenizer-model", tokenizer_model, "--split", "98,1,1",
                "--seq-len", 512, "--output", tmp_path / name]
        r = subprocess.run([sys.executable, "-c", probe, str(cap), *map(str, args)], capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        virtual, resident = (int(x) * 1024 for x in r.stderr.split("peak_kb")[-1].split())
        peaks[name] = resident
        cap = virtual + (8 << 20)  # the large input's cap
        m = json.loads((tmp_path / name / "manifest.json").read_text())
        assert m["splits"]["train"]["text_bytes"] > 0.95 * mb * (1 << 20) * 0.98 * 0.8
    assert peaks["large"] - peaks["small"] < 8 << 20, peaks  # the input grew by 39 MB


def test_two_parts_and_a_merge_hold_the_one_shot_tokens(tmp_path, tokenizer_model):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents(60, seed=4)))
    for packing in ("mlm", "causal"):
        common = ["--input", corpus, "--tokenizer-model", tokenizer_model, "--split", "6,1,1", "--seq-len", 24,
                  "--shard-samples", 16, "--packing", packing]
        one = tmp_path / f"one-{packing}"
        assert tool(*common, "--output", one).returncode == 0
        out = tmp_path / f"merged-{packing}"
        parts = [out / f"part-{i}" for i in range(2)]
        for i, part in enumerate(parts):
            r = tool(*common, "--shard-index", i, "--shard-count", 2, "--output", part)
            assert r.returncode == 0, r.stderr
        r = tool("--merge", *parts, "--output", out)
        assert r.returncode == 0, r.stderr
        whole, merged = (json.loads((d / "manifest.json").read_text()) for d in (one, out))
        for split in SPLITS:
            a, b = whole["splits"][split], merged["splits"][split]
            for key in ("tokens", "words", "lines", "documents", "text_bytes"):
                assert a[key] == b[key], (packing, split, key)
            got = samples(out, split)
            assert len(got) == b["samples"] == sum(s["samples"] for s in b["shards"])
            if packing == "mlm":  # samples never span documents: the same samples, in the same order
                assert np.array_equal(got, samples(one, split))
            else:  # each part's stream is the one-shot stream from where the part begins
                stream = lambda rows: np.concatenate([rows[0]] + [r[1:] for r in rows[1:]]) if len(rows) else []
                full = stream(samples(one, split))
                offset = 0
                for part in parts:
                    s = stream(samples(part, split))
                    seg = full[offset:offset + len(s)]  # the one-shot run drops only its own last tail
                    assert len(seg) > len(s) - 24 and np.array_equal(seg, s[:len(seg)])
                    offset += json.loads((part / "manifest.json").read_text())["splits"][split]["tokens"]
        assert all(s["name"].startswith("part-") for s in merged["splits"]["train"]["shards"])
        assert load_dataset_info(str(out)).split("train")["samples"] == merged["splits"]["train"]["samples"]
    # parts of another preparation, or an incomplete set, are refused naming the part
    other = tmp_path / "other"
    assert tool(*common, "--seq-len", 32, "--shard-index", 1, "--shard-count", 2, "--output", other).returncode == 0
    r = tool("--merge", parts[0], other, "--output", tmp_path / "bad")
    assert r.returncode == 2 and f"part {other}: seq_len is 32, but part {parts[0]} has 24" in r.stderr
    r = tool("--merge", parts[0], "--output", tmp_path / "bad")
    assert r.returncode == 2 and "parts 1 of 2 are missing" in r.stderr
    r = tool("--input", corpus, "--shard-count", 2, "--output", tmp_path / "bad")
    assert r.returncode == 2 and "every part must use the same tokenizer" in r.stderr


@pytest.mark.parametrize("name, content, needle", [
    ("bad.jsonl", b'{"text": "a"}\n{"text": oops}\n', r"bad.jsonl:2: not a JSON object"),
    ("nofield.jsonl", b'{"text": "a"}\n\n{"body": "b"}\n', r"nofield.jsonl:3: record has no field 'text'"),
    ("num.jsonl", b'{"text": 3}\n', r"num.jsonl:1: field 'text' is int"),
    ("latin1.jsonl", b'{"text": "a"}\n{"text": "caf\xe9"}\n', r"latin1.jsonl:2: not UTF-8 text"),
    ("latin1.txt", b"caf\xe9\n", r"latin1.txt: not UTF-8 text"),
    ("cut.txt.gz", gzip.compress(b"hello\n" * 1000)[:-30], r"cut.txt.gz: cannot decompress"),
    ("junk.txt.zst", b"not zstd at all", r"junk.txt.zst: cannot decompress"),
    ("junk.parquet", b"PAR1 not really", r"junk.parquet: not a parquet file"),
])
def test_bad_input_names_the_file_and_line(tmp_path, name, content, needle):
    (tmp_path / name).write_bytes(content)
    r = tool("--input", tmp_path / name, "--split", "1,0,0", "--output", tmp_path / "out")
    assert r.returncode == 2
    assert r.stderr.startswith("prepare_data: error: ") and needle.replace("\\", "") in r.stderr, r.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_parquet_column_is_checked(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"body": ["a"], "n": [1]}), tmp_path / "t.parquet")
    for column, needle in (("text", "no column 'text' (has 'body', 'n'); choose it with --parquet-column"),
                           ("n", "column 'n' holds int64, expected strings")):
        r = tool("--input", tmp_path / "t.parquet", "--parquet-column", column, "--output", tmp_path / "o")
        assert r.returncode == 2 and f"t.parquet: {needle}" in r.stderr, r.stderr


def test_incremental_mlm_packing_equals_whole_documents():
    rng = np.random.default_rng(5)
    for line_end in (7, -1):
        docs = [rng.integers(0, 9, rng.integers(0, 120)).astype(np.uint32) for _ in range(30)]
        packer, rows = _MLMPacker(10, 100, 101, 102, line_end), []
        for doc in docs:
            cuts = np.sort(rng.integers(0, len(doc) + 1, 3))
            for piece in np.split(doc, cuts):
                packer.feed(piece)
            packer.end_document()
            rows += packer.take()
        assert np.array_equal(np.stack(rows), pack_mlm(docs, 10, 100, 101, 102, line_end))


def test_tokenizer_sample_is_seeded_and_bounded():
    lines = [f"line {i} " + "x" * (i % 17) for i in range(5000)]
    a, b, c = sample_lines(lines, 4000, 1), sample_lines(lines, 4000, 1), sample_lines(lines, 4000, 2)
    assert a == b and a != c
    assert 3800 < sum(len(x) for x in a) <= 4000
    assert a == sorted(a, key=lines.index)  # in input order
    with pytest.raises(DataError, match="--sample-bytes -1"):
        from megatron_transnormer.data.prepare import PrepareOptions, prepare
        prepare(PrepareOptions(output="unused", sample_bytes=-1))
