"""Raw text -> tokenizer + webdataset shards + manifest (the library behind tools/prepare_data.py).

Deterministic: the same text, options and seed give byte-identical files, whatever the
number of workers (text is encoded in line-aligned chunks whose ids concatenate to the
ids of the whole text, and results are gathered in input order).

Every split the source defines is written and must hold at least one sample: an empty
validation or test split (too few documents for the --split proportions) is an error
naming it, not a dataset training later finds without one. With --source input a
proportion of 0 leaves that split out on purpose.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from megatron_transnormer.data import sources
from megatron_transnormer.data.manifest import (FORMAT, VERSION, DataError, dtype_for_vocab,
                                                manifest_path, write_manifest)
from megatron_transnormer.data.packing import pack_causal, pack_mlm
from megatron_transnormer.data.shards import write_shard
from megatron_transnormer.data.tokenizers import (ByteLevelBPETokenizer, SentencePieceTokenizer, WordTokenizer,
                                                  load_tokenizer, sha256_file)

CHUNK_CHARS = 1 << 18


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


def load_text(o: PrepareOptions) -> dict[str, list[str]]:
    if o.source == "shakespeare":
        return sources.shakespeare()
    if o.source == "wikitext-103":
        directory = o.wikitext_dir
        if o.download:
            directory = sources.download_wikitext(o.wikitext_dir or os.path.join(o.output, "raw"), o.sha256)
        if not directory:
            raise DataError("--source wikitext-103 needs --wikitext-dir DIR (or --download)")
        return sources.wikitext(directory, raw=o.wikitext_raw)
    if o.source == "input":
        if not o.inputs:
            raise DataError("--source input needs --input PATH/GLOB ...")
        return sources.text_files(o.inputs, o.split_ratios, o.seed, o.paragraphs)
    raise DataError(f"--source {o.source!r} is not one of shakespeare, wikitext-103, input")


def _lines(docs: list[str]):
    for doc in docs:
        for line in doc.splitlines():
            if line.strip():
                yield line


def build_tokenizer(o: PrepareOptions, train_docs: list[str]):
    if o.tokenizer == "spm":
        return SentencePieceTokenizer.train(_lines(train_docs), o.vocab_size, o.spm_type, o.byte_fallback,
                                            mask_token=o.packing == "mlm", max_sentences=o.spm_max_sentences,
                                            seed=o.seed)
    if o.tokenizer == "word":
        return WordTokenizer.build(line for doc in train_docs for line in doc.splitlines())
    if o.tokenizer == "model":
        if not o.tokenizer_model:
            raise DataError("--tokenizer model needs --tokenizer-model FILE")
        return SentencePieceTokenizer.from_file(o.tokenizer_model)
    if o.tokenizer == "gpt2-bpe":
        if not o.bpe_dir:
            raise DataError("--tokenizer gpt2-bpe needs --bpe-dir DIR (holding GPT-2's encoder.json and vocab.bpe)")
        return ByteLevelBPETokenizer.from_gpt2_files(o.bpe_dir)
    raise DataError(f"--tokenizer {o.tokenizer!r} is not one of spm, word, model, gpt2-bpe")


def _chunks(docs: list[str]):
    """(doc index, text) pieces cut after a newline, so that their ids concatenate exactly."""
    for d, doc in enumerate(docs):
        start = 0
        while start < len(doc):
            end = min(len(doc), start + CHUNK_CHARS)
            if end < len(doc):
                nl = doc.rfind("\n", start, end)
                end = nl + 1 if nl >= start else doc.find("\n", end) + 1 or len(doc)
            yield d, doc[start:end]
            start = end


_WORKER_TOKENIZER = None


def _init_worker(entry: dict, root: str):
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = load_tokenizer(entry, root, "tokenizer")


def _encode(task):
    d, text = task
    return d, np.asarray(_WORKER_TOKENIZER.encode(text), dtype=np.uint32), len(text)


def tokenize(docs: list[str], entry: dict, root: str, workers: int, label: str, progress: bool):
    tasks = list(_chunks(docs))
    per_doc: list[list[np.ndarray]] = [[] for _ in docs]
    bar = tqdm(total=sum(len(t[1]) for t in tasks), unit="char", unit_scale=True, desc=f"tokenize {label}",
               file=sys.stderr, disable=not progress)
    if workers > 1:
        with mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(entry, root)) as pool:
            for d, ids, n in pool.imap(_encode, tasks, chunksize=1):
                per_doc[d].append(ids)
                bar.update(n)
    else:
        _init_worker(entry, root)
        for task in tasks:
            d, ids, n = _encode(task)
            per_doc[d].append(ids)
            bar.update(n)
    bar.close()
    return [np.concatenate(p) if p else np.zeros(0, np.uint32) for p in per_doc]


def prepare(o: PrepareOptions) -> dict:
    if o.seq_len < 2:
        raise DataError(f"--seq-len {o.seq_len}: must be at least 2")
    if o.packing not in ("causal", "mlm"):
        raise DataError(f"--packing {o.packing!r} is not causal or mlm")
    if o.workers < 1:
        raise DataError(f"--workers {o.workers}: must be >= 1")
    texts = load_text(o)
    for name in requested_splits(o):
        if not texts.get(name):
            how = (f"--split {','.join(f'{r:g}' for r in o.split_ratios)} gives it none of the "
                   f"{sum(len(d) for d in texts.values())} documents; use more documents, --paragraphs "
                   f"or a larger proportion" if o.source == "input" else "no text")
            raise DataError(f"source {o.source}: the {name} split would be empty ({how})")
    os.makedirs(o.output, exist_ok=True)
    _remove_previous(o.output)
    tok = build_tokenizer(o, texts["train"])
    entry = tok.save(o.output)
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
    dtype = dtype_for_vocab(tok.vocab_size)
    shard_samples = o.shard_samples or (128 if o.source == "shakespeare" else 2048)
    sample_len = o.seq_len + 1 if o.packing == "causal" else o.seq_len
    splits = {}
    for split, docs in texts.items():
        if not docs:
            continue
        ids = tokenize(docs, entry, o.output, o.workers, split, o.progress)
        # Causal streams mark document ends with the end-of-document id (fairseq's word streams
        # already end every line with it). Masked-LM samples never span documents and close
        # each sample with it themselves.
        if o.packing == "causal" and tok.line_end_id != tok.eod_id:
            ids = [np.append(d, np.uint32(tok.eod_id)) for d in ids]
        total = int(sum(len(d) for d in ids))
        dropped = 0
        if o.packing == "causal":
            samples, dropped = pack_causal(ids, o.seq_len)
        else:
            samples = pack_mlm(ids, o.seq_len, tok.bos_id, tok.eod_id, tok.pad_id, tok.line_end_id)
        if len(samples) == 0:
            raise DataError(f"split {split}: {total} tokens make no sample of {sample_len}; use a smaller --seq-len")
        shards = []
        for i, start in enumerate(range(0, len(samples), shard_samples)):
            part = samples[start:start + shard_samples]
            info = write_shard(os.path.join(o.output, f"{split}-{i:05d}.tar"), part, f"{split}-{i:05d}", dtype)
            info["tokens"] = int(len(part) * o.seq_len if o.packing == "causal" else (part != tok.pad_id).sum())
            shards.append(info)
        splits[split] = {
            "shards": shards, "samples": int(len(samples)), "tokens": total, "dropped_tokens": int(dropped),
            "words": sum(len(d.split()) for d in docs), "lines": sum(len(d.splitlines()) for d in docs),
            "documents": len(docs), "text_bytes": sum(len(d.encode("utf-8")) for d in docs)}
    manifest = {
        "format": FORMAT, "version": VERSION, "source": o.source, "tokenizer": entry,
        "vocab_size": tok.vocab_size, "dtype": dtype, "byte_order": "little", "seq_len": o.seq_len,
        "sample_len": sample_len, "packing": o.packing, "seed": o.seed,
        "special": {"eod_id": tok.eod_id, "pad_id": tok.pad_id, "bos_id": tok.bos_id, "unk_id": tok.unk_id,
                    "mask_id": tok.mask_id},
        "splits": splits,
    }
    write_manifest(o.output, manifest)
    return manifest


def _remove_previous(directory: str):
    path = manifest_path(directory)
    if not os.path.exists(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        names = [s["name"] for split in old.get("splits", {}).values() for s in split.get("shards", [])]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise DataError(f"{path}: unreadable manifest in the output folder; remove it first") from None
    for name in names:
        target = os.path.join(directory, os.path.basename(name))
        if os.path.exists(target):
            os.remove(target)
