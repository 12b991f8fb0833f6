"""Official LRA files -> shards + labels + manifest (the library behind tools/prepare_lra.py).

Nothing is downloaded: the user points at local copies of the files. A task module names
the file (and line) of anything missing or malformed; the dataset is written into a
staging folder and replaces what the output folder held only once it is complete. The
same files and options always give the same bytes.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from megatron_transnormer.data.manifest import DataError
from megatron_transnormer.data.lra import image, listops, listops_generator, pathfinder, retrieval, text
from megatron_transnormer.data.lra.info import TASKS
from megatron_transnormer.data.lra.writer import DEFAULT_SHARD_SAMPLES, write_lra_manifest
from megatron_transnormer.data.prepare import publish, staged

MODULES = {"listops": listops, "text": text, "retrieval": retrieval, "image": image,
           "pathfinder": pathfinder, "pathx": pathfinder}


@dataclass
class LRAOptions:
    task: str
    output: str
    input: str = ""
    max_length: int = 0  # 0: the task's LRA length
    shard_samples: int = DEFAULT_SHARD_SAMPLES
    seed: int = 1  # the order Text reviews are written in; the ListOps generator's seed
    min_freq: int | None = None  # character vocabularies; None: the task's (Text 15, Retrieval 1)
    grayscale: str = "lra"  # image: lra | pil
    generate: int = 0  # listops: generate this many training samples instead of reading --input
    gen_max_depth: int = listops_generator.MAX_DEPTH
    gen_max_args: int = listops_generator.MAX_ARGS
    gen_min_length: int = listops_generator.MIN_LENGTH
    gen_max_length: int = listops_generator.MAX_LENGTH
    workers: int = 1  # pathfinder / pathx: image decoding processes
    progress: bool = True


def prepare_lra(o: LRAOptions) -> dict:
    if o.task not in TASKS:
        raise DataError(f"--task {o.task!r} is not one of {', '.join(TASKS)}")
    if not o.output:
        raise DataError("--output DIR is required")
    if o.max_length < 0 or (0 < o.max_length < 2):
        raise DataError(f"--max-length {o.max_length}: must be at least 2 (room for <eos>)")
    if o.generate and o.task != "listops":
        raise DataError(f"--generate is for --task listops, not {o.task}")
    if o.generate and o.input:
        raise DataError("--generate writes its own files; leave out --input")
    if o.workers < 1:
        raise DataError(f"--workers {o.workers}: must be >= 1")
    if o.generate < 0:
        raise DataError(f"--generate {o.generate}: must be positive")
    if not o.generate and not o.input:
        raise DataError(f"--task {o.task} needs --input DIR (the folder holding the official files)"
                        + (" or --generate N" if o.task == "listops" else ""))
    os.makedirs(o.output, exist_ok=True)
    input_dir = o.input
    extra = {}
    if o.generate:
        # The generated files are kept beside the dataset: the TSV path reads them as it reads LRA's.
        input_dir = os.path.join(o.output, "generated")
        try:
            listops_generator.write_generated(
                input_dir, o.generate, o.seed, max_depth=o.gen_max_depth, max_args=o.gen_max_args,
                min_length=o.gen_min_length, max_length=o.gen_max_length)
        except ValueError as e:
            raise DataError(str(e)) from None
        extra["generated"] = {"train_samples": o.generate, "seed": o.seed, "max_depth": o.gen_max_depth,
                              "max_args": o.gen_max_args, "min_length": o.gen_min_length,
                              "max_length": o.gen_max_length, "files": "generated/basic_{train,val,test}.tsv"}
    # Written into a staging folder first: bad input fails there, leaving a dataset already in
    # the output folder untouched; only a complete dataset replaces it.
    staging = staged(o.output)
    try:
        parts = MODULES[o.task].prepare(input_dir, staging, o)
        parts["classification"].update(extra)
        manifest = write_lra_manifest(staging, **parts)
        publish(staging, o.output)  # the old dataset's shards and labels out, the manifest last
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest
