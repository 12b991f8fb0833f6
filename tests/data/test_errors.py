"""Bad input gets an error naming the file; skip_corrupt skips a bad shard instead."""
import hashlib
import io
import json
import logging
import shutil
import tarfile

import numpy as np
import pytest

from megatron_transnormer.config.schema import DataConfig
from megatron_transnormer.data import DataError, TokenStream, load_dataset_info
from megatron_transnormer.data.shards import write_shard
from megatron_transnormer.data.tokenizers import dataset_tokenizer


@pytest.fixture
def copy(dataset, tmp_path):
    d = tmp_path / "ds"
    shutil.copytree(dataset[0], d)
    return d


def manifest(d):
    return json.loads((d / "manifest.json").read_text())


def set_manifest(d, m):
    (d / "manifest.json").write_text(json.dumps(m))


def reseal(d, name):
    """Record a shard's current sha256, so that the checks behind the checksum are reached."""
    m = manifest(d)
    for s in m["splits"]["valid"]["shards"]:
        if s["name"] == name:
            s["sha256"] = hashlib.sha256((d / name).read_bytes()).hexdigest()
    set_manifest(d, m)


def read_all(d, **kw):
    return list(TokenStream(DataConfig(path=str(d), **kw), "valid", micro_batch_size=1, shuffle=False,
                            infinite=False))


def test_each_bad_shard_is_named(copy):
    d, name = copy, "valid-00001.tar"
    raw = (d / name).read_bytes()
    (d / name).unlink()
    with pytest.raises(DataError, match="valid-00001.tar: shard is missing"):
        read_all(d)
    (d / name).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="valid-00001.tar: sha256 mismatch"):
        read_all(d)
    reseal(d, name)
    with pytest.raises(DataError, match="valid-00001.tar: truncated tar"):
        read_all(d)
    bad = bytearray(raw)
    bad[1024 + 10] ^= 0xFF  # in the second header (after 512 + 512 of the first member): bad checksum
    (d / name).write_bytes(bytes(bad))
    with pytest.raises(DataError, match="valid-00001.tar: corrupt tar"):
        read_all(d, verify=False)


def _tar(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for n, payload in members:
            info = tarfile.TarInfo(n)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def test_foreign_members_and_wrong_samples_are_rejected(copy):
    d, name = copy, "valid-00000.tar"
    n = manifest(d)["splits"]["valid"]["shards"][0]["samples"]
    good = np.zeros(33, "<u2").tobytes()
    for members, expect in [
        ([("a.tokens", good), ("a.pyd", b"\x80\x04K\x01.")], r"member 'a.pyd' is not a .tokens sample"),
        ([("a.pickle", b"\x80\x04K\x01.")], r"member 'a.pickle' is not a .tokens sample"),
        ([("a.tokens", good[:-2])], r"sample 'a.tokens' has 64 bytes, expected 66 .*wrong sequence length or dtype"),
        ([("a.tokens", np.zeros(33, "<u4").tobytes())], r"has 132 bytes, expected 66"),
        ([("a.tokens", np.full(33, 60000, "<u2").tobytes())] * n, r"token id 60000, outside the manifest's vocabulary"),
        ([("a.tokens", good)], rf"holds 1 samples, the manifest says {n}"),
    ]:
        (d / name).write_bytes(_tar(members))
        reseal(d, name)
        with pytest.raises(DataError, match=f"valid-00000.tar: .*{expect}"):
            read_all(d)


def test_skip_corrupt_warns_and_continues(copy, caplog):
    d = copy
    full = read_all(d)
    (d / "valid-00001.tar").write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING):
        got = read_all(d, skip_corrupt=True)
    assert "valid-00001.tar" in caplog.text and "skipping corrupt shard" in caplog.text
    m = manifest(d)["splits"]["valid"]["shards"]
    assert len(got) == len(full) - m[1]["samples"]


def test_manifest_and_layout_errors(copy, tmp_path):
    d = copy
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(DataError, match="bad.json: not valid JSON"):
        load_dataset_info(str(tmp_path / "bad.json"))
    m = manifest(d)
    m["dtype"] = "float32"
    set_manifest(d, m)
    with pytest.raises(DataError, match="manifest.json: dtype 'float32'"):
        load_dataset_info(str(d))
    m["dtype"] = "uint16"
    set_manifest(d, m)
    with pytest.raises(DataError, match=r"split 'valid' has 126 samples, fewer than the 128 readers"):
        TokenStream(DataConfig(path=str(d), num_workers=2), "valid", dp_size=64)
    with pytest.raises(DataError, match="no split 'dev'"):
        TokenStream(DataConfig(path=str(d)), "dev")
    with pytest.raises(ValueError, match="data.seq_len: 64 does not match"):
        TokenStream(DataConfig(path=str(d), seq_len=64), "train")
    (d / "tokenizer.model").write_bytes(b"x")
    with pytest.raises(DataError, match="tokenizer.model: sha256 does not match"):
        dataset_tokenizer(load_dataset_info(str(d)))


def test_shard_bytes_are_the_ustar_tarfile_writes(tmp_path):
    samples = np.arange(3 * 700, dtype=np.uint32).reshape(3, 700) % 50000
    info = write_shard(str(tmp_path / "x.tar"), samples, "x-00000", "uint16")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, row in enumerate(samples.astype("<u2")):
            t = tarfile.TarInfo(f"x-00000_{i:07d}.tokens")
            t.size, t.mtime, t.mode, t.uid, t.gid, t.uname, t.gname = row.nbytes, 0, 0o644, 0, 0, "", ""
            tar.addfile(t, io.BytesIO(row.tobytes()))
    assert (tmp_path / "x.tar").read_bytes() == buf.getvalue()
    assert info["sha256"] == hashlib.sha256(buf.getvalue()).hexdigest() and info["samples"] == 3


def test_manifest_names_only_files_inside_its_folder(copy, tmp_path):
    """A manifest from elsewhere cannot point training at other files or commands."""
    d = copy
    marker = tmp_path / "ran"
    outside = tmp_path / "outside.tar"
    shutil.copy(d / "valid-00000.tar", outside)  # a readable shard, but not the dataset's
    good = manifest(d)
    for bad in (str(outside), f"../{outside.name}", f"sub/../../{outside.name}", f"pipe:touch {marker}",
                "https://example.com/valid-00000.tar", "file:/etc/passwd", ""):
        m = json.loads(json.dumps(good))
        m["splits"]["valid"]["shards"][0]["name"] = bad
        set_manifest(d, m)
        with pytest.raises(DataError) as e:
            read_all(d)
        assert str(e.value).startswith(f"{d / 'manifest.json'}: splits.valid: shard {bad!r} is "), str(e.value)
        assert "relative to its own folder" in str(e.value) and "data.shards" in str(e.value)
    m = json.loads(json.dumps(good))
    m["tokenizer"]["file"] = "../tokenizer.model"
    set_manifest(d, m)
    with pytest.raises(DataError, match=r"manifest.json: tokenizer file '../tokenizer.model' is a path that leaves"):
        load_dataset_info(str(d))
    assert not marker.exists()
    # A name inside the folder, in a subfolder too, still reads; and the user's own config
    # may still read the shards from anywhere, through a command too.
    set_manifest(d, good)
    expected = [b.tokens.tolist() for b in read_all(d)]
    mirror = tmp_path / "mirror"
    shutil.copytree(d, mirror)
    (d / "sub").mkdir()
    shutil.move(d / "valid-00001.tar", d / "sub" / "valid-00001.tar")
    m = json.loads(json.dumps(good))
    m["splits"]["valid"]["shards"][1]["name"] = "sub/valid-00001.tar"
    set_manifest(d, m)
    assert [b.tokens.tolist() for b in read_all(d)] == expected
    assert [b.tokens.tolist() for b in read_all(d, shards=f"pipe:cat {mirror}/{{name}}")] == expected
