"""Tokenizers: in-process sentencepiece training, an existing sentencepiece model, and
the word-level vocabulary fairseq builds for WikiText-103.

Every tokenizer is saved as one file in the dataset directory; the manifest's
`tokenizer` entry (type, file, sha256) is enough to load it again (`load_tokenizer`).
"""
from __future__ import annotations

import hashlib
import io
import os
import re
from collections import Counter
from typing import Iterable

from megatron_transnormer.data.manifest import DataError

_SPACE = re.compile(r"\s+")


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class SentencePieceTokenizer:
    """A sentencepiece model; `eod_id` is its end-of-sentence id."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, source: str = "<memory>"):
        import sentencepiece as spm
        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_proto)
        except Exception as e:  # sentencepiece raises a bare RuntimeError/OSError
            raise DataError(f"{source}: not a sentencepiece model ({e})") from None
        self.vocab_size = self.sp.get_piece_size()
        self.unk_id = self.sp.unk_id()
        self.bos_id = self.sp.bos_id()
        self.eod_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id()
        mask = self.sp.piece_to_id("<mask>")
        self.mask_id = mask if mask != self.unk_id else -1
        if self.eod_id < 0:
            raise DataError(f"{source}: the sentencepiece model has no end-of-sentence id (eos_id=-1); "
                            f"document ends need one")

    @classmethod
    def from_file(cls, path: str) -> "SentencePieceTokenizer":
        try:
            with open(path, "rb") as f:
                return cls(f.read(), source=path)
        except FileNotFoundError:
            raise DataError(f"{path}: tokenizer model not found") from None

    @classmethod
    def train(cls, lines: Iterable[str], vocab_size: int, model_type: str = "bpe",
              byte_fallback: bool = True, mask_token: bool = False, max_sentences: int = 0,
              seed: int = 1) -> "SentencePieceTokenizer":
        """Train on `lines` in this process.

        Identity normalisation, no dummy prefix and a newline piece make decode(encode(x))
        give back x exactly, and let text be encoded in line-aligned chunks (in parallel)
        with the same ids as in one piece.
        """
        import sentencepiece as spm
        spm.set_random_generator_seed(seed)
        out = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines), model_writer=out, model_type=model_type,
                vocab_size=vocab_size, byte_fallback=byte_fallback, character_coverage=1.0,
                normalization_rule_name="identity", remove_extra_whitespaces=False,
                add_dummy_prefix=False, user_defined_symbols=["\n"],
                control_symbols=["<mask>"] if mask_token else [],
                unk_id=0, bos_id=1, eos_id=2, pad_id=3,
                # all sentences, in order, on one thread: the same input gives the same model
                input_sentence_size=max_sentences, shuffle_input_sentence=max_sentences > 0,
                num_threads=1, max_sentence_length=1 << 16, minloglevel=2,
                hard_vocab_limit=True)
        except RuntimeError as e:
            raise DataError(f"sentencepiece training failed (vocabulary size {vocab_size}, "
                            f"{model_type}): {e}") from None
        return cls(out.getvalue(), source="<trained>")

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        # Control ids (bos, eos, pad) decode to nothing; out-of-range ids are a caller bug.
        return self.sp.decode([int(i) for i in ids])

    def save(self, directory: str) -> dict:
        path = os.path.join(directory, "tokenizer.model")
        with open(path, "wb") as f:
            f.write(self.proto)
        return {"type": self.kind, "file": "tokenizer.model", "sha256": sha256_file(path),
                "vocab_size": self.vocab_size}


class WordTokenizer:
    """Whitespace words, as fairseq's Dictionary does for WikiText-103.

    Ids: <s>=0, <pad>=1, </s>=2, <unk>=3, then the training words by count (descending;
    ties in string order), padded with `madeupwordNNNN` to a multiple of 8. Every line
    ends with </s>, which is also the document end: the stream fairseq's language
    models are trained and evaluated on.
    """

    kind = "word"
    SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")

    def __init__(self, words: list[str]):
        self.symbols = list(self.SPECIALS) + list(words)
        self.index = {w: i for i, w in enumerate(self.symbols)}
        self.vocab_size = len(self.symbols)
        self.bos_id, self.pad_id, self.eod_id, self.unk_id = 0, 1, 2, 3
        self.mask_id = -1
        self.counts: dict = {}

    @classmethod
    def build(cls, lines: Iterable[str], padding_factor: int = 8) -> "WordTokenizer":
        counts = Counter()
        for line in lines:
            counts.update(_SPACE.sub(" ", line).strip().split())
        for special in cls.SPECIALS:
            counts.pop(special, None)  # "<unk>" in the text counts toward the special id
        words = [w for w, _ in sorted(counts.items(), key=lambda wc: (-wc[1], wc[0]))]
        i = 0
        while (len(words) + len(cls.SPECIALS)) % padding_factor:
            words.append(f"madeupword{i:04d}")
            i += 1
        tok = cls(words)
        tok.counts = counts
        return tok

    @classmethod
    def from_file(cls, path: str) -> "WordTokenizer":
        words = []
        try:
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    parts = line.rstrip("\n").rsplit(" ", 1)
                    if len(parts) != 2 or not parts[0]:
                        raise DataError(f"{path}:{n}: expected 'word count', got {line.rstrip()!r}")
                    words.append(parts[0])
        except FileNotFoundError:
            raise DataError(f"{path}: vocabulary file not found") from None
        return cls(words)

    def encode(self, text: str) -> list[int]:
        ids, unk, index = [], self.unk_id, self.index
        for line in text.splitlines():
            ids.extend(index.get(w, unk) for w in line.split())
            ids.append(self.eod_id)
        return ids

    def decode(self, ids) -> str:
        out, line = [], []
        for i in ids:
            i = int(i)
            if i == self.eod_id:
                out.append(" ".join(line) + "\n")
                line = []
            elif i not in (self.bos_id, self.pad_id):
                line.append(self.symbols[i])
        if line:
            out.append(" ".join(line))
        return "".join(out)

    def save(self, directory: str) -> dict:
        # fairseq's dict.txt layout (specials implied), so the vocabulary can be checked against it
        path = os.path.join(directory, "dict.txt")
        with open(path, "w", encoding="utf-8") as f:
            for w in self.symbols[len(self.SPECIALS):]:
                f.write(f"{w} {self.counts.get(w, 0)}\n")
        return {"type": self.kind, "file": "dict.txt", "sha256": sha256_file(path),
                "vocab_size": self.vocab_size}


def load_tokenizer(entry: dict, root: str, where: str):
    """Load the tokenizer a manifest names, checking its file's sha256."""
    kind, name = entry.get("type"), entry.get("file")
    if kind not in ("sentencepiece", "word") or not name:
        raise DataError(f"{where}: tokenizer entry {entry!r} needs type 'sentencepiece' or 'word' and a file")
    path = os.path.join(root, name)
    if not os.path.exists(path):
        raise DataError(f"{path}: tokenizer file named by {where} is missing")
    if entry.get("sha256") and sha256_file(path) != entry["sha256"]:
        raise DataError(f"{path}: sha256 does not match the one recorded in {where}")
    tok = SentencePieceTokenizer.from_file(path) if kind == "sentencepiece" else WordTokenizer.from_file(path)
    if tok.vocab_size != entry.get("vocab_size", tok.vocab_size):
        raise DataError(f"{path}: vocabulary size {tok.vocab_size} differs from {entry['vocab_size']} in {where}")
    return tok
