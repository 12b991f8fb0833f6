"""Run a function in N real processes joined by a gloo process group (CPU tests).

    results = run_ranks(fn, world_size, arg1, arg2)

`fn(rank, world_size, *args)` runs in a fresh spawned process with RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT set (as torchrun would); it must be defined at
module level so the child can import it. Its return values come back in rank order;
an exception in any rank fails the call with that rank's traceback.
"""
from __future__ import annotations

import os
import queue
import socket
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank, world_size, port, env, args, results):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
                       # CPU tests on every machine: with a GPU visible, init_distributed would
                       # choose NCCL, and on a machine with fewer GPUs than ranks NCCL refuses
                       # two ranks on one device. `env` may make GPUs visible again.
                       "CUDA_VISIBLE_DEVICES": ""})
    os.environ.update(env or {})
    try:
        results.put((rank, True, fn(rank, world_size, *args)))
    except BaseException:  # report every failure, including SystemExit
        results.put((rank, False, traceback.format_exc()))
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout: float = 300, env: dict | None = None) -> list:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world_size, port, env, args, results))
             for r in range(world_size)]
    for p in procs:
        p.start()
    out, errors = {}, []
    try:
        for _ in range(world_size):
            rank, ok, value = results.get(timeout=timeout)
            if ok:
                out[rank] = value
            else:
                errors.append(f"rank {rank} failed:\n{value}")
                break  # the other ranks may now hang in a collective
    except queue.Empty:
        errors.append(f"timed out after {timeout}s waiting for ranks {sorted(set(range(world_size)) - set(out))}")
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError("\n".join(errors))
    return [out[r] for r in range(world_size)]
