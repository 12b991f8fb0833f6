import math

import pytest

from megatron_transnormer.data import load_dataset_info
from megatron_transnormer.evaluation import report, token_perplexity, word_perplexity


def test_token_and_word_perplexity(dataset):
    assert token_perplexity(2.0 * 100, 100) == pytest.approx(math.exp(2.0))
    # whole split: exp(sum_nll / words); a subset: the mean scaled by the split's tokens per word
    assert word_perplexity(2.0, 150, 100) == pytest.approx(math.exp(2.0 * 150 / 100))
    info = load_dataset_info(dataset[0])
    r = report(nll_sum=3.0 * 500, tokens=500, info=info, split="valid")
    tokens, words = info.split_tokens("valid"), info.split_words("valid")
    assert tokens > words > 0
    assert r.token_ppl == pytest.approx(math.exp(3.0))
    assert r.word_ppl == pytest.approx(math.exp(3.0 * tokens / words))
    assert r.coverage == pytest.approx(500 / tokens)
    full = report(nll_sum=3.0 * tokens, tokens=tokens, info=info, split="valid")
    assert full.word_ppl == pytest.approx(math.exp(3.0 * tokens / words))
    with pytest.raises(ValueError):
        token_perplexity(1.0, 0)
    assert word_perplexity(1e6, 2, 1) == math.inf
