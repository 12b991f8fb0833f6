"""Checkpoints that are complete or absent: `<root>/step_00000100/`, and `<root>/latest`.

Layout of one checkpoint directory:
  * DeepSpeed's files (model, optimizer, LR scheduler, step counters; per TP/PP/DP shard),
    written by `engine.save_checkpoint`, with the loop's `client_state` inside;
  * `rank_00003.pt` per global rank: RNG states and the loop's per-rank state (e.g. the
    data stream position), loaded with `weights_only=True`;
  * `meta.json` (rank 0): the step, the parallel layout, ZeRO stage, precision, the model
    settings that shape its tensors and the data mix (`data_blend`), so that `pretrain.py`
    can refuse to resume under another layout or mix before any process group exists
    (`layout_differences`, `blend_weights`); also the names
    of the caller's client_state entries (DeepSpeed returns its own with them);
  * `checksums.json`: the size and sha256 of every other file, so that a damaged
    checkpoint is found before anything of it is read.

Every rank writes into `step_00000100.tmp/`; after a barrier each rank hashes its share
of the files, then rank 0 writes checksums.json, renames the directory to
`step_00000100/` (a directory without `.tmp` is therefore complete, checksums included),
points `latest` at it (temp file + os.replace) and only then prunes checkpoints older
than it. The root must be on a file system all ranks share.

Loading checks every file against checksums.json (each rank a share, the verdict
agreed by all ranks) and reads every file with torch's weights-only unpickler
(`deepspeed_loading`; a layout-free checkpoint's safetensors files with their own
reader): a checkpoint is data, never code. `latest_checkpoint` skips a damaged
checkpoint for the newest intact one.

`publish_directory` gives a directory written by one process (a layout-free export,
universal.py) the same guarantee: checksums, then a rename.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.distributed as dist

from . import rng
from .deepspeed_loading import CheckpointError, install, load_weights_only, refusal

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")
RUN_SUBDIR = "checkpoints"  # <train.run_dir>/checkpoints/step_NNNNNNNN
META_FILE = "meta.json"
LAYOUT_FREE = "layout-free"  # meta.json's "format" in a layout-free checkpoint (universal.py)
CHECKSUM_FILE = "checksums.json"
_SHARE_PREFIX = "checksums.rank_"  # one rank's share of the checksums, inside step_N.tmp only


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
    rename and the pointer update leaves the pointer one behind or absent, and a pointer
    at a directory that is gone is ignored). One whose files do not match its checksums is
    skipped, with a warning naming it, for the next newest. None if root holds no complete
    checkpoint; CheckpointError if it holds some but none is intact."""
    root = Path(root)
    candidates = _complete_checkpoints(root)[::-1]
    pointer = root / "latest"
    if pointer.is_file():
        name = pointer.read_text(errors="replace").strip()
        if _STEP_DIR.match(name) and (root / name).is_dir():
            candidates = [root / name] + [p for p in candidates if p.name != name]
    damaged = []
    for path in candidates:
        problem = _damage(path)
        if problem is None:
            return str(path)
        log.warning(f"skipping a damaged checkpoint: {problem}")
        damaged.append(problem)
    if damaged:
        raise CheckpointError(f"no intact checkpoint under {root}: " + "; ".join(damaged)
                              + "; start a new run with train.resume=none (and another train.run_dir)")
    return None


def resume_target(resume: str, root: str | os.PathLike) -> str | None:
    """The checkpoint `train.resume` names: auto -> the latest intact one under root
    (`latest_checkpoint`; None if there is none), none -> None, else the path itself
    (checked when it is loaded)."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(root)
    return str(resume)


# --- meta.json: what a checkpoint can only be resumed with.

# Model settings that shape the parameters (and so the optimizer state and its shards).
_SHAPE_KEYS = ("arch", "vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size", "layers", "mlp",
               "norm_position", "positions", "max_positions", "embedding_norm", "head", "num_classes", "norm",
               "input", "classifier", "local_heads")
# (meta.json key, the name shown) for every setting a resume must keep. DeepSpeed's ZeRO
# optimizers refuse another data-parallel size, and the per-rank files (RNG, data position)
# exist per global rank, so the data-parallel size counts as much as tensor and pipeline.
_RESUME_KEYS = (("world_size", "world size"), ("tensor", "parallel.tensor"),
                ("pipeline", "parallel.pipeline"), ("context", "parallel.context"),
                ("data_parallel", "data-parallel size"),
                ("zero_stage", "parallel.zero_stage"), ("precision", "train.precision"),
                *((f"model.{k}", f"model.{k}") for k in _SHAPE_KEYS))


def layout_record(cfg, world_size: int) -> dict:
    """meta.json's content apart from the step, for a (validated) config on world_size ranks."""
    p = cfg.parallel
    return {"world_size": world_size, "tensor": p.tensor, "pipeline": p.pipeline, "context": p.context,
            "data_parallel": world_size // (p.tensor * p.pipeline * p.context), "zero_stage": p.zero_stage,
            "precision": cfg.train.precision, "model": {k: getattr(cfg.model, k) for k in _SHAPE_KEYS},
            "data_blend": blend_weights(cfg)}


def blend_weights(cfg) -> list[float]:
    """The normalised weights of data.blend, [] for one dataset (data.path): the data stream's
    state resumes only with the same (data/blend.py)."""
    from megatron_transnormer.config.schema import blend_entries
    weights = [w for w, _ in blend_entries(cfg.data.blend)]
    return [w / sum(weights) for w in weights]


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


# --- checksums.json: {"files": {name: {"bytes": size, "sha256": hex digest}}} for every
# file of the checkpoint but itself (names relative to the checkpoint, "/"-separated).

# What a file's problem code means; `verify` agrees on the codes across ranks.
_MISSING, _SIZE, _SHA256, _UNLOADABLE = 1, 2, 3, 4
_WHAT = {_MISSING: "is missing or unreadable", _SIZE: "does not have the size checksums.json records",
         _SHA256: "does not match its sha256 in checksums.json: corrupt or replaced",
         _UNLOADABLE: "is refused by the weights-only loader"}


def _sha256(file: Path) -> str:
    with open(file, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(directory: Path) -> list[str]:
    """Every file under directory that checksums.json covers, sorted."""
    out = []
    for parent, _, names in os.walk(directory):
        for n in names:
            rel = Path(parent, n).relative_to(directory).as_posix()
            if rel != CHECKSUM_FILE and not rel.startswith(_SHARE_PREFIX):
                out.append(rel)
    return sorted(out)


def _hash_share(tmp: Path, rank: int, world_size: int) -> None:
    """Hash this rank's share of the files every rank has written; rank 0 merges the shares."""
    share = {n: {"bytes": (tmp / n).stat().st_size, "sha256": _sha256(tmp / n)}
             for n in _files(tmp)[rank::world_size]}
    (tmp / f"{_SHARE_PREFIX}{rank:05d}.json").write_text(json.dumps(share))


def _write_checksums(tmp: Path) -> None:
    files = {}
    for part in sorted(tmp.glob(f"{_SHARE_PREFIX}*.json")):
        files.update(json.loads(part.read_text()))
        part.unlink()
    for n in _files(tmp):  # a file some rank's listing missed (a lagging shared file system)
        if n not in files:
            files[n] = {"bytes": (tmp / n).stat().st_size, "sha256": _sha256(tmp / n)}
    (tmp / CHECKSUM_FILE).write_text(json.dumps({"files": dict(sorted(files.items()))}, indent=1) + "\n")


def _read_checksums(path: Path) -> dict[str, tuple[int, str]] | None:
    """{name: (bytes, sha256)} from checksums.json; None for a checkpoint saved before
    checkpoints carried one. CheckpointError naming the file if it is missing or malformed."""
    file = path / CHECKSUM_FILE
    if not file.is_file():
        try:
            meta = read_meta(path)
        except ValueError as e:
            raise CheckpointError(f"checkpoint {path} is damaged: {e}") from None
        if meta is not None and meta.get("checksums"):
            raise CheckpointError(f"checkpoint {path} is damaged: {CHECKSUM_FILE} is missing")
        return None
    try:
        files = json.loads(file.read_text())["files"]
        record = {}
        for name, entry in files.items():
            pure = PurePosixPath(name)
            if pure.is_absolute() or ".." in pure.parts or not name or name == CHECKSUM_FILE:
                raise ValueError(f"file name {name!r} is not inside the checkpoint")
            size, digest = entry["bytes"], entry["sha256"]
            if not isinstance(size, int) or not isinstance(digest, str):
                raise ValueError(f"entry {name!r} is not {{'bytes': int, 'sha256': str}}")
            record[name] = (size, digest)
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} is damaged: {file} is not the record save writes "
                              f"({type(e).__name__}: {e})") from None
    return record


def _file_problem(path: Path, name: str, size: int, digest: str, contents: bool = True) -> tuple[int, str] | None:
    """(code, detail) of what is wrong with one recorded file, or None; contents False: its
    presence and size only."""
    file = path / name
    try:
        actual_size = file.stat().st_size
        if actual_size != size:
            return _SIZE, f"{actual_size} bytes, {size} recorded"
        if not contents:
            return None
        actual = _sha256(file)
    except FileNotFoundError:
        return _MISSING, ""
    except OSError as e:
        return _MISSING, f"{type(e).__name__}: {e.strerror or e}"
    if actual != digest:
        return _SHA256, f"sha256 {actual[:12]}..., recorded {digest[:12]}..."
    return None


def _describe(path: Path, problems: list[tuple[str, str]]) -> str:
    """One line naming the first (name, what) problem and how many more there are."""
    (name, what), more = problems[0], problems[1:]
    text = f"checkpoint {path}: {name} {what}"
    if more:
        text += f"; and {len(more)} more: " + ", ".join(n for n, _ in more[:3]) + (", ..." if len(more) > 3 else "")
    return text


def _unrecorded(path: Path, record: dict) -> list[str]:
    return [n for n in _files(path) if n not in record]


def _damage(path: Path, contents: bool = True) -> str | None:
    """What is wrong with a checkpoint's files, checked against checksums.json in this
    process (no loading; contents False: no hashing either); None if nothing is, or if it
    predates checksums."""
    try:
        record = _read_checksums(path)
    except CheckpointError as e:
        return str(e)
    if record is None:
        return None
    problems = []
    for name, (size, digest) in sorted(record.items()):
        if (found := _file_problem(path, name, size, digest, contents)) is not None:
            code, detail = found
            problems.append((name, _WHAT[code] + (f" ({detail})" if detail else "")))
    problems += [(n, f"is not recorded in {CHECKSUM_FILE}") for n in _unrecorded(path, record)]
    return _describe(path, problems) if problems else None


def incomplete(path: str | os.PathLike) -> str | None:
    """What makes a checkpoint incomplete, from file sizes alone (no hashing, no loading):
    a recorded file missing or of another size, an unrecorded one, or checksums.json
    missing or malformed; None if nothing (or if it predates checksums). A quick check
    before starting the processes that load it; `verify` checks the contents."""
    return _damage(Path(path), contents=False)


def _is_zip(file: Path) -> bool:
    with open(file, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _safetensors_refusal(file: Path) -> str | None:
    """Why a .safetensors file cannot be read (its header is parsed; nothing is unpickled)."""
    from safetensors import safe_open
    try:
        with safe_open(str(file), framework="pt") as f:
            f.keys()
    except Exception as e:  # SafetensorError, OSError, ...
        return f"not a safetensors file: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
    return None


def _refused(file: Path) -> str | None:
    """Why a checkpoint file would be refused when read, or None. JSON and YAML files are read
    as text by json / yaml.safe_load, safetensors files by their header-checked reader, every
    other file (DeepSpeed's, the per-rank files) by the weights-only unpickler."""
    if file.suffix in (".json", ".yaml"):
        return None
    if file.suffix == ".safetensors":
        return _safetensors_refusal(file)
    return refusal(file, mmap=_is_zip(file))  # mapped: parse only


def verify(path: Path, layout=None) -> None:
    """Collective (when layout spans several ranks): every recorded file present, of its
    size and sha256, and accepted by the reader its kind is read with (`_refused`); each
    rank checks a share (so each file is read once), and all ranks raise the same
    CheckpointError, before any of them reads the checkpoint. layout None: this process
    alone checks every file."""
    path = Path(path)
    if layout is None:
        from types import SimpleNamespace
        layout = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"))

    def refused(name: str) -> str | None:
        return _refused(path / name)

    record = _read_checksums(path)  # the same verdict on every rank: no collective needed yet
    if record is None:
        log.warning(f"checkpoint {path} records no checksums (saved before checkpoints carried "
                    f"{CHECKSUM_FILE}): its files are not verified before loading")
        # Still refused here by every rank alike (each checks all files) rather than by
        # one rank inside DeepSpeed's load, where the others would wait for it.
        problems = [(n, f"{_WHAT[_UNLOADABLE]} ({why})") for n in _files(path) if (why := refused(n))]
        if problems:
            raise CheckpointError(_describe(path, problems))
        return
    names = sorted(record)
    codes, details = [0] * (len(names) + 1), {}
    for i in range(layout.rank, len(names), layout.world_size):
        found = _file_problem(path, names[i], *record[names[i]])
        if found is None and (why := refused(names[i])) is not None:
            found = _UNLOADABLE, why
        if found is not None:
            codes[i], details[i] = found
    unrecorded = _unrecorded(path, record)
    codes[-1] = len(unrecorded)
    if layout.world_size > 1 and dist.is_initialized():
        agreed = torch.tensor(codes, dtype=torch.int64, device=layout.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        codes = agreed.tolist()
    problems = []
    for i, code in enumerate(codes[:-1]):
        if code:
            detail = details.get(i, f"found by rank {i % layout.world_size}")
            problems.append((names[i], _WHAT[code] + (f" ({detail})" if detail else "")))
    if codes[-1]:
        problems += [(n, f"is not recorded in {CHECKSUM_FILE}") for n in unrecorded] or [
            ("a file", f"is not recorded in {CHECKSUM_FILE} (found by another rank)")]
    if problems:
        raise CheckpointError(_describe(path, problems))


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
            "context": layout.cp_size, "data": layout.dp_size}


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
        # client_keys: DeepSpeed hands its own entries back with the caller's on load.
        (tmp / META_FILE).write_text(json.dumps({"step": step, **meta, "checksums": CHECKSUM_FILE,
                                                 "client_keys": sorted(client_state)}, indent=1) + "\n")
    dist.barrier()  # every rank's files are written
    _hash_share(tmp, layout.rank, layout.world_size)
    dist.barrier()  # every share is hashed
    if layout.rank == 0:
        _write_checksums(tmp)
        _publish(root, tmp, final)
        _prune(root, keep, final)
    dist.barrier()  # nobody returns (and, say, exits) before the checkpoint is published
    return str(final)


def _rename_into_place(tmp: Path, final: Path) -> Path | None:
    """Rename tmp to final; an existing final is moved aside first and its path returned
    (the caller deletes it once nothing refers to it any more)."""
    old = None
    if final.exists():  # the same step saved again (a resumed run): replace it
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    return old


def _publish(root: Path, tmp: Path, final: Path) -> None:
    old = _rename_into_place(tmp, final)
    pointer_tmp = root / "latest.tmp"
    pointer_tmp.write_text(final.name + "\n")
    os.replace(pointer_tmp, root / "latest")
    if old is not None:
        shutil.rmtree(old)


def publish_directory(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """One process's checkpoint-like directory, complete or absent: checksums.json over the
    files in `tmp` (written by this process alone), then tmp renamed to `final` (replacing
    an existing one). For directories outside a run's step_N series (layout-free exports)."""
    tmp, final = Path(tmp), Path(final)
    _write_checksums(tmp)
    old = _rename_into_place(tmp, final)
    if old is not None:
        shutil.rmtree(old)


def _prune(root: Path, keep: int, published: Path) -> None:
    """Keep `published` and the keep - 1 newest checkpoints older than it. Only this
    module's own checkpoints go: `step_NNNNNNNN` directories (not links) holding a file
    `save` writes, older than the one `latest` now names; newer ones (left by a run that
    went further before this one resumed from an earlier checkpoint) and anything else in
    the root stay."""
    if keep <= 0:
        return
    step = int(_STEP_DIR.match(published.name).group(1))
    older = [p for p in _complete_checkpoints(root)
             if int(_STEP_DIR.match(p.name).group(1)) < step and not p.is_symlink()
             and any((p / f).is_file() for f in (CHECKSUM_FILE, META_FILE, _rank_file(p, 0).name))]
    for path in older[:max(0, len(older) - (keep - 1))]:
        shutil.rmtree(path)


def load(engine, layout, path: str | os.PathLike) -> tuple[dict, dict]:
    """Collective. Restores the engine and this rank's RNG states; returns (client_state,
    rank_state). A damaged or unsafe checkpoint raises CheckpointError, naming the file,
    on every rank before anything of it is loaded."""

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a complete checkpoint: there is no such directory")
    verify(path, layout)

    def read(rank: int) -> dict:
        file = _rank_file(path, rank)
        if not file.is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint: {file.name} is missing")
        return _from_safe(load_weights_only(file, map_location="cpu"))

    # Every rank checks rank 0's record first, so that a layout mismatch fails on all ranks
    # alike instead of leaving some waiting in DeepSpeed's collectives.
    written = {"context": 1, **read(0)["layout"]}  # written before context parallelism: 1
    if written != _layout_key(layout):
        raise ValueError(f"checkpoint {path} was written with layout {written}, this run has "
                         f"{_layout_key(layout)}; resume with the same parallel layout")
    per_rank = read(layout.rank)
    reader = install(engine)
    reader.last_loaded = None
    try:
        load_path, client_state = engine.load_checkpoint(str(path.parent), tag=path.name,
                                                         load_optimizer_states=True,
                                                         load_lr_scheduler_states=True)
    except CheckpointError:
        raise
    except Exception as e:  # DeepSpeed's asserts and KeyErrors say nothing of the file
        after = f" (the last file it read: {Path(reader.last_loaded).name})" if reader.last_loaded else ""
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"checkpoint {path}: DeepSpeed could not restore it{after}: "
                              f"{type(e).__name__}: {message}") from e
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint in {path}")
    keys = (read_meta(path) or {}).get("client_keys")
    if isinstance(keys, list):  # what save was given, without DeepSpeed's own entries
        client_state = {k: v for k, v in client_state.items() if k in keys}
    rng.restore(per_rank["rng"])
    return client_state, per_rank["rank_state"]
