"""Text (IMDB): the Stanford release `aclImdb/{train,test}/{neg,pos}/*.txt` to train / test.

One review per file (label neg 0, pos 1), read as UTF-8 and encoded character by
character over a vocabulary of the characters seen at least MIN_FREQ times in the
training reviews (`vocab.char_vocab`). The original has no validation split and
validates on the test split: the manifest's `valid` names the test shards
(`same_as: test`). Reviews are listed by label then file name and written in a seeded
order, so that shards mix the two classes.
"""
from __future__ import annotations

import os
from collections import Counter

from megatron_transnormer.data.manifest import DataError
from megatron_transnormer.data.lra.files import find_base, read_text
from megatron_transnormer.data.lra.splits import seeded_order
from megatron_transnormer.data.lra.vocab import EOS_ID, PAD_ID, UNK_ID, Encoder, char_vocab, count_chars
from megatron_transnormer.data.lra.writer import SplitWriter

LABELS = ("neg", "pos")
NUM_CLASSES, MAX_LENGTH, MIN_FREQ = 2, 4096, 15


def list_reviews(base: str, split: str) -> list[tuple[str, int]]:
    found = []
    for label, name in enumerate(LABELS):
        folder = os.path.join(base, split, name)
        if not os.path.isdir(folder):
            raise DataError(f"text: {folder} is missing")
        files = sorted(f for f in os.listdir(folder) if f.endswith(".txt"))
        if not files:
            raise DataError(f"text: {folder} holds no .txt review")
        found += [(os.path.join(folder, f), label) for f in files]
    return found


def prepare(input_dir: str, output: str, o) -> dict:
    base = find_base(input_dir, ["", "aclImdb"], os.path.join("train", "pos"), "text")
    max_length = o.max_length or MAX_LENGTH
    reviews = {split: list_reviews(base, split) for split in ("train", "test")}
    # Training reviews are kept for the second pass (about 33 MB); test reviews are read as written.
    train_text = [read_text(path) for path, _ in reviews["train"]]
    counts = Counter()
    for text in train_text:
        count_chars(counts, text, max_length)
    vocab = char_vocab(counts, o.min_freq if o.min_freq is not None else MIN_FREQ)
    encoder = Encoder(vocab)
    splits = {}
    for split, items in reviews.items():
        writer = SplitWriter(output, split, max_length, NUM_CLASSES, PAD_ID, o.shard_samples)
        for i in seeded_order(len(items), o.seed):
            path, label = items[i]
            text = train_text[i] if split == "train" else read_text(path)
            _, cut = encoder.row(text, max_length, writer.next_row())
            writer.add(label, cut)
        splits[split] = writer.close(source=os.path.join(split, "{neg,pos}", "*.txt"))
    splits["valid"] = {**splits["test"], "same_as": "test"}
    return dict(task="text", tokenizer={"type": "lra-char", "vocab": vocab, "vocab_size": len(vocab),
                                        "min_freq": o.min_freq if o.min_freq is not None else MIN_FREQ,
                                        "source": os.path.abspath(base)},
                vocab_size=len(vocab), max_length=max_length, inputs=1, num_classes=NUM_CLASSES,
                special={"pad_id": PAD_ID, "unk_id": UNK_ID, "eod_id": EOS_ID}, splits=splits,
                classification={"input_kind": "tokens", "label_names": list(LABELS), "order_seed": o.seed})
