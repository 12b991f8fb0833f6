"""Process groups: torch.distributed from the launcher's environment, then megatron-core's groups.

megatron-core's `parallel_state` is the single source of truth for the tensor (TP),
context (CP), pipeline (PP) and data (DP) parallel groups; everything else asks it.

Rank order (megatron's default "tp-cp-ep-dp-pp"): TP varies fastest, then CP, then DP,
then PP:

    global_rank = tp_rank + tp_size * (cp_rank + cp_size * (dp_rank + dp_size * pp_rank))

This is the same order as DeepSpeed's `PipeModelDataParallelTopology` (axes pipe, data,
model) when its data axis is CP x DP (the ranks that average gradients), so a DeepSpeed
pipeline built with that topology gets identical groups.
With TP=2, PP=2, 8 ranks: TP groups [0,1] [2,3] [4,5] [6,7]; DP groups [0,2] [1,3]
[4,6] [5,7]; PP groups [0,4] [1,5] [2,6] [3,7].

Launchers understood, in this order:
  * torchrun / deepspeed / mpirun-style: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT;
  * SLURM srun: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the master is the first host of
    SLURM_JOB_NODELIST (ranges such as `node[1-3,5]` are expanded), the port is
    MASTER_PORT or derived from SLURM_JOB_ID so that concurrent jobs do not collide;
  * a plain `python` process: world size 1 on a free local port.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from .sequence import set_sequence_parallel


@dataclass(frozen=True)
class Layout:
    """Where this process sits in the TP x CP x DP x PP grid. dp_* is data parallelism alone
    (the data loader's sharding); context-parallel ranks share their samples."""

    rank: int
    world_size: int
    local_rank: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    device: torch.device
    cp_rank: int = 0
    cp_size: int = 1


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher told us: enough to call `init_process_group`."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: 'a[1,2],b' -> ['a[1,2]', 'b']."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return parts + [current]


def _expand_host(pattern: str) -> list[str]:
    m = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", pattern)
    if not m:
        return [pattern]
    prefix, ranges, rest = m.groups()
    values = []
    for item in ranges.split(","):
        lo, _, hi = item.partition("-")
        # Zero padding is kept ('08-10' -> 08 09 10), as slurm writes it.
        values += [f"{i:0{len(lo)}d}" for i in range(int(lo), int(hi or lo) + 1)]
    return [prefix + v + tail for v in values for tail in _expand_host(rest)]


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM host list: 'a[1-3,5],b07' -> ['a1', 'a2', 'a3', 'a5', 'b07']."""
    try:
        hosts = [h for part in _split_top_level(nodelist.strip()) if part for h in _expand_host(part)]
    except ValueError:
        raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r} is not a host list slurm would write") from None
    if not hosts:
        raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r} names no host")
    return hosts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _int_env(env, key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ValueError(f"environment variable {key}={env[key]!r} is not an integer") from None


def read_launch_env(env=None) -> LaunchEnv:
    """Parse the launcher's environment (see the module docstring); pure, for tests."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing and _int_env(env, "WORLD_SIZE") > 1:
            raise ValueError(f"RANK/WORLD_SIZE are set but {', '.join(missing)} is missing")
        return LaunchEnv(rank=_int_env(env, "RANK"), world_size=_int_env(env, "WORLD_SIZE"),
                         local_rank=_int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
                         master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                         master_port=_int_env(env, "MASTER_PORT") if "MASTER_PORT" in env else _free_port())
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        if "SLURM_JOB_NODELIST" not in env and "MASTER_ADDR" not in env:
            raise ValueError("SLURM_PROCID is set but neither SLURM_JOB_NODELIST nor MASTER_ADDR is")
        addr = env.get("MASTER_ADDR") or expand_nodelist(env["SLURM_JOB_NODELIST"])[0]
        if "MASTER_PORT" in env:
            port = _int_env(env, "MASTER_PORT")
        elif "SLURM_JOB_ID" in env:
            # Unprivileged range, stable for every task of the job, distinct across most jobs.
            port = 15000 + _int_env(env, "SLURM_JOB_ID") % 20000
        else:
            raise ValueError("under SLURM set MASTER_PORT (SLURM_JOB_ID is missing too)")
        return LaunchEnv(rank=_int_env(env, "SLURM_PROCID"), world_size=_int_env(env, "SLURM_NTASKS"),
                         local_rank=_int_env(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
                         master_addr=addr, master_port=port)
    return LaunchEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=_free_port())


_TORCH_DEFAULT_TIMEOUTS = None  # torch's own group defaults, while `_set_group_defaults` replaced them


def _set_group_defaults(timeout: timedelta | None) -> None:
    """Make groups created without a timeout use `timeout` (None: torch's defaults again).

    DeepSpeed's pipeline grid and tied-weight groups call `dist.new_group(ranks)` with no
    timeout, which takes torch's per-backend default (30 minutes for gloo, 10 for NCCL),
    read from these module attributes when the group is made. Replacing them is the only
    way to give those groups the run's collective timeout too.
    """
    global _TORCH_DEFAULT_TIMEOUTS
    c10d = dist.distributed_c10d
    if _TORCH_DEFAULT_TIMEOUTS is None:
        _TORCH_DEFAULT_TIMEOUTS = (c10d.default_pg_timeout, c10d.default_pg_nccl_timeout)
    if timeout is None:
        c10d.default_pg_timeout, c10d.default_pg_nccl_timeout = _TORCH_DEFAULT_TIMEOUTS
        _TORCH_DEFAULT_TIMEOUTS = None
    else:
        c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout


def init_distributed(tensor: int = 1, pipeline: int = 1, backend: str | None = None,
                     timeout_s: float | None = None, context: int = 1, sequence: bool = False) -> Layout:
    """Start torch.distributed (if not yet) and megatron-core's TP/CP/DP/PP groups.

    Safe to call again: an existing process group is reused, and model-parallel groups
    of a different shape are rebuilt. backend: nccl when CUDA is present, else gloo.
    timeout_s: how long any collective, and the start-up rendezvous, may wait for a peer
    before it raises (`train.collective_timeout_s`); it applies to the default group,
    megatron-core's groups and groups made later (DeepSpeed's). None: torch's defaults.
    Only a new process group takes it. sequence: sequence parallelism inside the TP group
    (parallel/sequence.py; nothing changes at tensor size 1).
    """
    if tensor < 1 or pipeline < 1 or context < 1:
        raise ValueError(f"tensor={tensor}, pipeline={pipeline} and context={context} must be >= 1")
    if timeout_s is not None and timeout_s <= 0:
        raise ValueError(f"timeout_s={timeout_s} must be positive")
    timeout = None if timeout_s is None else timedelta(seconds=timeout_s)
    launch = read_launch_env()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        # One process per GPU, on cuda:LOCAL_RANK, set before the process group starts.
        # DeepSpeed's engine and PipelineModule place the model on cuda:LOCAL_RANK too, so
        # a different device here (say, wrapping around fewer visible GPUs) would split a
        # rank across two devices; NCCL also refuses two ranks on one GPU.
        visible = torch.cuda.device_count()
        if launch.local_rank >= visible:
            raise RuntimeError(f"local rank {launch.local_rank} runs on GPU {launch.local_rank}, but this "
                               f"process sees {visible}: start one process per GPU, each seeing all GPUs "
                               f"of its node (under srun: no per-task GPU binding)")
        torch.cuda.set_device(launch.local_rank)
    if not dist.is_initialized():
        # Export what we parsed (the launcher's own values win) so that later readers of
        # the environment, e.g. DeepSpeed's engine looking up LOCAL_RANK, agree with us.
        for key, value in (("RANK", launch.rank), ("WORLD_SIZE", launch.world_size),
                           ("LOCAL_RANK", launch.local_rank), ("MASTER_ADDR", launch.master_addr),
                           ("MASTER_PORT", launch.master_port)):
            os.environ.setdefault(key, str(value))
        # env:// (not tcp://): under torchrun it joins the agent's store instead of binding its port.
        dist.init_process_group(backend=backend, rank=launch.rank, world_size=launch.world_size,
                                init_method="env://", **({} if timeout is None else {"timeout": timeout}))
        if timeout is not None:
            _set_group_defaults(timeout)
    world = dist.get_world_size()
    if world % (tensor * pipeline * context):
        raise ValueError(f"world size {world} is not divisible by tensor ({tensor}) x pipeline ({pipeline}) "
                         f"x context ({context})")
    if parallel_state.model_parallel_is_initialized():
        if (parallel_state.get_tensor_model_parallel_world_size() != tensor
                or parallel_state.get_pipeline_model_parallel_world_size() != pipeline
                or parallel_state.get_context_parallel_world_size() != context):
            parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        # Extra gloo groups only matter next to nccl; under gloo they would duplicate every group.
        minutes = {} if timeout is None else {"distributed_timeout_minutes": timeout.total_seconds() / 60}
        parallel_state.initialize_model_parallel(tensor, pipeline, context_parallel_size=context,
                                                 create_gloo_process_groups=backend == "nccl", **minutes)
    set_sequence_parallel(sequence)
    return current_layout()


def current_layout() -> Layout:
    """The Layout of this process; needs `init_distributed` first."""
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("model-parallel groups are not initialised: call "
                           "megatron_transnormer.parallel.init_distributed(tensor=..., pipeline=...) first")
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
    on_gpu = "nccl" in str(dist.get_backend()) and torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    return Layout(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                  tp_rank=parallel_state.get_tensor_model_parallel_rank(),
                  tp_size=parallel_state.get_tensor_model_parallel_world_size(),
                  pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
                  pp_size=parallel_state.get_pipeline_model_parallel_world_size(),
                  dp_rank=parallel_state.get_data_parallel_rank(),
                  dp_size=parallel_state.get_data_parallel_world_size(),
                  device=device,
                  cp_rank=parallel_state.get_context_parallel_rank(),
                  cp_size=parallel_state.get_context_parallel_world_size())


def destroy_distributed() -> None:
    """Tear down megatron's groups and the default process group (each only if present)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    set_sequence_parallel(False)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if _TORCH_DEFAULT_TIMEOUTS is not None:
        _set_group_defaults(None)
