"""Raw text -> tokenizer + webdataset shards + manifest (the library behind tools/prepare_data.py).

Deterministic: the same text, options and seed give byte-identical files, whatever the
number of workers (text is encoded in line-aligned pieces whose ids concatenate to the
ids of the whole text, and results are gathered in input order).

Streaming: `--source input` is read a document piece at a time (`inputs.py`); pieces
are encoded in batches by the workers, at most a few batches ahead of the packer, and
samples go into shards that are written as they fill. What stays in memory is one byte
per document (its split), the pieces in flight, one shard, and the tokenizer training
text (all of the train split for `--tokenizer spm|word`, unless `sample_bytes` bounds
it). The input is read once to count documents, once to train a tokenizer (if one is
trained), once to encode it.

Distributed: with `shard_count` n > 1 the documents are cut into n contiguous ranges
(every part counts all documents, so that the split of each is the same as in a one-shot
run) and part `shard_index` prepares its range into a folder of its own; `merge.py`
joins the parts into one dataset. Parts need a tokenizer they all share: an existing
model (train one with `train_tokenizer`) or GPT-2's BPE.

Every split the source defines is written and must hold at least one sample: an empty
validation or test split (too few documents for the --split proportions) is an error
naming it, not a dataset training later finds without one. With --source input a
proportion of 0 leaves that split out on purpose.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
from tqdm import tqdm

from megatron_transnormer.data import inputs, sources
from megatron_transnormer.data.manifest import (FORMAT, MANIFEST_NAME, VERSION, DataError, dtype_for_vocab,
                                                manifest_path, write_manifest)
from megatron_transnormer.data.packing import pack_causal
from megatron_transnormer.data.shards import write_shard
from megatron_transnormer.data.tokenizers import (ByteLevelBPETokenizer, SentencePieceTokenizer, WordTokenizer,
                                                  load_tokenizer, sha256_file)



@dataclass
class PrepareOptions:
    output: str
    source: str = "shakespeare"  # shakespeare | wikitext-103 | input
    inputs: list[str] = field(default_factory=list)
    split_ratios: tuple[float, float, float] = (0.98, 0.01, 0.01)
    paragraphs: bool = False
    wikitext_dir: str = ""
    wikitext_raw: bool = False
    download: bool = False
    sha256: str = ""
    tokenizer: str = "spm"  # spm | word | model | gpt2-bpe
    tokenizer_model: str = ""
    bpe_dir: str = ""  # GPT-2's encoder.json and vocab.bpe, for gpt2-bpe
    spm_type: str = "bpe"
    vocab_size: int = 2048
    byte_fallback: bool = True
    spm_max_sentences: int = 0
    packing: str = "causal"
    seq_len: int = 256
    shard_samples: int = 0  # 0: 128 for shakespeare, else 2048
    workers: int = 1
    seed: int = 1
    progress: bool = True
    input_format: str = "auto"  # auto | text | jsonl | parquet (inputs.py)
    jsonl_field: str = "text"
    parquet_column: str = "text"
    # spm/word tokenizers are trained on a seeded sample of about this many bytes of the
    # train split's lines (0: all of them)
    sample_bytes: int = 0
    train_tokenizer: bool = False  # only train the tokenizer and write it into `output`
    shard_index: int = 0  # this part of a distributed preparation
    shard_count: int = 1  # number of parts (1: the whole input)


# The corpora that ship with the package dependencies, as the default configs read them
# (`tools/prepare_data.py --bundled NAME`; the Makefile, the SLURM launchers and the image
# prepare them through it): name -> the options besides the output folder.
BUNDLED = {
    "shakespeare": {"source": "shakespeare"},  # alm/tiny_cpu: causal samples of 256 + 1 ids
    "shakespeare-mlm": {"source": "shakespeare", "packing": "mlm", "seq_len": 128},  # blm/tiny_cpu
}


def requested_splits(o: PrepareOptions) -> tuple[str, ...]:
    """The splits the dataset is to hold: all three, or with --source input train and those
    whose --split proportion is positive."""
    if o.source != "input":
        return sources.SPLITS
    return tuple(name for name, ratio in zip(sources.SPLITS, o.split_ratios) if ratio > 0 or name == "train")


class Corpus:
    """The documents of each split, read as pieces (see `inputs.py`) as often as needed."""

    def __init__(self, docs: dict[str, list[str]] | None = None, spec: inputs.InputSpec | None = None,
                 split_of=None, part: tuple[int, int] = (0, 0)):
        self.docs, self.spec, self.split_of = docs, spec, split_of
        self.start, self.end = part  # this part's documents (input sources)
        self.settings: dict = {}

    def documents(self, splits) -> Iterator[tuple[str, int, Iterator[str]]]:
        """(split, document number, pieces) of the documents of `splits`, in input order."""
        if self.docs is not None:
            for split in splits:
                for number, doc in enumerate(self.docs.get(split, ())):
                    yield split, number, inputs.pieces(doc)
            return
        wanted = {sources.SPLITS.index(s) for s in splits}
        for number, doc in inputs.iter_documents(self.spec, self.start, self.end):
            if self.split_of[number] in wanted:
                yield sources.SPLITS[self.split_of[number]], number, doc

    def counts(self) -> dict[str, int]:
        """Documents per split, over the whole input (all parts)."""
        if self.docs is not None:
            return {s: len(d) for s, d in self.docs.items()}
        return {s: int(n) for s, n in zip(sources.SPLITS, np.bincount(self.split_of, minlength=len(sources.SPLITS)))}


def load_corpus(o: PrepareOptions) -> Corpus:
    if o.source == "shakespeare":
        return Corpus(sources.shakespeare())
    if o.source == "wikitext-103":
        directory = o.wikitext_dir
        if o.download:
            directory = sources.download_wikitext(o.wikitext_dir or os.path.join(o.output, "raw"), o.sha256)
        if not directory:
            raise DataError("--source wikitext-103 needs --wikitext-dir DIR (or --download)")
        return Corpus(sources.wikitext(directory, raw=o.wikitext_raw))
    if o.source == "input":
        if not o.inputs:
            raise DataError("--source input needs --input PATH/GLOB ...")
        sources.check_ratios(o.split_ratios)
        spec = sources.input_spec(o.inputs, o.paragraphs, o.input_format, o.jsonl_field, o.parquet_column)
        total = sum(spec.counts)
        n, i = o.shard_count, o.shard_index
        corpus = Corpus(spec=spec, split_of=sources.assign_splits(total, o.split_ratios, o.seed),
                        part=(i * total // n, (i + 1) * total // n))
        # what every part of one preparation must share (checked by the merge)
        corpus.settings = {"documents": total, "split": [float(r) for r in o.split_ratios],
                           "paragraphs": o.paragraphs,
                           "input_format": o.input_format, "jsonl_field": o.jsonl_field,
                           "parquet_column": o.parquet_column, "files": len(spec.files),
                           "files_sha256": hashlib.sha256("\n".join(os.path.basename(f) for f in spec.files)
                                                          .encode("utf-8")).hexdigest()}
        return corpus
    raise DataError(f"--source {o.source!r} is not one of shakespeare, wikitext-103, input")


def load_text(o: PrepareOptions) -> dict[str, list[str]]:
    """The documents of each split, in memory (small corpora, tests)."""
    corpus = load_corpus(o)
    out = {s: [] for s in sources.SPLITS}
    for split, _, doc in corpus.documents(sources.SPLITS):
        out[split].append("".join(doc))
    return out


def _train_lines(corpus: Corpus):
    """The train split's lines, as `str.splitlines` cuts each document."""
    for _, _, doc in corpus.documents(("train",)):
        for piece in doc:
            yield from piece.splitlines()


def sample_lines(lines, budget: int, seed: int) -> list[str]:
    """A seeded sample of `lines` of at most `budget` UTF-8 bytes, in input order: the lines
    of the smallest random keys (one pass; only the sample is held)."""
    rng = np.random.default_rng([seed, 0x5A3B1E])
    heap: list[tuple[float, int, str]] = []  # (-key, index, line): the largest key on top
    size = 0
    for index, line in enumerate(lines):
        key, n = rng.random(), len(line.encode("utf-8"))
        if size + n > budget and (not heap or key > -heap[0][0]):
            continue  # it would be the first to leave again
        heapq.heappush(heap, (-key, index, line))
        size += n
        while size > budget:
            size -= len(heapq.heappop(heap)[2].encode("utf-8"))
    return [line for _, _, line in sorted(heap, key=lambda item: item[1])]


def build_tokenizer(o: PrepareOptions, corpus: Corpus):
    if o.tokenizer == "spm":
        lines = (line for line in _train_lines(corpus) if line.strip())
        if o.sample_bytes:
            lines = sample_lines(lines, o.sample_bytes, o.seed)
        return SentencePieceTokenizer.train(lines, o.vocab_size, o.spm_type, o.byte_fallback,
                                            mask_token=o.packing == "mlm", max_sentences=o.spm_max_sentences,
                                            seed=o.seed)
    if o.tokenizer == "word":
        lines = _train_lines(corpus)
        return WordTokenizer.build(sample_lines(lines, o.sample_bytes, o.seed) if o.sample_bytes else lines)
    if o.tokenizer == "model":
        if not o.tokenizer_model:
            raise DataError("--tokenizer model needs --tokenizer-model FILE")
        return SentencePieceTokenizer.from_file(o.tokenizer_model)
    if o.tokenizer == "gpt2-bpe":
        if not o.bpe_dir:
            raise DataError("--tokenizer gpt2-bpe needs --bpe-dir DIR (holding GPT-2's encoder.json and vocab.bpe)")
        return ByteLevelBPETokenizer.from_gpt2_files(o.bpe_dir)
    raise DataError(f"--tokenizer {o.tokenizer!r} is not one of spm, word, model, gpt2-bpe")


_WORKER_TOKENIZER = None


def _init_worker(entry: dict, root: str):
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = load_tokenizer(entry, root, "tokenizer")


def _encode_batch(texts: list[str]) -> list[tuple[np.ndarray, int, int, int]]:
    """(ids, words, lines, UTF-8 bytes) of each text; counted here, in the worker, so that
    the main process only packs."""
    return [(np.asarray(_WORKER_TOKENIZER.encode(t), dtype=np.uint32), len(t.split()), len(t.splitlines()),
             len(t.encode("utf-8"))) for t in texts]


def _batches(items, chars: int):
    """Consecutive (meta, text) items grouped into lists of about `chars` characters."""
    batch, size = [], 0
    for meta, text in items:
        batch.append((meta, text))
        size += len(text)
        if size >= chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encode_stream(items, entry: dict, root: str, workers: int):
    """(meta, (ids, words, lines, bytes)) for each (meta, text) of `items`, in order. With
    workers > 1, batches are encoded by that many processes, at most 4 per worker in flight
    (Pool.imap would read all of `items` ahead)."""
    batches = _batches(items, inputs.CHUNK_CHARS)
    if workers <= 1:
        _init_worker(entry, root)
        for batch in batches:
            yield from zip((meta for meta, _ in batch), _encode_batch([text for _, text in batch]))
        return
    with mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(entry, root)) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(([meta for meta, _ in batch], pool.apply_async(_encode_batch, ([t for _, t in batch],))))
            if len(pending) >= 4 * workers:
                metas, result = pending.popleft()
                yield from zip(metas, result.get())
        while pending:
            metas, result = pending.popleft()
            yield from zip(metas, result.get())


class _MLMPacker:
    """`packing.pack_mlm` fed a document's ids piece by piece: the same rows."""

    def __init__(self, seq_len: int, bos: int, eos: int, pad: int, line_end: int):
        self.cap = seq_len - 2
        if self.cap < 1:
            raise DataError(f"--seq-len {seq_len}: masked-LM samples need at least 3 positions")
        self.seq_len, self.bos, self.eos, self.pad, self.line_end = seq_len, bos, eos, pad, line_end
        self.rows: list[np.ndarray] = []
        self.current: list[np.ndarray] = []
        self.size = 0
        self.open: list[np.ndarray] = []  # the sentence not yet closed by a line end
        self.open_len = 0

    def _flush(self, parts):
        if parts:
            body = np.concatenate(parts)
            row = np.full(self.seq_len, self.pad, dtype=np.uint32)
            row[0], row[1:1 + len(body)], row[1 + len(body)] = self.bos, body, self.eos
            self.rows.append(row)

    def _sentence(self, sent: np.ndarray):
        while len(sent) > self.cap:  # an over-long sentence fills samples of its own
            self._flush(self.current)
            self.current, self.size = [], 0
            self._flush([sent[:self.cap]])
            sent = sent[self.cap:]
        if not len(sent):
            return
        if self.size + len(sent) > self.cap:
            self._flush(self.current)
            self.current, self.size = [], 0
        self.current.append(sent)
        self.size += len(sent)

    def feed(self, ids: np.ndarray):
        cuts = np.flatnonzero(ids == self.line_end) + 1 if self.line_end >= 0 else np.zeros(0, np.int64)
        start = 0
        for cut in cuts:
            self.open.append(ids[start:cut])
            self._sentence(np.concatenate(self.open))
            self.open, self.open_len, start = [], 0, cut
        rest = ids[start:]
        if len(rest):
            self.open.append(rest)
            self.open_len += len(rest)
        if self.open_len > self.cap:
            # Its full length is unknown but above the cap: the first cap-sized samples are the same.
            sent = np.concatenate(self.open)
            self._flush(self.current)
            self.current, self.size = [], 0
            keep = (len(sent) - 1) % self.cap + 1
            for i in range(0, len(sent) - keep, self.cap):
                self._flush([sent[i:i + self.cap]])
            self.open, self.open_len = [sent[len(sent) - keep:]], keep

    def end_document(self):
        if self.open_len:
            self._sentence(np.concatenate(self.open))
        self.open, self.open_len = [], 0
        self._flush(self.current)
        self.current, self.size = [], 0

    def take(self) -> list[np.ndarray]:
        rows, self.rows = self.rows, []
        return rows


class SplitWriter:
    """Packs one split's token stream and writes its shards as they fill."""

    def __init__(self, directory: str, name: str, o: PrepareOptions, tok, dtype: str, shard_samples: int):
        self.directory, self.name, self.o, self.tok, self.dtype = directory, name, o, tok, dtype
        self.shard_samples = shard_samples
        self.eod = o.packing == "causal" and tok.line_end_id != tok.eod_id
        self.mlm = None if o.packing == "causal" else _MLMPacker(o.seq_len, tok.bos_id, tok.eod_id, tok.pad_id,
                                                               tok.line_end_id)
        self.carry = np.zeros(0, np.uint32)  # causal: ids not yet in a whole sample
        self.pending: list[np.ndarray] = []  # samples of the shard being filled
        self.shards: list[dict] = []
        self.doc = None
        self.stats = {"samples": 0, "tokens": 0, "words": 0, "lines": 0, "documents": 0, "text_bytes": 0}

    def piece(self, doc: int, ids: np.ndarray, words: int, lines: int, nbytes: int):
        if doc != self.doc:
            self.end_document()
            self.doc = doc
            self.stats["documents"] += 1
        self.stats["words"] += words
        self.stats["lines"] += lines
        self.stats["text_bytes"] += nbytes
        self._ids(ids)

    def end_document(self):
        if self.doc is None:
            return
        self.doc = None
        if self.eod:
            self._ids(np.array([self.tok.eod_id], np.uint32))
        if self.mlm is not None:
            self.mlm.end_document()
            self._rows(self.mlm.take())

    def _ids(self, ids: np.ndarray):
        self.stats["tokens"] += len(ids)
        if self.mlm is not None:
            self.mlm.feed(ids)
            self._rows(self.mlm.take())
            return
        stream = np.concatenate([self.carry, ids])
        samples, _ = pack_causal([stream], self.o.seq_len)
        self._rows(list(samples))
        self.carry = stream[len(samples) * self.o.seq_len:].copy()

    def _rows(self, rows: list[np.ndarray]):
        for row in rows:
            self.pending.append(np.array(row, dtype=np.uint32))
            if len(self.pending) == self.shard_samples:
                self._write()

    def _write(self):
        i = len(self.shards)
        part = np.stack(self.pending)
        self.pending = []
        info = write_shard(os.path.join(self.directory, f"{self.name}-{i:05d}.tar"), part, f"{self.name}-{i:05d}",
                           self.dtype)
        info["tokens"] = int(len(part) * self.o.seq_len if self.mlm is None else (part != self.tok.pad_id).sum())
        self.stats["samples"] += len(part)
        self.shards.append(info)

    def finish(self) -> dict:
        self.end_document()
        if self.pending:
            self._write()
        s = self.stats
        n, total = s["samples"], s["tokens"]
        dropped = 0
        if self.mlm is None:
            dropped = total if n == 0 else total - 1 - n * self.o.seq_len
        return {"shards": self.shards, "samples": n, "tokens": total, "dropped_tokens": int(dropped),
                "words": s["words"], "lines": s["lines"], "documents": s["documents"],
                "text_bytes": s["text_bytes"]}


def tokenizer_entry(o: PrepareOptions, tok, directory: str) -> dict:
    """Save the tokenizer into `directory`; its manifest entry."""
    entry = tok.save(directory)
    entry["source"] = o.tokenizer
    if o.tokenizer == "model":
        entry["source"] = os.path.abspath(o.tokenizer_model)
    if o.tokenizer == "spm":
        entry.update({"model_type": o.spm_type, "byte_fallback": o.byte_fallback})
    if o.tokenizer == "gpt2-bpe":
        # which BPE files the ids come from: GPT-2's published files have known checksums
        entry["source"] = os.path.abspath(o.bpe_dir)
        entry["source_sha256"] = {name: sha256_file(os.path.join(o.bpe_dir, name))
                                  for name in (ByteLevelBPETokenizer.ENCODER, ByteLevelBPETokenizer.MERGES)}
    return entry


def _check_options(o: PrepareOptions) -> None:
    if o.seq_len < 2:
        raise DataError(f"--seq-len {o.seq_len}: must be at least 2")
    if o.packing not in ("causal", "mlm"):
        raise DataError(f"--packing {o.packing!r} is not causal or mlm")
    if o.workers < 1:
        raise DataError(f"--workers {o.workers}: must be >= 1")
    if o.sample_bytes < 0:
        raise DataError(f"--sample-bytes {o.sample_bytes}: must be >= 0")
    if o.shard_count < 1 or not 0 <= o.shard_index < o.shard_count:
        raise DataError(f"--shard-index {o.shard_index} --shard-count {o.shard_count}: needs "
                        f"0 <= index < count")
    if o.shard_count > 1:
        if o.source != "input":
            raise DataError(f"--shard-count {o.shard_count}: distributed preparation reads --source input "
                            f"(got --source {o.source})")
        if o.tokenizer not in ("model", "gpt2-bpe"):
            raise DataError(f"--shard-count {o.shard_count} with --tokenizer {o.tokenizer}: every part must use "
                            f"the same tokenizer; train one first (--train-tokenizer --output DIR) and give each "
                            f"part --tokenizer-model DIR/tokenizer.model")
    if o.train_tokenizer and o.tokenizer not in ("spm", "word"):
        raise DataError(f"--train-tokenizer trains --tokenizer spm or word, not {o.tokenizer}")


def publish(staging: str, output: str, replace_dataset: bool = True) -> None:
    """Move a complete dataset from `staging` into `output`, replacing the shards of the one
    there; the manifest last, so that it never names a file not yet there."""
    if replace_dataset:
        _remove_previous(output)
    names = sorted(os.listdir(staging))
    for name in names:
        if name != MANIFEST_NAME:
            os.replace(os.path.join(staging, name), os.path.join(output, name))
    if MANIFEST_NAME in names:
        os.replace(os.path.join(staging, MANIFEST_NAME), os.path.join(output, MANIFEST_NAME))


def staged(output: str):
    """A staging folder inside `output` (same file system: moves are renames)."""
    os.makedirs(output, exist_ok=True)
    return tempfile.mkdtemp(prefix=".prepare-", dir=output)


def prepare(o: PrepareOptions) -> dict:
    """Prepare a dataset into o.output (or only its tokenizer, with o.train_tokenizer); the
    manifest. Everything is written into a staging folder first: bad input fails there,
    leaving what the output folder held untouched."""
    _check_options(o)
    corpus = load_corpus(o)
    counts = corpus.counts()
    for name in ("train",) if o.train_tokenizer else requested_splits(o):
        if not counts.get(name):
            how = (f"--split {','.join(f'{r:g}' for r in o.split_ratios)} gives it none of the "
                   f"{sum(counts.values())} documents; use more documents, --paragraphs "
                   f"or a larger proportion" if o.source == "input" else "no text")
            raise DataError(f"source {o.source}: the {name} split would be empty ({how})")
    staging = staged(o.output)
    try:
        tok = build_tokenizer(o, corpus)
        entry = tokenizer_entry(o, tok, staging)
        if o.train_tokenizer:  # a dataset in the folder keeps its shards (its tokenizer file is replaced)
            publish(staging, o.output, replace_dataset=False)
            return {"tokenizer": entry, "vocab_size": tok.vocab_size}
        manifest = _write_splits(o, corpus, tok, entry, staging)
        publish(staging, o.output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _write_splits(o: PrepareOptions, corpus: Corpus, tok, entry: dict, directory: str) -> dict:
    dtype = dtype_for_vocab(tok.vocab_size)
    shard_samples = o.shard_samples or (128 if o.source == "shakespeare" else 2048)
    sample_len = o.seq_len + 1 if o.packing == "causal" else o.seq_len
    names = [s for s in sources.SPLITS if corpus.counts().get(s)]
    writers = {s: SplitWriter(directory, s, o, tok, dtype, shard_samples) for s in names}
    bar = tqdm(unit="char", unit_scale=True, desc=f"tokenize {','.join(names)}", file=sys.stderr,
               disable=not o.progress)
    texts = (((split, number), piece) for split, number, doc in corpus.documents(names) for piece in doc)
    for (split, number), (ids, words, lines, nbytes) in encode_stream(texts, entry, directory, o.workers):
        writers[split].piece(number, ids, words, lines, nbytes)
        bar.update(nbytes)
    bar.close()
    splits = {}
    for split, writer in writers.items():
        splits[split] = writer.finish()
        if splits[split]["samples"] == 0 and o.shard_count == 1:  # a part may hold too little: the merge checks
            raise DataError(f"split {split}: {splits[split]['tokens']} tokens make no sample of {sample_len}; "
                            f"use a smaller --seq-len")
    manifest = {
        "format": FORMAT, "version": VERSION, "source": o.source, "tokenizer": entry,
        "vocab_size": tok.vocab_size, "dtype": dtype, "byte_order": "little", "seq_len": o.seq_len,
        "sample_len": sample_len, "packing": o.packing, "seed": o.seed,
        "special": {"eod_id": tok.eod_id, "pad_id": tok.pad_id, "bos_id": tok.bos_id, "unk_id": tok.unk_id,
                    "mask_id": tok.mask_id},
        "splits": splits,
    }
    if corpus.settings:
        manifest["input"] = corpus.settings
    if o.shard_count > 1:
        manifest["part"] = {"index": o.shard_index, "count": o.shard_count,
                            "documents": [corpus.start, corpus.end]}
    write_manifest(directory, manifest)
    return manifest


def _remove_previous(directory: str):
    """Delete the shards (and their label files, for classification datasets) that a
    manifest already in `directory` names, so that a new dataset leaves none stale."""
    path = manifest_path(directory)
    if not os.path.exists(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        shards = [s for split in old.get("splits", {}).values() for s in split.get("shards", [])]
        names = [s["name"] for s in shards] + [s["labels"]["name"] for s in shards
                                               if isinstance(s.get("labels"), dict)]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise DataError(f"{path}: unreadable manifest in the output folder; remove it first") from None
    for name in names:
        target = os.path.join(directory, os.path.basename(name))
        if os.path.exists(target):
            os.remove(target)
