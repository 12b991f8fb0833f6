"""Dataset blending (data.blend): the mix's shares, each dataset's own stream, exact resume
with the same and another layout, and the refusals.

Ranks are simulated in one process, as in test_stream.py: a BlendStream needs only
(dp_rank, dp_size). Rows are (dataset, epoch, index, token ids); dataset and epoch come
from the key (epoch + dataset << 32).
"""
import json
import os
from collections import Counter

import pytest

from megatron_transnormer.config import ConfigError, load_config
from megatron_transnormer.config.schema import DataConfig, validate_config
from megatron_transnormer.data import DataError, TokenStream, load_dataset_info
from megatron_transnormer.data.blend import KEY_SHIFT, BlendStream, blend_datasets, next_dataset
from megatron_transnormer.data.prepare import prepare

from .conftest import small_options, write_corpus
from .test_stream import all_samples, rows, take


def cfg(*items, **kw):
    return DataConfig(blend=list(items), shuffle_buffer=kw.pop("shuffle_buffer", 20), **kw)


@pytest.fixture(scope="module")
def second(tmp_path_factory, dataset):
    """Another dataset from other text, tokenized with the first one's tokenizer."""
    corpus = tmp_path_factory.mktemp("corpus_b")
    write_corpus(str(corpus), n_docs=6, chars=5000)
    out = tmp_path_factory.mktemp("ds_b")
    prepare(small_options(out, str(corpus), tokenizer="model",
                          tokenizer_model=os.path.join(dataset[0], "tokenizer.model"), shard_samples=16,
                          split_ratios=(4, 1, 1)))
    return str(out)


def split_rows(got):
    """(dataset, epoch, index, tokens) of (epoch+d<<32, index, tokens) rows."""
    return [(e >> KEY_SHIFT, e & ((1 << KEY_SHIFT) - 1), i, t) for e, i, t in got]


def blend_ranks(data, dp, mb, state, k, workers=0, seed=7):
    got, states = [], []
    for r in range(dp):
        s = BlendStream(cfg(*data, num_workers=workers), "train", dp_rank=r, dp_size=dp, micro_batch_size=mb,
                        seed=seed)
        if state:
            s.load_state_dict(json.loads(json.dumps(state)))
        batches, _ = take(s, k)
        got.append(split_rows(rows(batches)))
        states.append(s.state_dict())
    assert all(st == states[0] for st in states)  # any rank's state serves all
    return got, states[0]


def test_one_dataset_blend_is_its_stream(dataset):
    path, _ = dataset
    plain = TokenStream(DataConfig(path=path, shuffle_buffer=20), "train", dp_rank=1, dp_size=2,
                        micro_batch_size=3, seed=5)
    blend = BlendStream(cfg(f"2.5 {path}"), "train", dp_rank=1, dp_size=2, micro_batch_size=3, seed=5)
    assert rows(take(plain, 30)[0]) == rows(take(blend, 30)[0])  # same samples, same keys


def test_mix_follows_the_weights_and_each_dataset_reads_its_own_stream(dataset, second):
    path, _ = dataset
    data = (f"3 {path}", f"1 {second}")
    got, state = blend_ranks(data, dp=2, mb=4, state=None, k=25)
    # every rank takes the same dataset at each row; over the run prefix of n rows per rank,
    # each dataset's global count is within one row per rank of its weight's share
    assert [[d for d, *_ in g] for g in got][0] == [d for d, *_ in got[1]]
    picks = [d for d, *_ in got[0]]
    for n in range(1, len(picks) + 1):
        share = picks[:n].count(1) * 2
        assert abs(share - 0.25 * n * 2) <= 2
    assert state["counts"] == [2 * picks.count(0), 2 * picks.count(1)] and sum(state["counts"]) == 200
    # dataset d's rows on rank r are its own stream's (seed 7 + d) in order, key and tokens
    for r in range(2):
        for d, p in enumerate((path, second)):
            own = TokenStream(DataConfig(path=p, shuffle_buffer=20), "train", dp_rank=r, dp_size=2,
                              micro_batch_size=1, seed=7 + d)
            mine = [(e, i, t) for dd, e, i, t in got[r] if dd == d]
            assert rows(take(own, len(mine))[0]) == mine
    # samples are what their keys name, in each dataset
    samples = [all_samples(load_dataset_info(p), "train") for p in (path, second)]
    assert all(samples[d][i] == t for g in got for d, _, i, t in g)
    assert [d.weight for d in blend_datasets(cfg(*data))] == [0.75, 0.25]
    assert next_dataset([0, 0], [0.5, 0.5], 1) == 0 and next_dataset([1, 0], [0.5, 0.5], 1) == 1


def test_exact_resume_and_a_new_data_parallel_size(dataset, second):
    path, _ = dataset
    data = (f"0.6 {path}", f"0.4 {second}")
    whole, _ = blend_ranks(data, dp=2, mb=3, state=None, k=40)
    first, state = blend_ranks(data, dp=2, mb=3, state=None, k=15)
    rest, _ = blend_ranks(data, dp=2, mb=3, state=state, k=25)
    assert [a + b for a, b in zip(first, rest)] == whole  # bit-exact continuation
    # -> 3 ranks with loader workers and micro-batch 2: the mix goes on from the global counts
    # and every dataset continues its epoch: nothing repeated or dropped
    later, after = blend_ranks(data, dp=3, mb=2, state=state, k=30, workers=2)
    assert all(later[0][j][0] == g[j][0] for g in later for j in range(60))
    picks = [d for d, *_ in later[0]]
    counts = list(state["counts"])
    for d in picks:
        assert d == next_dataset(counts, [0.6, 0.4], 3)
        counts[d] += 3
    assert after["counts"] == counts and abs(counts[1] - 0.4 * sum(counts)) <= 3
    seen = Counter((d, e, i) for g in first + later for d, e, i, _ in g)
    assert max(seen.values()) == 1  # both datasets are still in their first epoch
    assert {e for d, e, i in seen} == {0}


def test_bad_blends_are_refused_naming_the_entry(dataset, second, tmp_path):
    path, _ = dataset
    with pytest.raises(ConfigError, match=r"data.blend\[1\]: '0.3' is not 'WEIGHT PATH'"):
        validate_config(load_config("alm/tiny_cpu", ["data.path=", f"data.blend=0.7 {path},0.3"]))
    with pytest.raises(ConfigError, match=r"data.blend\[0\]: weight -1 of .* must be a positive number"):
        validate_config(load_config("alm/tiny_cpu", ["data.path=", f"data.blend=-1 {path}"]))
    with pytest.raises(ConfigError, match=r"data.path: .* and data.blend are both set"):
        validate_config(load_config("alm/tiny_cpu", [f"data.path={path}", f"data.blend=1 {path}"]))
    with pytest.raises(ConfigError, match=r"data.blend\[1\]: .* is already blended as data.blend\[0\]"):
        validate_config(load_config("alm/tiny_cpu", ["data.path=", f"data.blend=1 {path},2 {path}"]))
    with pytest.raises(DataError, match=r"data.blend\[1\]: no manifest at .*nowhere"):
        blend_datasets(cfg(f"1 {path}", f"1 {tmp_path}/nowhere"))
    write_corpus(str(tmp_path / "c"), n_docs=6, chars=3000)
    other = tmp_path / "other_len"
    prepare(small_options(other, str(tmp_path / "c"), seq_len=16, tokenizer="model",
                          tokenizer_model=os.path.join(path, "tokenizer.model"), split_ratios=(4, 1, 1)))
    with pytest.raises(DataError, match=r"data.blend\[1\]: .* has seq_len 16, but data.blend\[0\] .* has 32"):
        blend_datasets(cfg(f"1 {path}", f"1 {other}"))
    own_tok = tmp_path / "own_tokenizer"
    prepare(small_options(own_tok, str(tmp_path / "c"), vocab_size=400, split_ratios=(4, 1, 1)))
    with pytest.raises(DataError, match=r"data.blend\[1\]: .* another tokenizer"):
        blend_datasets(cfg(f"1 {path}", f"1 {own_tok}"))
    # a saved mix resumes only with the same weights, and a single-dataset state not at all
    _, state = blend_ranks((f"1 {path}", f"1 {second}"), dp=1, mb=2, state=None, k=2)
    s = BlendStream(cfg(f"1 {path}", f"3 {second}"), "train", micro_batch_size=2, seed=7)
    with pytest.raises(DataError, match=r"weights \[0.5, 0.5\], this run blends 2 with \[0.25, 0.75\]"):
        s.load_state_dict(state)
    plain = TokenStream(DataConfig(path=path), "train", micro_batch_size=2, seed=7).state_dict()
    with pytest.raises(DataError, match=r"saved from a single dataset \(data.path\)"):
        s.load_state_dict(plain)
    swapped = BlendStream(cfg(f"1 {second}", f"1 {path}"), "train", micro_batch_size=2, seed=7)
    with pytest.raises(DataError, match=r"data.blend\[0\] .*saved for other shards"):
        swapped.load_state_dict(state)
