#!/usr/bin/env python
"""Data path throughput: loader tokens/s on one core, tokenization MB/s with 1 and 2 workers.

    python bench/data_throughput.py [--seq-len 512] [--batches 3000] [--micro-batch-size 8]

Prints a table and writes bench/out/data_throughput.json. The loader runs in this
process (num_workers=0) pinned to one CPU core, reading a Shakespeare dataset packed at
--seq-len, with sha256 verification and shuffling on (the training settings).
Tokenization times include starting the worker processes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_transnormer.config.schema import DataConfig  # noqa: E402
from megatron_transnormer.data import sources  # noqa: E402
from megatron_transnormer.data.inputs import pieces  # noqa: E402
from megatron_transnormer.data.prepare import PrepareOptions, encode_stream, prepare  # noqa: E402


def loader_rate(path: str, batches: int, mb: int, verify: bool, shuffle: bool) -> dict:
    # imported here: tokenizer worker processes re-import this script and need no torch
    from megatron_transnormer.data import TokenStream
    stream = TokenStream(DataConfig(path=path, verify=verify), "train", micro_batch_size=mb, seed=1,
                         shuffle=shuffle, infinite=True, num_workers=0)
    it = iter(stream)
    next(it)  # first shard open and window fill are part of the steady state only once
    start, cpu = time.perf_counter(), time.process_time()
    tokens = 0
    for _ in range(batches):
        tokens += next(it).tokens.numel()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    # per CPU second as well: on a shared machine wall-clock time includes other jobs' turns
    return {"tokens_per_s": tokens / elapsed, "tokens_per_cpu_s": tokens / cpu, "batches": batches,
            "seconds": elapsed, "cpu_seconds": cpu}


def _cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def tokenize_rate(docs: list[str], entry: dict, root: str, workers: int) -> dict:
    size = sum(len(d.encode("utf-8")) for d in docs)
    cpu, start = _cpu_seconds(), time.perf_counter()
    # the preparation's own path: pieces of each document, encoded in order by `workers` processes
    texts = ((None, piece) for doc in docs for piece in pieces(doc))
    tokens = sum(len(ids) for _, (ids, *_counts) in encode_stream(texts, entry, root, workers))
    elapsed, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    # CPU seconds (this process and its finished workers) tell the work apart from time
    # lost to other processes on a shared machine
    return {"mb_per_s": size / elapsed / 1e6, "megabytes": size / 1e6, "seconds": elapsed,
            "cpu_seconds": cpu, "mb_per_cpu_s": size / cpu / 1e6, "tokens": int(tokens),
            "mb_per_s_per_worker": size / elapsed / 1e6 / workers}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batches", type=int, default=3000)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--repeat-text", type=int, default=3, help="tokenize the Shakespeare train text this many times")
    p.add_argument("--output", default=os.path.join(ROOT, "bench", "out", "data_throughput.json"))
    a = p.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    import torch
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        manifest = prepare(PrepareOptions(output=tmp, seq_len=a.seq_len, shard_samples=64, progress=False))
        prepare_s = time.perf_counter() - start
        rows = []
        for verify, shuffle in ((True, True), (False, True), (True, False)):
            r = loader_rate(tmp, a.batches, a.micro_batch_size, verify, shuffle)
            r.update(verify=verify, shuffle=shuffle)
            rows.append(r)
        docs = sources.shakespeare()["train"] * a.repeat_text
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, range(os.cpu_count()))
        tok = [dict(workers=w, **tokenize_rate(docs, manifest["tokenizer"], tmp, w)) for w in (1, 2)]
    scaling = tok[1]["mb_per_s"] / tok[0]["mb_per_s"]  # 2.0 would be perfect; shared cores give less
    result = {"seq_len": a.seq_len, "micro_batch_size": a.micro_batch_size, "loader": rows, "tokenize": tok,
              "prepare_shakespeare_s": prepare_s, "vocab_size": manifest["vocab_size"],
              "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "target_tokens_per_s": 2e6, "load_average": os.getloadavg(), "tokenize_scaling_1_to_2": scaling}
    print(f"loader, 1 process on 1 core, seq_len {a.seq_len}, micro-batch {a.micro_batch_size}:")
    print(f"  {'verify':>6} {'shuffle':>7} {'Mtokens/s':>10} {'Mtokens/CPU s':>14} {'batches':>8}")
    for r in rows:
        print(f"  {str(r['verify']):>6} {str(r['shuffle']):>7} {r['tokens_per_s'] / 1e6:10.2f} "
              f"{r['tokens_per_cpu_s'] / 1e6:14.2f} {r['batches']:8d}")
    print(f"tokenization (sentencepiece BPE {manifest['vocab_size']}, {tok[0]['megabytes']:.1f} MB of text):")
    print(f"  {'workers':>7} {'MB/s':>8} {'MB/s/worker':>11} {'seconds':>8} {'CPU s':>7} {'MB/CPU s':>9}")
    for r in tok:
        print(f"  {r['workers']:7d} {r['mb_per_s']:8.2f} {r['mb_per_s_per_worker']:11.2f} {r['seconds']:8.2f} "
              f"{r['cpu_seconds']:7.2f} {r['mb_per_cpu_s']:9.2f}")
    print(f"  1 -> 2 workers: {scaling:.2f}x wall-clock")
    print(f"load average during the run: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    print(f"prepare shakespeare (seq_len {a.seq_len}, 1 worker): {prepare_s:.2f} s")
    os.makedirs(os.path.dirname(a.output), exist_ok=True)
    with open(a.output, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
