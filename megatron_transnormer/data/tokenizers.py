"""Tokenizers: in-process sentencepiece training, an existing sentencepiece model, the
word-level vocabulary fairseq builds for WikiText-103, and GPT-2's byte-level BPE.

Every tokenizer is saved as one file in the dataset directory; the manifest's
`tokenizer` entry (type, file, sha256) is enough to load it again (`load_tokenizer`,
or `dataset_tokenizer` for a loaded dataset).

All of them have `vocab_size`, the special ids `unk_id`, `bos_id`, `eod_id` (document
end), `pad_id`, `mask_id` (-1: none), `line_end_id` (the id that closes a line, which
masked-LM packing cuts sentences after; -1: none), `encode`, `decode` and `save`.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections import Counter
from typing import Iterable

from megatron_transnormer.data.manifest import DataError, DatasetInfo

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
        # models trained here have a "\n" piece; an existing model may lack one (unk)
        line_end = self.sp.piece_to_id("\n")
        self.line_end_id = line_end if line_end != self.unk_id else -1
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
        self.line_end_id = self.eod_id
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


class ByteLevelBPETokenizer:
    """GPT-2's byte-level BPE (`encoder.json` + `vocab.bpe`) run by Hugging Face `tokenizers`.

    GPT-2's ids are kept, so an id of encoder.json means the same token here; the specials
    `<s> <pad> </s> <unk> <mask>` follow the BPE vocabulary (one the vocabulary already
    holds keeps its id). Text is encoded line by line, as fairseq's GPT-2 encoder does: each
    line's ids, then the newline byte piece when the line ended with "\n". Ids of
    line-aligned chunks therefore concatenate to the ids of the whole text, every line
    ends with the same id (sentence boundaries for masked-LM packing), and
    decode(encode(text)) == text.
    """

    kind = "gpt2-bpe"
    FILE = "tokenizer.json"
    ENCODER, MERGES = "encoder.json", "vocab.bpe"
    SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
    NEWLINE = "\u010a"  # "Ċ": the byte-level piece of b"\n"

    def __init__(self, backend, source: str = "<memory>"):
        self.backend = backend
        # Text holding "<s>" or "</s>" is text: it must not turn into control ids
        # (it would end documents early and break decode(encode(x)) == x).
        backend.encode_special_tokens = True
        ids = {t: backend.token_to_id(t) for t in self.SPECIALS + (self.NEWLINE,)}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise DataError(f"{source}: not a byte-level BPE tokenizer of this project (no {', '.join(missing)})")
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.pad_id, self.eod_id, self.unk_id, self.mask_id = (ids[t] for t in self.SPECIALS)
        self.line_end_id = ids[self.NEWLINE]

    @classmethod
    def from_gpt2_files(cls, directory: str) -> "ByteLevelBPETokenizer":
        """Build from GPT-2's published files: `encoder.json` ({token: id}) and `vocab.bpe`
        (a `#version` line, then one merge `left right` per line, in priority order)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        vocab = _read_gpt2_encoder(os.path.join(directory, cls.ENCODER))
        merges = _read_gpt2_merges(os.path.join(directory, cls.MERGES), vocab)
        backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        # appended after the BPE ids; one the vocabulary already holds keeps its id (marked special)
        backend.add_special_tokens(list(cls.SPECIALS))
        return cls(backend, source=directory)

    @classmethod
    def from_file(cls, path: str) -> "ByteLevelBPETokenizer":
        from tokenizers import Tokenizer
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise DataError(f"{path}: tokenizer file not found") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not a tokenizers JSON file ({e})") from None
        try:
            backend = Tokenizer.from_str(text)
        except Exception as e:  # tokenizers raises a bare Exception for any bad JSON
            raise DataError(f"{path}: not a tokenizers JSON file ({e})") from None
        return cls(backend, source=path)

    def encode(self, text: str) -> list[int]:
        lines = text.split("\n")
        ids, newline = [], self.line_end_id
        encodings = self.backend.encode_batch(lines, add_special_tokens=False)
        for enc in encodings[:-1]:
            ids.extend(enc.ids)
            ids.append(newline)
        ids.extend(encodings[-1].ids)  # the text after the last "\n" (empty when it ends with one)
        return ids

    def decode(self, ids) -> str:
        # Specials (bos, eod, pad, unk, mask) decode to nothing, as sentencepiece's control ids do.
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, directory: str) -> dict:
        path = os.path.join(directory, self.FILE)
        self.backend.save(path)
        return {"type": self.kind, "file": self.FILE, "sha256": sha256_file(path), "vocab_size": self.vocab_size}


def _read_gpt2_encoder(path: str) -> dict[str, int]:
    from tokenizers.pre_tokenizers import ByteLevel

    try:
        with open(path, encoding="utf-8") as f:
            vocab = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: not found; --bpe-dir needs GPT-2's encoder.json and vocab.bpe") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(vocab, dict) or not vocab:
        raise DataError(f"{path}: expected a non-empty JSON object mapping tokens to ids, "
                        f"got {type(vocab).__name__} {str(vocab)[:60]}")
    for token, i in vocab.items():
        if type(i) is not int:
            raise DataError(f"{path}: token {token!r} has id {i!r}, expected an integer")
    # The specials are appended after the largest id, so the ids must leave no gap.
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise DataError(f"{path}: ids must be 0..{len(vocab) - 1}, each once (got {len(set(vocab.values()))} "
                        f"distinct ids from {min(vocab.values())} to {max(vocab.values())})")
    # Without all 256 byte pieces some text would have no tokens (and no <unk> to fall back to).
    missing = sorted(set(ByteLevel.alphabet()) - set(vocab))
    if missing:
        raise DataError(f"{path}: not a byte-level BPE vocabulary: {len(missing)} of the 256 byte pieces are "
                        f"missing (e.g. {missing[0]!r})")
    return vocab


def _read_gpt2_merges(path: str, vocab: dict[str, int]) -> list[tuple[str, str]]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except FileNotFoundError:
        raise DataError(f"{path}: not found; --bpe-dir needs GPT-2's encoder.json and vocab.bpe") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    if not lines[0].startswith("#version"):
        raise DataError(f"{path}:1: expected GPT-2's '#version: 0.2' header, got {lines[0][:80]!r}")
    merges = []
    for n, line in enumerate(lines[1:], 2):
        if not line:
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise DataError(f"{path}:{n}: expected a merge 'left right', got {line[:80]!r}")
        for token in (parts[0], parts[1], parts[0] + parts[1]):
            if token not in vocab:
                raise DataError(f"{path}:{n}: merge {line!r} uses {token!r}, which is not in encoder.json")
        merges.append((parts[0], parts[1]))
    return merges


_KINDS = {cls.kind: cls for cls in (SentencePieceTokenizer, WordTokenizer, ByteLevelBPETokenizer)}


def load_tokenizer(entry: dict, root: str, where: str):
    """Load the tokenizer a manifest names, checking its file's sha256."""
    kind, name = entry.get("type"), entry.get("file")
    if kind not in _KINDS or not name:
        raise DataError(f"{where}: tokenizer entry {entry!r} needs a type (one of {', '.join(_KINDS)}) and a file")
    path = os.path.join(root, name)
    if not os.path.exists(path):
        raise DataError(f"{path}: tokenizer file named by {where} is missing")
    if entry.get("sha256") and sha256_file(path) != entry["sha256"]:
        raise DataError(f"{path}: sha256 does not match the one recorded in {where}")
    tok = _KINDS[kind].from_file(path)
    if tok.vocab_size != entry.get("vocab_size", tok.vocab_size):
        raise DataError(f"{path}: vocabulary size {tok.vocab_size} differs from {entry['vocab_size']} in {where}")
    return tok


def dataset_tokenizer(info: DatasetInfo):
    """The tokenizer a prepared dataset was made with (its manifest's `tokenizer` entry)."""
    return load_tokenizer(info.manifest["tokenizer"], info.root, info.path)
