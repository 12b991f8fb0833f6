"""The project's tokenizers as a Hugging Face `tokenizers` tokenizer (tokenizer.json) that gives
the same ids as their `encode`, plus the special tokens transformers needs.

    backend, specials = hf_tokenizer(tokenizer, head)      # tokenizers.Tokenizer, {role: token}
    save_tokenizer(tokenizer, head, out_dir)               # tokenizer.json + tokenizer_config.json

Supported: sentencepiece BPE models as this project trains them (identity normalisation,
no dummy prefix, whitespace kept), and GPT-2's byte-level BPE. Either way text such as
"</s>" stays text (`split_special_tokens`), as in the project's tokenizers.

What `tokenizer(text)` adds around the ids is what the model saw in training: the causal LM
gets the end-of-document id first (it precedes every document of the packed stream, and
tools/generate.py puts it before a prompt); the masked LM gets `<s> … </s>` (its samples).
`encode(text, add_special_tokens=False)` gives exactly the project tokenizer's ids.
"""
from __future__ import annotations

import json
import os

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

SPM_NORMAL, SPM_UNKNOWN, SPM_CONTROL, SPM_USER_DEFINED, SPM_BYTE = 1, 2, 3, 4, 6  # sentencepiece piece types


class TokenizerExportError(ValueError):
    """A tokenizer this exporter cannot reproduce exactly; the message says which setting."""


def _spm_model(tokenizer):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer.proto)
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    unsupported = {
        "model_type": (trainer.model_type != sentencepiece_model_pb2.TrainerSpec.BPE, "BPE"),
        "normalization_rule_name": (norm.name != "identity" or norm.precompiled_charsmap, "identity"),
        "add_dummy_prefix": (norm.add_dummy_prefix, "false"),
        "remove_extra_whitespaces": (norm.remove_extra_whitespaces, "false"),
        "split_by_whitespace": (not trainer.split_by_whitespace, "true"),
        "treat_whitespace_as_suffix": (trainer.treat_whitespace_as_suffix, "false"),
    }
    for key, (bad, wanted) in unsupported.items():
        if bad:
            raise TokenizerExportError(f"sentencepiece model: {key} must be {wanted} to be exported to tokenizer.json "
                                       f"with the same ids (this project trains its models so)")
    return proto


def _sentencepiece(tokenizer) -> Tokenizer:
    """sentencepiece's BPE as tokenizers' BPE: the vocabulary with the same ids; a merge for every
    way a piece splits into two pieces, ranked by the piece's score (sentencepiece merges the
    adjacent pair whose union scores highest); spaces as "▁", a new word at each; characters
    outside the vocabulary as <0xNN> byte pieces."""
    proto = _spm_model(tokenizer)
    pieces = [(p.piece, p.type, p.score) for p in proto.pieces]
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    mergeable = {piece for piece, kind, _ in pieces if kind == SPM_NORMAL}
    ranked = []
    for i, (piece, kind, score) in enumerate(pieces):
        if kind != SPM_NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-score, i, vocab[left], vocab[right], (left, right)))
    merges = [pair for *_, pair in sorted(ranked)]
    unk = pieces[proto.trainer_spec.unk_id][0]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                                   byte_fallback=proto.trainer_spec.byte_fallback))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=True)
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    # User-defined pieces ("\n") are cut out of the text before anything else, as sentencepiece does;
    # control pieces (<s>, </s>, <pad>, <mask>) and <unk> never come from text.
    backend.add_tokens([AddedToken(piece, normalized=False, special=False)
                        for piece, kind, _ in pieces if kind == SPM_USER_DEFINED])
    backend.add_special_tokens([AddedToken(piece, normalized=False, special=True)
                                for piece, kind, _ in pieces if kind in (SPM_CONTROL, SPM_UNKNOWN)])
    return backend


def _gpt2_bpe(tokenizer) -> Tokenizer:
    """The project's GPT-2 BPE encodes line by line and joins the lines with the newline piece:
    the same as cutting every "\\n" out first (GPT-2's own pattern would keep "\\n\\n" together)."""
    backend = Tokenizer.from_str(tokenizer.backend.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return backend


CONVERTERS = {"sentencepiece": _sentencepiece, "gpt2-bpe": _gpt2_bpe}


def hf_tokenizer(tokenizer, head: str) -> tuple[Tokenizer, dict]:
    """-> (the tokenizers.Tokenizer, the special tokens by transformers' names) of a project
    tokenizer, for a model with `head` (lm or masked_lm; what `tokenizer(text)` adds, see above)."""
    if tokenizer.kind not in CONVERTERS:
        raise TokenizerExportError(f"the {tokenizer.kind!r} tokenizer cannot be exported to tokenizer.json yet "
                                   f"(supported: {', '.join(CONVERTERS)})")
    backend = CONVERTERS[tokenizer.kind](tokenizer)
    piece = lambda i: backend.id_to_token(i) if i >= 0 else None  # noqa: E731  (-1: the tokenizer has none)
    eod, bos = piece(tokenizer.eod_id), piece(tokenizer.bos_id)
    if head == "lm":
        backend.post_processor = processors.TemplateProcessing(
            single=f"{eod} $A", pair=f"{eod} $A {eod} $B", special_tokens=[(eod, tokenizer.eod_id)])
        # bos is what a causal LM conditions on first: here the end of the previous document.
        specials = {"bos_token": eod, "eos_token": eod}
    else:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {eod}", pair=f"{bos} $A {eod} {eod} $B {eod}",
            special_tokens=[(bos, tokenizer.bos_id), (eod, tokenizer.eod_id)])
        specials = {"bos_token": bos, "eos_token": eod, "cls_token": bos, "sep_token": eod}
    specials.update(unk_token=piece(tokenizer.unk_id), pad_token=piece(tokenizer.pad_id),
                    mask_token=piece(tokenizer.mask_id))
    return backend, {k: v for k, v in specials.items() if v is not None}


def save_tokenizer(tokenizer, head: str, out_dir: str, model_max_length: int | None = None) -> list[str]:
    """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json into out_dir;
    returns the file names."""
    backend, specials = hf_tokenizer(tokenizer, head)
    backend.save(os.path.join(out_dir, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials,
              "split_special_tokens": True,  # "</s>" in a text is text, as in the project's tokenizers
              "clean_up_tokenization_spaces": False,
              "padding_side": "left" if head == "lm" else "right"}
    if model_max_length:
        config["model_max_length"] = model_max_length
    files = {"tokenizer_config.json": config, "special_tokens_map.json": specials}
    for name, content in files.items():
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2, ensure_ascii=False)
            f.write("\n")
    return ["tokenizer.json", *files]
