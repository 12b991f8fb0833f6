"""Prepare a Long-Range Arena task from its official files: token shards, a label array
beside each shard, and manifest.json. Nothing is downloaded; --input names local copies.

Examples:
  python tools/prepare_lra.py --task listops --input lra_release/listops-1000 --output data/lra-listops
  python tools/prepare_lra.py --task listops --generate 96000 --seed 1 --output data/lra-listops-gen
  python tools/prepare_lra.py --task text --input aclImdb --output data/lra-text
  python tools/prepare_lra.py --task retrieval --input lra_release/tsv_data --output data/lra-retrieval
  python tools/prepare_lra.py --task image --input cifar-10-batches-bin --output data/lra-image
  python tools/prepare_lra.py --task pathfinder --input lra_release/pathfinder32 --output data/lra-pathfinder
  python tools/prepare_lra.py --task pathx --input lra_release/pathfinder128 --output data/lra-pathx

What each task reads (--input may be the folder named here or one above it):
  listops     listops-1000/basic_{train,val,test}.tsv          train / valid / test
  text        aclImdb/{train,test}/{neg,pos}/*.txt             train / test (valid = test)
  retrieval   tsv_data/new_aan_pairs.{train,eval,test}.tsv     train / valid / test
  image       cifar-10-batches-bin/{data_batch_1..5,test_batch}.bin  train 90% / valid 10% / test
  pathfinder  pathfinder32/curv_contour_length_14/{imgs,metadata}   80 / 10 / 10 %
  pathx       pathfinder128/curv_contour_length_14/{imgs,metadata}  80 / 10 / 10 %
"""
from __future__ import annotations

import argparse
import sys
import time

from megatron_transnormer.data.lra.image import GRAYSCALE
from megatron_transnormer.data.lra.info import TASKS
from megatron_transnormer.data.lra.listops_generator import MAX_ARGS, MAX_DEPTH, MAX_LENGTH, MIN_LENGTH
from megatron_transnormer.data.lra.prepare import LRAOptions, prepare_lra
from megatron_transnormer.data.lra.writer import DEFAULT_SHARD_SAMPLES
from megatron_transnormer.data.manifest import DataError

PROG = "prepare_lra.py"


def parse_args(argv=None) -> LRAOptions:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=TASKS, help="the LRA task to prepare")
    p.add_argument("--input", default="", metavar="DIR", help="folder holding the task's official files")
    p.add_argument("--output", required=True, metavar="DIR",
                   help="dataset folder to write (shards, .label files, manifest.json); the files of a previous "
                        "dataset there are replaced")
    p.add_argument("--max-length", type=int, default=0,
                   help="ids per sequence, <eos> included (default: the task's LRA length: listops 2048, text "
                        "4096, retrieval 4000 per document; image 1024, pathfinder 1024 and pathx 16384 are fixed)")
    p.add_argument("--shard-samples", type=int, default=DEFAULT_SHARD_SAMPLES,
                   help="samples per shard (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1,
                   help="seed of the order text reviews are written in, and of --generate (default: %(default)s); "
                        "the image / pathfinder splits use LRA's fixed seed 42")
    p.add_argument("--min-freq", type=int, default=None,
                   help="text / retrieval: keep characters seen this often in train (default: text 15, "
                        "retrieval 1)")
    p.add_argument("--grayscale", choices=sorted(GRAYSCALE), default="lra",
                   help="image: " + "; ".join(f"{k}: {v}" for k, v in GRAYSCALE.items()) + " (default: %(default)s)")
    g = p.add_argument_group("ListOps generator (--task listops --generate N, no --input)")
    g.add_argument("--generate", type=int, default=0, metavar="N",
                   help="generate N training samples and ceil(N/48) validation and test samples (LRA: 96000 "
                        "gives 96000/2000/2000), written as LRA's TSV files under OUTPUT/generated, then prepared")
    g.add_argument("--gen-max-depth", type=int, default=MAX_DEPTH, help="default: %(default)s")
    g.add_argument("--gen-max-args", type=int, default=MAX_ARGS, help="default: %(default)s")
    g.add_argument("--gen-min-length", type=int, default=MIN_LENGTH,
                   help="keep expressions longer than this many symbols (default: %(default)s)")
    g.add_argument("--gen-max-length", type=int, default=MAX_LENGTH,
                   help="keep expressions shorter than this many symbols (default: %(default)s)")
    p.add_argument("--workers", type=int, default=1,
                   help="pathfinder / pathx: processes decoding images; the output is the same for any number "
                        "(default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    return LRAOptions(task=a.task, input=a.input, output=a.output, max_length=a.max_length,
                      shard_samples=a.shard_samples, seed=a.seed, min_freq=a.min_freq, grayscale=a.grayscale,
                      generate=a.generate, gen_max_depth=a.gen_max_depth, gen_max_args=a.gen_max_args,
                      gen_min_length=a.gen_min_length, gen_max_length=a.gen_max_length, workers=a.workers,
                      progress=not a.quiet)


def main(argv=None) -> int:
    opts = parse_args(argv)
    start = time.time()
    try:
        m = prepare_lra(opts)
    except DataError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    c = m["classification"]
    for name, s in m["splits"].items():
        alias = f" (= {s['same_as']})" if "same_as" in s else ""
        print(f"{name:>5}{alias}: {len(s['shards'])} shards, {s['samples']} samples, classes {s['class_counts']}, "
              f"{s['truncated']} cut to fit")
    print(f"{c['task']}: {c['num_classes']} classes, vocab {m['vocab_size']}, max_length {c['max_length']} x "
          f"{c['inputs']}; wrote {opts.output}/manifest.json in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
