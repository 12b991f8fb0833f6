"""ListOps: `listops-1000/basic_{train,val,test}.tsv` to train / valid / test.

Each file has the header `Source\\tTarget`, then one expression and its value (0-9) per
line. Expressions are tokenised as LRA does (`vocab.listops_tokens`) over the fixed
18-id vocabulary (3 specials + 15 symbols); a symbol outside it, a missing field or a
value outside 0-9 is an error naming the file and line. Rows keep the file order (the
files are already in random order).
"""
from __future__ import annotations

import os
from typing import Iterator

from megatron_transnormer.data.manifest import DataError
from megatron_transnormer.data.lra.files import find_base, require_files, text_lines
from megatron_transnormer.data.lra.vocab import EOS_ID, PAD_ID, UNK_ID, Encoder, listops_tokens, listops_vocab
from megatron_transnormer.data.lra.writer import SplitWriter

FILES = {"train": "basic_train.tsv", "valid": "basic_val.tsv", "test": "basic_test.tsv"}
HEADER = "Source\tTarget"
NUM_CLASSES, MAX_LENGTH = 10, 2048


def read_tsv(path: str, symbols: set[str]) -> Iterator[tuple[int, list[str], int]]:
    """(line number, tokens, value) of each row; blank lines are skipped."""
    lines = text_lines(path)
    first = next(lines, None)
    if first is None or first[1] != HEADER:
        raise DataError(f"{path}: line 1: expected the header {HEADER!r}, got "
                        f"{(first[1][:60] if first else 'an empty file')!r}")
    for number, line in lines:
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            raise DataError(f"{path}: line {number}: expected 2 tab-separated fields (Source, Target), "
                            f"got {len(fields)}")
        source, target = fields
        if target.strip() not in {str(v) for v in range(NUM_CLASSES)}:
            raise DataError(f"{path}: line {number}: Target {target!r} is not a value 0-9")
        tokens = listops_tokens(source)
        if not tokens:
            raise DataError(f"{path}: line {number}: empty Source")
        unknown = next((t for t in tokens if t not in symbols), None)
        if unknown is not None:
            raise DataError(f"{path}: line {number}: symbol {unknown!r} is not a ListOps symbol "
                            f"(digits, [MAX, [MIN, [MED, [SM, ])")
        yield number, tokens, int(target)


def prepare(input_dir: str, output: str, o) -> dict:
    base = find_base(input_dir, ["", "listops-1000", "lra_release/listops-1000"], FILES["train"], "listops")
    paths = {split: os.path.join(base, name) for split, name in FILES.items()}
    require_files(list(paths.values()), "listops")
    max_length = o.max_length or MAX_LENGTH
    vocab = listops_vocab()
    encoder, symbols = Encoder(vocab), set(vocab[3:])
    splits = {}
    for split, path in paths.items():
        writer = SplitWriter(output, split, max_length, NUM_CLASSES, PAD_ID, o.shard_samples)
        for _, tokens, value in read_tsv(path, symbols):
            _, cut = encoder.row(tokens, max_length, writer.next_row())
            writer.add(value, cut)
        splits[split] = writer.close(source=os.path.basename(path))
    return dict(task="listops", tokenizer={"type": "lra-listops", "vocab": vocab, "vocab_size": len(vocab),
                                           "source": os.path.abspath(base)},
                vocab_size=len(vocab), max_length=max_length, inputs=1, num_classes=NUM_CLASSES,
                special={"pad_id": PAD_ID, "unk_id": UNK_ID, "eod_id": EOS_ID}, splits=splits,
                classification={"input_kind": "tokens"})
