"""Retrieval (AAN): `tsv_data/new_aan_pairs.{train,eval,test}.tsv` to train / valid / test.

No header; each line is `label, input1_id, input2_id, text1, text2`, tab-separated. Both
documents are encoded character by character (each cut to max_length - 1 characters,
then `<eos>`) over the characters of the training documents (`vocab.char_vocab`, every
character seen); a row is document 1 then document 2, each max_length ids. The files
are read twice as they go (count characters, then encode), never held whole: the
training file is about 1 GB. Rows keep the file order.
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Iterator

from megatron_transnormer.data.manifest import DataError
from megatron_transnormer.data.lra.files import find_base, require_files, text_lines
from megatron_transnormer.data.lra.vocab import EOS_ID, PAD_ID, UNK_ID, Encoder, char_vocab, count_chars
from megatron_transnormer.data.lra.writer import SplitWriter

FILES = {"train": "new_aan_pairs.train.tsv", "valid": "new_aan_pairs.eval.tsv", "test": "new_aan_pairs.test.tsv"}
NUM_CLASSES, MAX_LENGTH, MIN_FREQ = 2, 4000, 1


def read_pairs(path: str) -> Iterator[tuple[int, str, str, int]]:
    """(line number, text1, text2, label) of each row."""
    for number, line in text_lines(path):
        fields = line.split("\t")
        if len(fields) != 5:
            raise DataError(f"{path}: line {number}: expected 5 tab-separated fields (label, input1_id, "
                            f"input2_id, text1, text2), got {len(fields)}")
        try:
            value = float(fields[0])
        except ValueError:
            value = -1.0
        if value not in (0.0, 1.0):
            raise DataError(f"{path}: line {number}: label {fields[0]!r} is not 0 or 1")
        yield number, fields[3], fields[4], int(value)


def prepare(input_dir: str, output: str, o) -> dict:
    base = find_base(input_dir, ["", "tsv_data", "lra_release/tsv_data"], FILES["train"], "retrieval")
    paths = {split: os.path.join(base, name) for split, name in FILES.items()}
    require_files(list(paths.values()), "retrieval")
    max_length = o.max_length or MAX_LENGTH
    min_freq = o.min_freq if o.min_freq is not None else MIN_FREQ
    counts = Counter()
    for _, text1, text2, _ in read_pairs(paths["train"]):
        count_chars(counts, text1, max_length)
        count_chars(counts, text2, max_length)
    vocab = char_vocab(counts, min_freq)
    encoder = Encoder(vocab)
    splits = {}
    for split, path in paths.items():
        writer = SplitWriter(output, split, 2 * max_length, NUM_CLASSES, PAD_ID, o.shard_samples)
        for _, text1, text2, label in read_pairs(path):
            row = writer.next_row()
            _, cut1 = encoder.row(text1, max_length, row[:max_length])
            _, cut2 = encoder.row(text2, max_length, row[max_length:])
            writer.add(label, cut1 or cut2)
        splits[split] = writer.close(source=os.path.basename(path))
    return dict(task="retrieval", tokenizer={"type": "lra-char", "vocab": vocab, "vocab_size": len(vocab),
                                             "min_freq": min_freq, "source": os.path.abspath(base)},
                vocab_size=len(vocab), max_length=max_length, inputs=2, num_classes=NUM_CLASSES,
                special={"pad_id": PAD_ID, "unk_id": UNK_ID, "eod_id": EOS_ID}, splits=splits,
                classification={"input_kind": "tokens"})
