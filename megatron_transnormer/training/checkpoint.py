"""Checkpoints that are complete or absent: `<root>/step_00000100/`, and `<root>/latest`.

Layout of one checkpoint directory:
  * DeepSpeed's files (model, optimizer, LR scheduler, step counters; per TP/PP/DP shard),
    written by `engine.save_checkpoint`, with the loop's `client_state` inside;
  * `rank_00003.pt` per global rank: RNG states and the loop's per-rank state (e.g. the
    data stream position), loaded with `weights_only=True`;
  * `meta.json` (rank 0): the step, the parallel layout, ZeRO stage, precision and the model
    settings that shape its tensors, so that `pretrain.py` can refuse to resume under
    another layout before any process group exists (`layout_differences`).

Every rank writes into `step_00000100.tmp/`; after a barrier rank 0 renames it to
`step_00000100/` (a directory without `.tmp` is therefore complete), then points
`latest` at it (temp file + os.replace) and prunes old checkpoints. The root must be on a
file system all ranks share.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import rng

_STEP_DIR = re.compile(r"^step_(\d{8})$")
RUN_SUBDIR = "checkpoints"  # <train.run_dir>/checkpoints/step_NNNNNNNN
META_FILE = "meta.json"


def step_dirname(step: int) -> str:
    return f"step_{step:08d}"


def _complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories under root, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | os.PathLike) -> str | None:
    """The checkpoint `latest` names; else the newest complete one (a crash between the
    rename and the pointer update leaves the pointer one behind or absent); else None."""
    root = Path(root)
    pointer = root / "latest"
    if pointer.is_file():
        name = pointer.read_text().strip()
        if _STEP_DIR.match(name) and (root / name).is_dir():
            return str(root / name)
    complete = _complete_checkpoints(root)
    return str(complete[-1]) if complete else None


def resume_target(resume: str, root: str | os.PathLike) -> str | None:
    """The checkpoint `train.resume` names: auto -> the latest complete one under root
    (None if there is none), none -> None, else the path itself."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(root)
    return str(resume)


# --- meta.json: what a checkpoint can only be resumed with.

# Model settings that shape the parameters (and so the optimizer state and its shards).
_SHAPE_KEYS = ("arch", "vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size", "layers", "mlp",
               "norm_position", "positions", "max_positions", "embedding_norm", "head", "num_classes")
# (meta.json key, the name shown) for every setting a resume must keep. DeepSpeed's ZeRO
# optimizers refuse another data-parallel size, and the per-rank files (RNG, data position)
# exist per global rank, so the data-parallel size counts as much as tensor and pipeline.
_RESUME_KEYS = (("world_size", "world size"), ("tensor", "parallel.tensor"),
                ("pipeline", "parallel.pipeline"), ("data_parallel", "data-parallel size"),
                ("zero_stage", "parallel.zero_stage"), ("precision", "train.precision"),
                *((f"model.{k}", f"model.{k}") for k in _SHAPE_KEYS))


def layout_record(cfg, world_size: int) -> dict:
    """meta.json's content apart from the step, for a (validated) config on world_size ranks."""
    p = cfg.parallel
    return {"world_size": world_size, "tensor": p.tensor, "pipeline": p.pipeline,
            "data_parallel": world_size // (p.tensor * p.pipeline), "zero_stage": p.zero_stage,
            "precision": cfg.train.precision, "model": {k: getattr(cfg.model, k) for k in _SHAPE_KEYS}}


def read_meta(path: str | os.PathLike) -> dict | None:
    """A checkpoint's meta.json; None for a checkpoint written before there was one.
    Raises ValueError (naming the file) if it is not the JSON object `save` writes."""
    file = Path(path) / META_FILE
    if not file.is_file():
        return None
    try:
        meta = json.loads(file.read_text())
    except ValueError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{file} does not hold a JSON object")
    return meta


def _lookup(record: dict, dotted: str):
    for part in dotted.split("."):
        record = record.get(part) if isinstance(record, dict) else None
    return record


def layout_differences(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """(setting, checkpoint's value, this run's value) for each setting of `_RESUME_KEYS`
    that differs; a setting the checkpoint does not record is not compared."""
    out = []
    for key, name in _RESUME_KEYS:
        old, new = _lookup(saved, key), _lookup(current, key)
        if old is not None and old != new:
            out.append((name, old, new))
    return out


# --- per-rank file: only tensors and plain Python values, so weights_only=True can load it.

def _to_safe(obj):
    if isinstance(obj, np.ndarray):  # e.g. NumPy's RNG key
        return {"__ndarray__": torch.frombuffer(bytearray(obj.tobytes()), dtype=torch.uint8),
                "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: _to_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_safe(v) for v in obj)
    return obj


def _from_safe(obj):
    if isinstance(obj, dict):
        if "__ndarray__" in obj:
            raw = obj["__ndarray__"].numpy().tobytes()
            return np.frombuffer(raw, dtype=np.dtype(obj["dtype"])).reshape(obj["shape"]).copy()
        return {k: _from_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_from_safe(v) for v in obj)
    return obj


def _rank_file(directory: Path, rank: int) -> Path:
    return directory / f"rank_{rank:05d}.pt"


def _layout_key(layout) -> dict:
    return {"world_size": layout.world_size, "tensor": layout.tp_size, "pipeline": layout.pp_size,
            "data": layout.dp_size}


def save(engine, layout, root: str | os.PathLike, step: int, client_state: dict, rank_state: dict,
         keep: int, meta: dict) -> str:
    """Collective: every rank calls it. `meta` is `layout_record(...)`, written to meta.json
    with the step. Returns the final directory."""
    root = Path(root)
    final = root / step_dirname(step)
    tmp = root / (final.name + ".tmp")
    if layout.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by an attempt that died while saving
            shutil.rmtree(tmp)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tmp.name, client_state=client_state, save_latest=False)
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save(_to_safe({"layout": _layout_key(layout), "rng": rng.capture(), "rank_state": rank_state}),
               _rank_file(tmp, layout.rank))
    if layout.rank == 0:  # inside the .tmp directory: published by the same rename as the rest
        (tmp / META_FILE).write_text(json.dumps({"step": step, **meta}, indent=1) + "\n")
    dist.barrier()  # every rank's files are written
    if layout.rank == 0:
        _publish(root, tmp, final)
        _prune(root, keep)
    dist.barrier()  # nobody returns (and, say, exits) before the checkpoint is published
    return str(final)


def _publish(root: Path, tmp: Path, final: Path) -> None:
    old = None
    if final.exists():  # the same step saved again (a resumed run): replace it
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    pointer_tmp = root / "latest.tmp"
    pointer_tmp.write_text(final.name + "\n")
    os.replace(pointer_tmp, root / "latest")
    if old is not None:
        shutil.rmtree(old)


def _prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    for path in _complete_checkpoints(root)[:-keep]:
        shutil.rmtree(path)


def load(engine, layout, path: str | os.PathLike) -> tuple[dict, dict]:
    """Collective. Restores the engine and this rank's RNG states; returns (client_state, rank_state)."""
    path = Path(path)

    def read(rank: int) -> dict:
        file = _rank_file(path, rank)
        if not file.is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint: {file.name} is missing")
        return _from_safe(torch.load(file, map_location="cpu", weights_only=True))

    # Every rank checks rank 0's record first, so that a layout mismatch fails on all ranks
    # alike instead of leaving some waiting in DeepSpeed's collectives.
    written = read(0)["layout"]
    if written != _layout_key(layout):
        raise ValueError(f"checkpoint {path} was written with layout {written}, this run has "
                         f"{_layout_key(layout)}; resume with the same parallel layout")
    per_rank = read(layout.rank)
    load_path, client_state = engine.load_checkpoint(str(path.parent), tag=path.name,
                                                     load_optimizer_states=True,
                                                     load_lr_scheduler_states=True)
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint in {path}")
    rng.restore(per_rank["rng"])
    return client_state, per_rank["rank_state"]
