"""Converting a checkpoint of any layout into a layout-free one (universal.py).

    conv = prepare_conversion(path)          one process, before any process group: what can be
                                             checked from files (completeness, layout, config)
    convert(conv, out, model_only)           collective, on the conv.world_size ranks of the
                                             layout that saved the checkpoint
    convert_here(conv, out, model_only)      starts those ranks on this machine's CPUs (gloo)

The checkpoint is loaded by the layout that wrote it, through the same verified,
weights-only path as a resume (checkpoint.load), and exported from the live engine:
DeepSpeed gathers its own ZeRO partitions, so every stage and precision it can resume is
convertible. Converting on CPUs needs the memory of the model and its Adam state once
over all ranks together, as training did.
"""
from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from megatron_transnormer.config import Config, ConfigError, config_from_dict, validate_config

from . import checkpoint, universal
from .deepspeed_loading import CheckpointError, load_weights_only


@dataclass
class Conversion:
    path: Path
    meta: dict  # its meta.json
    cfg: Config  # the run's config, validated for the world size it was saved with
    world_size: int


def _saved_config(path: Path) -> dict:
    """The config the run stored in DeepSpeed's client state (checkpoint.save adds it), from
    the first model-parallel rank's model file (named zero_pp_rank_0_mp_rank_00_... under
    ZeRO 3), read with the weights-only unpickler."""
    files = sorted(path.glob("*mp_rank_00_model_states.pt"))
    if not files:
        raise CheckpointError(f"checkpoint {path}: no DeepSpeed model file (mp_rank_00_model_states.pt); "
                              f"not a checkpoint of pretrain.py")
    saved = load_weights_only(files[0], map_location="cpu")
    config = saved.get("config") if isinstance(saved, dict) else None
    if not isinstance(config, dict):
        raise CheckpointError(f"{files[0]}: holds no run config (client state 'config'); not a checkpoint of "
                              f"pretrain.py")
    return config


def prepare_conversion(path) -> Conversion:
    """Check everything about `path` that needs no process group; CheckpointError naming
    the file or key otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if universal.is_layout_free(path):
        raise CheckpointError(f"{path} is already a layout-free checkpoint")
    try:
        meta = checkpoint.read_meta(path)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from None
    if meta is None:
        raise CheckpointError(f"checkpoint {path}: no {checkpoint.META_FILE}, so the layout that saved it is unknown")
    if (problem := checkpoint.incomplete(path)) is not None:
        raise CheckpointError(problem)
    world_size = meta.get("world_size")
    if not isinstance(world_size, int) or world_size < 1:
        raise CheckpointError(f"{path / checkpoint.META_FILE}: world_size is {world_size!r}")
    for rank in range(world_size):  # checkpoint.load needs every rank's file
        if not (file := path / f"rank_{rank:05d}.pt").is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {file.name} is missing")
    try:
        cfg = validate_config(config_from_dict(_saved_config(path)), world_size=world_size)
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {path}: its config is not valid here: {e}") from None
    from .cli import layout_mismatch
    if what := layout_mismatch(meta, cfg, world_size):  # meta.json and the stored config disagree
        raise CheckpointError(f"checkpoint {path}: {checkpoint.META_FILE} and the config it holds disagree ({what})")
    return Conversion(path=path, meta=meta, cfg=cfg, world_size=world_size)


class _NoObjective:
    """A conversion runs no forward pass; the runtime holds this in place of the training
    objective (a masked LM's would need the dataset's special ids)."""

    name = "none"


def convert(conv: Conversion, out, model_only: bool = False) -> Path:
    """Collective, on conv.world_size ranks started by a launcher (or convert_here): load the
    checkpoint on its own layout and write it layout-free to `out`. The caller tears the
    process groups down (parallel.destroy_distributed)."""
    from megatron_transnormer.parallel import init_distributed

    from .runtime import build_runtime

    cfg, p = conv.cfg, conv.cfg.parallel
    layout = init_distributed(p.tensor, p.pipeline, timeout_s=cfg.train.collective_timeout_s, context=p.context)
    if layout.world_size != conv.world_size:
        raise CheckpointError(f"checkpoint {conv.path} was saved by {conv.world_size} ranks; converting it takes "
                              f"as many, this launch has {layout.world_size}")
    rt = build_runtime(cfg, layout, _NoObjective())
    client_state, rank_state = rt.load_checkpoint(conv.path)
    source = {k: v for k, v in conv.meta.items() if k not in ("step", "model", "checksums")}
    return universal.export(rt, out, client_state, rank_state, model_only=model_only, source=source)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, conv: Conversion, out: str, model_only: bool, port: int) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(conv.world_size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(conv.world_size), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                       # CPU processes: with GPUs visible init_distributed would pick NCCL, one
                       # device per rank, which a machine with fewer GPUs than ranks refuses.
                       "CUDA_VISIBLE_DEVICES": ""})
    from megatron_transnormer.parallel import destroy_distributed
    try:
        convert(conv, out, model_only)
    except Exception as e:
        agreed = isinstance(e, CheckpointError)  # checkpoint.load and export agree on these: one line is enough
        if rank == 0 or not agreed:
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"convert_checkpoint.py: rank {rank}: {text}", file=sys.stderr, flush=True)
        sys.exit(2 if isinstance(e, (CheckpointError, ConfigError)) else 1)
    finally:
        destroy_distributed()


def convert_here(conv: Conversion, out, model_only: bool = False) -> None:
    """Run `convert` on conv.world_size CPU processes of this machine, joined over gloo
    (bf16 checkpoints included: DeepSpeed runs bf16 on CPU). Raises CheckpointError (a
    damaged checkpoint: exit code 2 of a rank) or RuntimeError naming the first rank that
    failed; the ranks print their own line first."""
    import torch.multiprocessing as mp
    try:
        mp.start_processes(_rank_main, args=(conv, str(out), model_only, _free_port()), nprocs=conv.world_size,
                           join=True, start_method="spawn")
    except mp.ProcessExitedException as e:
        what = (f"the conversion of {conv.path} failed on rank {e.error_index} (exit code {e.exit_code}; "
                f"its line above says why)")
        raise (CheckpointError if e.exit_code == 2 else RuntimeError)(what) from None
