"""The loader: splits across ranks and workers, shuffling, exact resume, sample keys.

Ranks are simulated in one process: a TokenStream needs only (dp_rank, dp_size) and
does no collective, so rank r of n here is the same object a real rank would build.
Rows are compared as (epoch, index, token ids), so every check of the order is also
one of the keys; `check` ties each key to the sample it names, read from the shards.
"""
import json
from collections import Counter
from itertools import islice

import numpy as np
import pytest
import torch

from megatron_transnormer.config.schema import DataConfig
from megatron_transnormer.data import DataError, TokenBatch, TokenStream, load_dataset_info
from megatron_transnormer.data.order import reader_range, range_parts, shard_order
from megatron_transnormer.data.shards import read_samples


def cfg(path, **kw):
    return DataConfig(path=path, shuffle_buffer=kw.pop("shuffle_buffer", 50), **kw)


def rows(batches):
    """(epoch, index, token ids) of every row."""
    return [(*k, tuple(t)) for b in batches for k, t in zip(b.keys.tolist(), b.tokens.tolist())]


def keys(got):
    return Counter((e, i) for e, i, _ in got)


def one_epoch(e, total):
    return Counter((e, i) for i in range(total))


def check(got, samples):
    """Each row holds the sample its key names, whatever layout, workers or resume read it."""
    assert all(t == samples[i] for _, i, t in got)


def take(stream, n, it=None):
    it = it or iter(stream)
    return [next(it) for _ in range(n)], it


def all_samples(info, split):
    """The split's samples in manifest order (index i is sample i), read from the shards."""
    return [tuple(x.tolist()) for url, s in zip(info.shard_urls(split), info.split(split)["shards"])
            for x in read_samples(url, s["sha256"], info.sample_len, info.dtype, s["samples"])]


def test_rank_and_worker_splits_disjoint_and_complete(dataset):
    path, _ = dataset
    info = load_dataset_info(path)
    order = TokenStream(cfg(path), "train")._order
    for epoch in (0, 1):  # 2 ranks x 2 workers: contiguous shares, each reading about 1/4 of the shards
        ranges = [reader_range(order.total, 4, j) for j in range(4)]
        assert [a for a, _ in ranges] == [0] + list(np.cumsum([n for _, n in ranges])[:-1])
        assert sum(n for _, n in ranges) == order.total
        seq = shard_order(len(order.shards), 3, epoch, True)
        used = [len(range_parts(list(order.shards), seq, a, n)) for a, n in ranges]
        assert max(used) <= len(order.shards) // 4 + 2
    # Two epochs of every reader, read through the real streams: each sample once per epoch,
    # keyed with that epoch.
    every = all_samples(info, "train")
    got = []
    for rank in range(2):
        plan = TokenStream(cfg(path), "train", dp_rank=rank, dp_size=2, num_workers=2, seed=3)._plan
        for role in range(2):
            j = rank * 2 + role
            got += [(e, i, tuple(x.tolist()))
                    for e, i, x in islice(plan.reader_samples(4, j, 0), 2 * reader_range(order.total, 4, j)[1])]
    check(got, every)
    assert keys(got) == one_epoch(0, order.total) + one_epoch(1, order.total)
    # Finite mode with 2 ranks x 2 workers: disjoint, and all but the dropped tail, in epoch 0.
    got, every_valid = [], all_samples(info, "valid")
    for rank in range(2):
        s = TokenStream(cfg(path, num_workers=2), "valid", dp_rank=rank, dp_size=2, micro_batch_size=4,
                        shuffle=False, infinite=False)
        batches = list(s)
        assert len(batches) == s.num_batches() == len(every_valid) // 8
        assert all(type(b) is TokenBatch for b in batches)  # the DataLoader passes it through its workers
        got += rows(batches)
    check(got, every_valid)
    assert keys(got) == one_epoch(0, len(every_valid) // 8 * 8)


def test_shuffle_is_seeded_and_changes_every_epoch(dataset):
    path, manifest = dataset
    n = manifest["splits"]["train"]["samples"]
    s1 = TokenStream(cfg(path), "train", micro_batch_size=n, seed=5)
    (e0, e1), _ = take(s1, 2)
    (again, _), _ = take(TokenStream(cfg(path), "train", micro_batch_size=n, seed=5), 2)
    (other, _), _ = take(TokenStream(cfg(path), "train", micro_batch_size=n, seed=6), 2)
    assert rows([e0]) == rows([again]) and not torch.equal(e0.tokens, other.tokens)
    assert not torch.equal(e0.tokens, e1.tokens)
    check(rows([e0, e1, other]), all_samples(load_dataset_info(path), "train"))
    assert keys(rows([e0])) == keys(rows([other])) == one_epoch(0, n) and keys(rows([e1])) == one_epoch(1, n)
    assert e0.tokens.dtype == e0.keys.dtype == torch.int64
    assert e0.tokens.shape == (n, 33) and e0.keys.shape == (n, 2) and e0.keys.is_contiguous()


@pytest.mark.parametrize("workers,dp_size", [(2, 1), (0, 2)])
def test_exact_resume(dataset, workers, dp_size):
    path, _ = dataset
    every = all_samples(load_dataset_info(path), "train")
    for rank in range(dp_size):
        make = lambda: TokenStream(cfg(path, num_workers=workers), "train", dp_rank=rank, dp_size=dp_size,
                                   micro_batch_size=3, seed=11)
        # 270 batches x 3: past the end of a reader's epoch (380 samples), after the resume point
        # with 2 workers, before it with 2 ranks
        ref, _ = take(make(), 270)
        stream = make()
        first, it = take(stream, 130)
        state = json.loads(json.dumps(stream.state_dict()))
        del it  # the interrupted run's workers had prefetched further; that must not count
        resumed = make()
        resumed.load_state_dict(state)
        rest, _ = take(resumed, 140)
        assert rows(first + rest) == rows(ref)
        check(rows(ref), every)
        assert {e for e, _, _ in rows(ref)} >= {0, 1}


def _ranks(path, dp, workers, mb, state, k):
    """k batches on each of dp simulated ranks, after loading `state`; -> rows, common state."""
    got, states = [], []
    for r in range(dp):
        s = TokenStream(cfg(path, num_workers=workers), "train", dp_rank=r, dp_size=dp, micro_batch_size=mb, seed=7)
        if state:
            s.load_state_dict(json.loads(json.dumps(state)))
        batches, _ = take(s, k)
        got += rows(batches)
        states.append(s.state_dict())
    assert all(st == states[0] for st in states)  # any rank's state serves all
    return got, states[0]


def test_resume_with_other_layout_continues_the_epoch(dataset):
    path, _ = dataset
    every = all_samples(load_dataset_info(path), "train")
    total = len(every)
    # 2 ranks x 127 batches x 3 = 762: all of epoch 0 (760) and the first sample of epoch 1 of each reader
    first, state = _ranks(path, 2, 0, 3, None, 127)
    extra = keys(first) - one_epoch(0, total)
    assert sum(extra.values()) == 2 and {e for e, _ in extra} == {1} and not one_epoch(0, total) - keys(first)
    # -> 3 ranks x 2 workers, micro-batch 2, then -> 1 rank, micro-batch 1: the rest of epoch 1, once
    second, state = _ranks(path, 3, 2, 2, state, 50)
    rest = total - 2 - len(second)
    third, _ = _ranks(path, 1, 0, 1, state, rest + total)
    check(first + second + third, every)
    assert extra + keys(second) + keys(third[:rest]) == one_epoch(1, total)
    assert keys(third[rest:]) == one_epoch(2, total)  # whole, under the new layout
    s = TokenStream(cfg(path), "train", micro_batch_size=3, seed=8)
    with pytest.raises(DataError, match=r"cannot continue the same sample order with a different seed \(saved 7, now 8\)"):
        s.load_state_dict(state)


def test_exact_resume_after_a_layout_change(dataset):
    path, _ = dataset
    _, state = _ranks(path, 2, 0, 3, None, 100)
    _, later = _ranks(path, 3, 2, 2, state, 40)
    assert later["pending"]  # still inside the epoch handed over
    whole, _ = _ranks(path, 3, 2, 2, state, 80)
    resumed, _ = _ranks(path, 3, 2, 2, later, 40)
    per_rank = lambda got, k: [got[r * k * 2:(r + 1) * k * 2] for r in range(3)]
    assert [w[80:] for w in per_rank(whole, 80)] == per_rank(resumed, 40)


def test_validation_resumes_with_other_layout(dataset):
    path, _ = dataset
    # Validation continues its pass with another data-parallel size: nothing lost or repeated.
    info = load_dataset_info(path)
    full = all_samples(info, "valid")
    first = []
    for rank in range(2):
        v = TokenStream(cfg(path), "valid", dp_rank=rank, dp_size=2, micro_batch_size=2, infinite=False,
                        shuffle=False)
        got, _ = take(v, 5)
        first += rows(got)
    w = TokenStream(cfg(path, num_workers=2), "valid", micro_batch_size=4, infinite=False, shuffle=False)
    w.load_state_dict(v.state_dict())
    rest = rows(list(w))
    check(first + rest, full)
    assert keys(first + rest) == one_epoch(0, len(full) // 4 * 4)
    assert w.state_dict()["position"] == 0  # the pass ended; the next one starts over


def test_shards_from_urls_pipes_and_globs(dataset, tmp_path):
    path, _ = dataset
    want = rows(TokenStream(cfg(path), "valid", micro_batch_size=5, infinite=False))  # shuffled, finite
    check(want, all_samples(load_dataset_info(path), "valid"))
    assert {e for e, _, _ in want} == {0}
    for location in (f"pipe:cat {path}/{{name}}", f"{path}/valid-*.tar", f"file:{path}"):
        got = TokenStream(cfg(path, shards=location), "valid", micro_batch_size=5, infinite=False)
        assert rows(got) == want, location
    with pytest.raises(DataError, match=r"data.shards: .*matches no file named valid-00000.tar"):
        TokenStream(cfg(path, shards=f"{tmp_path}/*.tar"), "valid")
    bad = TokenStream(cfg(path, shards=f"pipe:cat {tmp_path}/{{name}}"), "valid", micro_batch_size=5, infinite=False)
    with pytest.raises(DataError, match=r"pipe:cat .*valid-0000\d.tar: .*exit 1"):
        list(bad)


def _rank_batches(rank, world_size, path, state, k):
    s = TokenStream(cfg(path, num_workers=2), "train", dp_rank=rank, dp_size=world_size, micro_batch_size=3, seed=7)
    if state:
        s.load_state_dict(state)
    batches, _ = take(s, k)
    return rows(batches), s.state_dict()


def test_real_ranks_match_simulated_ones(dataset):
    from tests.multiproc import run_ranks
    path, _ = dataset
    _, state = _ranks(path, 2, 0, 3, None, 30)  # saved by a 2-rank run without workers
    real = run_ranks(_rank_batches, 2, path, state, 20)
    simulated, _ = _ranks(path, 2, 2, 3, state, 20)
    assert [r for got, _ in real for r in got] == simulated
    assert real[0][1] == real[1][1]
