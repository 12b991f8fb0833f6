"""Shard files: deterministic writing and checked reading of webdataset tars of token ids.

A shard is a plain (ustar) tar whose members are `<key>.tokens`, each the raw
little-endian token ids of one sample (`sample_len` ids of the manifest's dtype).
Reading decodes nothing else: any other member (a pickle, a `.json`, ...) is rejected,
so an untrusted shard cannot run code. Local shards are checked against the sha256 of
the manifest before use; other URLs (`pipe:`, `http://`, ...), which only the user's
`data.shards` can name (a manifest names files inside its folder), are streamed through
webdataset's `gopen`.
"""
from __future__ import annotations

import hashlib
import io
import os
from typing import Iterator

import numpy as np

from megatron_transnormer.data.manifest import SAMPLE_EXT, DataError

_BLOCK = 512
_RECORD = 20 * _BLOCK


def _ustar_header(name: bytes, size: int) -> bytes:
    """The header tarfile writes in ustar format for a 0644 file of mtime 0, uid/gid 0, no
    user names (checked byte for byte by the tests), built directly: tarfile takes ~100x longer."""
    if len(name) > 100:
        raise ValueError(f"member name {name!r} is longer than 100 bytes")
    h = bytearray(_BLOCK)
    h[0:len(name)] = name
    h[100:148] = b"0000644\0" + b"0000000\0" * 2 + b"%011o\0" % size + b"00000000000\0"
    h[148:156] = b" " * 8  # the checksum is computed with its own field as spaces
    h[156:157] = b"0"
    h[257:265] = b"ustar\x0000"
    h[148:155] = b"%06o\0" % sum(h)
    return bytes(h)


def write_shard(path: str, samples: np.ndarray, key_prefix: str, dtype: str) -> dict:
    """Write `samples` ([n, sample_len]) as one tar; same input -> same bytes."""
    data = np.ascontiguousarray(samples, dtype=np.dtype(dtype).newbyteorder("<"))
    digest = hashlib.sha256()
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        written = 0
        for i, row in enumerate(data):
            payload = row.tobytes()
            pad = -len(payload) % _BLOCK
            name = f"{key_prefix}_{i:07d}.{SAMPLE_EXT}".encode("utf-8")
            chunk = _ustar_header(name, len(payload)) + payload + b"\0" * pad
            digest.update(chunk)
            f.write(chunk)
            written += len(chunk)
        # end-of-archive: two zero blocks, then zeros up to tar's 10240-byte record
        tail = b"\0" * (2 * _BLOCK + (-(written + 2 * _BLOCK) % _RECORD))
        digest.update(tail)
        f.write(tail)
    os.replace(tmp, path)
    return {"name": os.path.basename(path), "sha256": digest.hexdigest(), "samples": int(len(data))}


def is_local(url: str) -> bool:
    head = url.split("/", 1)[0]
    return ":" not in head or url.startswith("file:")


def _local_path(url: str) -> str:
    return url[len("file:"):] if url.startswith("file:") else url


def open_shard(url: str, sha256: str | None, verify: bool) -> io.RawIOBase:
    """A readable binary stream of the shard; local files are read whole and checked."""
    if is_local(url):
        path = _local_path(url)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise DataError(f"{path}: shard is missing") from None
        except OSError as e:
            raise DataError(f"{path}: cannot read shard ({e})") from None
        if verify and sha256 and hashlib.sha256(data).hexdigest() != sha256:
            raise DataError(f"{path}: sha256 mismatch (manifest {sha256[:12]}..., file "
                            f"{hashlib.sha256(data).hexdigest()[:12]}...): corrupt or replaced shard")
        return io.BytesIO(data)
    import webdataset as wds
    try:
        stream = wds.gopen(url, "rb")
    except Exception as e:  # gopen raises whatever the transport raises
        raise DataError(f"{url}: cannot open shard ({e})") from None
    return _Hashing(stream, url, sha256 if verify else None)


class _Hashing:
    """A streamed shard, hashed as it is read and checked at its end (it cannot be checked first)."""

    def __init__(self, stream, url: str, sha256: str | None):
        self.stream, self.url, self.expected = stream, url, sha256
        self.digest = hashlib.sha256()

    def read(self, n: int) -> bytes:
        try:
            data = self.stream.read(n)
        except Exception as e:  # a failing pipe: name the shard
            raise DataError(f"{self.url}: reading failed ({e})") from None
        self.digest.update(data)
        return data

    def finish(self) -> None:
        while self.read(1 << 20):  # the rest: tar padding after the end marker
            pass
        if self.expected and self.digest.hexdigest() != self.expected:
            raise DataError(f"{self.url}: sha256 mismatch after reading (manifest {self.expected[:12]}..., "
                            f"stream {self.digest.hexdigest()[:12]}...): corrupt or replaced shard")

    def close(self) -> None:
        try:
            self.stream.close()
        except Exception as e:  # a pipe command that failed reports here
            raise DataError(f"{self.url}: {e}") from None


def _read_exact(stream, n: int, url: str, what: str) -> bytes:
    buf = stream.read(n)
    while len(buf) < n:
        more = stream.read(n - len(buf))
        if not more:
            raise DataError(f"{url}: truncated tar ({what}: got {len(buf)} of {n} bytes)")
        buf += more
    return buf


def _octal(field: bytes, url: str, what: str) -> int:
    text = field.rstrip(b"\0 ").strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise DataError(f"{url}: corrupt tar header ({what} field {field!r})") from None


def iter_members(stream, url: str) -> Iterator[tuple[str, bytes]]:
    """(name, payload) of each regular member; directories and pax headers are skipped."""
    while True:
        header = stream.read(_BLOCK)
        if not header:
            raise DataError(f"{url}: truncated tar (no end-of-archive marker)")
        if len(header) < _BLOCK:
            header += _read_exact(stream, _BLOCK - len(header), url, "header")
        if header == b"\0" * _BLOCK:
            return
        stored = _octal(header[148:156], url, "checksum")
        actual = sum(header[:148]) + 8 * 32 + sum(header[156:])
        if stored != actual:
            raise DataError(f"{url}: corrupt tar (bad header checksum)")
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
        if prefix:
            name = f"{prefix}/{name}"
        size = _octal(header[124:136], url, f"size of {name!r}")
        kind = header[156:157]
        padded = (size + _BLOCK - 1) // _BLOCK * _BLOCK
        payload = _read_exact(stream, padded, url, f"member {name!r}")[:size] if padded else b""
        if kind in (b"0", b"\0"):
            yield name, payload
        elif kind in (b"5", b"x", b"g"):
            continue
        else:
            raise DataError(f"{url}: member {name!r} has unsupported tar type {kind!r}")


def read_samples(url: str, sha256: str | None, sample_len: int, dtype: str, expected: int | None,
                 verify: bool = True) -> Iterator[np.ndarray]:
    """Yield each sample of a shard as a [sample_len] array, checking every member."""
    dt = np.dtype(dtype).newbyteorder("<")
    nbytes = sample_len * dt.itemsize
    stream = open_shard(url, sha256, verify)
    count = 0
    try:
        for name, payload in iter_members(stream, url):
            base = name.rsplit("/", 1)[-1]
            ext = base.split(".", 1)[1] if "." in base else ""
            if ext != SAMPLE_EXT:
                raise DataError(f"{url}: member {name!r} is not a .{SAMPLE_EXT} sample; refusing to "
                                f"decode it (only raw token arrays are read)")
            if len(payload) != nbytes:
                raise DataError(f"{url}: sample {name!r} has {len(payload)} bytes, expected {nbytes} "
                                f"({sample_len} x {dtype}); wrong sequence length or dtype")
            count += 1
            yield np.frombuffer(payload, dtype=dt)
        if isinstance(stream, _Hashing):
            stream.finish()
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
    if expected is not None and count != expected:
        raise DataError(f"{url}: holds {count} samples, the manifest says {expected}")

