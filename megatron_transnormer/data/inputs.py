"""Reading `--source input` corpora as a stream of documents, in bounded memory.

Files are plain text, JSON Lines (one record per line, the text in a chosen field) or
parquet (the text in a chosen column), each optionally gzip- (`.gz`) or zstd-compressed
(`.zst`, `.zstd`; parquet compresses internally). A document is a whole text file, a
JSON record or a parquet row; with `paragraphs` each of them is cut at blank lines.

A document reaches the tokenizer as pieces of at most about `CHUNK_CHARS` characters,
each cut right after a newline (a line longer than that stays whole), so that the ids
of the pieces concatenate to the ids of the whole document and per-line and per-word
counts add up. Only one piece (or one paragraph, or one parquet record batch) is held
at a time: the memory used does not grow with the size of the input.

Documents are numbered in input order (files in the order given, globs sorted). A text
file with no characters is no document; every non-blank JSONL line and every parquet
row is one (an empty text contributes nothing), so that they can be counted without
parsing (`count_documents`).
"""
from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
from dataclasses import dataclass, field
from typing import Iterator

from megatron_transnormer.data.manifest import DataError

CHUNK_CHARS = 1 << 18
FORMATS = ("auto", "text", "jsonl", "parquet")
_COMPRESSED = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
_JSONL = (".jsonl", ".ndjson", ".json")


@dataclass(frozen=True)
class InputSpec:
    """What the input files are and how they turn into documents."""
    files: tuple[str, ...]
    paragraphs: bool = False
    format: str = "auto"  # auto: by extension (.jsonl/.ndjson/.json, .parquet; else text)
    jsonl_field: str = "text"
    parquet_column: str = "text"
    # per file: how many documents it holds (filled by `count_documents`)
    counts: tuple[int, ...] = field(default=(), compare=False)


def file_format(path: str, fmt: str = "auto") -> tuple[str, str | None]:
    """(text | jsonl | parquet, compression or None) of `path`."""
    base, ext = os.path.splitext(path.lower())
    compression = _COMPRESSED.get(ext)
    if compression:
        ext = os.path.splitext(base)[1]
    if fmt != "auto":
        return fmt, compression
    if ext == ".parquet":
        return "parquet", compression
    return ("jsonl" if ext in _JSONL else "text"), compression


def _binary(path: str, compression: str | None):
    try:
        raw = open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: input file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror or e})") from None
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if compression == "zstd":
        try:
            import zstandard
        except ImportError:
            raw.close()
            raise DataError(f"{path}: zstd-compressed input needs the zstandard package "
                            f"(pip install zstandard)") from None
        return zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
    return raw


class _Reader:
    """A text file (decompressed, decoded as UTF-8 with universal newlines, as `open` in
    text mode reads it) whose decoding and decompression errors name the file (and line)."""

    def __init__(self, path: str, compression: str | None):
        self.path = path
        self.raw = _binary(path, compression)
        self.f = None
        self.line = 0

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except (EOFError, OSError) as e:  # gzip: truncated (EOFError) or not gzip (BadGzipFile)
            raise DataError(f"{self.path}: cannot decompress ({e})") from None
        except Exception as e:
            if type(e).__name__ == "ZstdError":  # zstandard's, imported only for .zst files
                raise DataError(f"{self.path}: cannot decompress ({e})") from None
            raise

    def read(self, n: int) -> str:
        if self.f is None:
            self.f = io.TextIOWrapper(self.raw, encoding="utf-8")
        try:
            return self._guard(self.f.read, n)
        except UnicodeDecodeError as e:
            raise DataError(f"{self.path}: not UTF-8 text ({e})") from None

    def lines(self) -> Iterator[str]:
        """Lines ending in "\\n" (but maybe the last); each is decoded on its own, so that an
        error can name its line."""
        buffered = self.raw if hasattr(self.raw, "peek") else io.BufferedReader(self.raw)
        while True:
            data = self._guard(buffered.readline)
            if not data:
                return
            self.line += 1
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{self.path}:{self.line}: not UTF-8 text ({e})") from None
            if "\r" in text:  # universal newlines: \r\n and a lone \r end a line as \n does
                yield from _lines_of(text.replace("\r\n", "\n").replace("\r", "\n"))
            else:
                yield text

    def close(self):
        (self.f or self.raw).close()


def pieces(text: str) -> Iterator[str]:
    """`text` cut after newlines into pieces of about CHUNK_CHARS characters."""
    start = 0
    while start < len(text):
        end = min(len(text), start + CHUNK_CHARS)
        if end < len(text):
            nl = text.rfind("\n", start, end)
            end = nl + 1 if nl >= start else text.find("\n", end) + 1 or len(text)
        yield text[start:end]
        start = end


def _file_pieces(r: _Reader) -> Iterator[str]:
    """A whole text file as pieces, read CHUNK_CHARS characters at a time."""
    carry = ""
    while True:
        block = r.read(CHUNK_CHARS)
        if not block:
            break
        carry += block
        nl = carry.rfind("\n")
        if nl < 0 or len(carry) < CHUNK_CHARS:
            continue  # a line still open, or too little to be worth a piece
        yield carry[:nl + 1]
        carry = carry[nl + 1:]
    if carry:
        yield carry


def paragraphs(lines: Iterator[str]) -> Iterator[str]:
    """Blank-line-separated paragraphs of the text made by `lines` (each ending in "\\n" but
    maybe the last), as `re.split(r"\\n\\s*\\n", text)` cuts them, each with its outer
    newlines stripped and one "\\n" appended; those holding only whitespace are left out."""
    current: list[str] = []
    first = True

    def flush():
        text = "\n".join(current)
        current.clear()
        return text.strip("\n") + "\n" if text.strip() else None

    for raw in lines:
        newline = raw.endswith("\n")
        segment = raw[:-1] if newline else raw
        # A separator is "\n", whitespace-only lines, "\n": a blank segment with a newline on both sides.
        if not first and newline and not segment.strip():
            p = flush()
            if p:
                yield p
        else:
            current.append(segment)
        first = False
    p = flush()
    if p:
        yield p


def _jsonl_texts(r: _Reader, field_name: str, skip: int = 0) -> Iterator[str]:
    """The `field_name` text of each record; the first `skip` records are passed over unparsed."""
    for line in r.lines():
        if not line.strip():
            continue
        if skip:
            skip -= 1
            yield None
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{r.path}:{r.line}: not a JSON object ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{r.path}:{r.line}: expected a JSON object, got {type(record).__name__}")
        if field_name not in record:
            raise DataError(f"{r.path}:{r.line}: record has no field {field_name!r} (has "
                            f"{', '.join(map(repr, sorted(record)[:8])) or 'none'}); choose it with --jsonl-field")
        text = record[field_name]
        if not isinstance(text, str):
            raise DataError(f"{r.path}:{r.line}: field {field_name!r} is {type(text).__name__}, expected a string")
        yield text


def _parquet(path: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: parquet input needs the pyarrow package (pip install pyarrow)") from None
    try:
        return pq.ParquetFile(path)
    except FileNotFoundError:
        raise DataError(f"{path}: input file not found") from None
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a file that is not parquet
        raise DataError(f"{path}: not a parquet file ({e})") from None


def _check_column(pf, path: str, column: str) -> None:
    names = pf.schema_arrow.names
    if column not in names:
        raise DataError(f"{path}: no column {column!r} (has {', '.join(map(repr, names[:8]))}); "
                        f"choose it with --parquet-column")
    kind = pf.schema_arrow.field(column).type
    if str(kind) not in ("string", "large_string", "string_view"):
        raise DataError(f"{path}: column {column!r} holds {kind}, expected strings")


def _parquet_texts(path: str, column: str, skip: int = 0) -> Iterator[str | None]:
    pf = _parquet(path)
    _check_column(pf, path, column)
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[column]):
        for text in batch.column(0).to_pylist():
            row += 1
            if row <= skip:
                yield None
            elif text is None:
                yield ""  # a null is an empty document: rows stay countable from the metadata
            else:
                yield text


def _lines_of(text: str) -> Iterator[str]:
    """`text` as lines each ending in "\\n" (but maybe the last), as a file reads them."""
    start = 0
    while start < len(text):
        end = text.find("\n", start) + 1 or len(text)
        yield text[start:end]
        start = end


def _documents(path: str, spec: InputSpec, skip: int = 0) -> Iterator[Iterator[str] | None]:
    """Each document of `path` as an iterator of pieces; None for each of the first `skip`
    documents (passed over without being parsed where the format allows)."""
    fmt, compression = file_format(path, spec.format)
    # where documents are records, the record reader itself can pass over unwanted ones
    record_skip = 0 if spec.paragraphs else skip
    reader = None
    try:
        if fmt == "parquet":
            texts = _parquet_texts(path, spec.parquet_column, record_skip)
        else:
            reader = _Reader(path, compression)
            if fmt == "jsonl":
                texts = _jsonl_texts(reader, spec.jsonl_field, record_skip)
            elif spec.paragraphs:
                texts = paragraphs(reader.lines())
            else:  # the whole file is one document, streamed
                rest = _file_pieces(reader)
                head = next(rest, None)
                if head is not None:
                    yield None if skip else _chain(head, rest)
                return
        if spec.paragraphs and fmt != "text":  # a record's text cut into paragraphs
            texts = (p for text in texts for p in paragraphs(_lines_of(text)))
        for text in texts:
            if record_skip:
                record_skip -= 1
                yield None
            elif skip and spec.paragraphs:
                skip -= 1
                yield None
            else:
                yield pieces(text)
    finally:
        if reader is not None:
            reader.close()


def _chain(head: str, rest: Iterator[str]) -> Iterator[str]:
    yield head
    yield from rest


def _count_file(path: str, spec: InputSpec) -> int:
    fmt, compression = file_format(path, spec.format)
    if not spec.paragraphs:
        if fmt == "parquet":  # from the footer, without reading the data
            pf = _parquet(path)
            _check_column(pf, path, spec.parquet_column)
            return pf.metadata.num_rows
        if fmt == "jsonl":
            r = _Reader(path, compression)
            try:
                return sum(1 for line in r.lines() if line.strip())
            finally:
                r.close()
    return sum(1 for doc in _documents(path, spec) if _drain(doc))


def _drain(doc) -> bool:
    for _ in doc:
        pass
    return True


def count_documents(spec: InputSpec) -> InputSpec:
    """`spec` with the number of documents of each file (a pass over the input that only
    counts, except with paragraphs: they are found by reading everything)."""
    return dataclasses.replace(spec, counts=tuple(_count_file(p, spec) for p in spec.files))


def iter_documents(spec: InputSpec, start: int = 0, end: int | None = None) -> Iterator[tuple[int, Iterator[str]]]:
    """(document number, pieces) of documents start .. end-1 (`spec.counts` must be filled);
    files holding none of them are not opened."""
    end = sum(spec.counts) if end is None else end
    first = 0
    for path, count in zip(spec.files, spec.counts):
        if first + count > start and first < end:
            docs = _documents(path, spec, max(0, start - first))
            try:
                for number, doc in enumerate(docs, first):
                    if number >= end:
                        break
                    if doc is not None:
                        yield number, doc
            finally:
                docs.close()
        first += count
