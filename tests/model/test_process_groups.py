"""Launcher environments, nodelist expansion, and the rank order shared with DeepSpeed."""
import pytest
import torch.distributed as dist

from megatron_transnormer.parallel import expand_nodelist, read_launch_env
from tests.multiproc import run_ranks


def test_expand_nodelist():
    assert expand_nodelist("node[1-3,5]") == ["node1", "node2", "node3", "node5"]
    assert expand_nodelist("gpu-a[08-10],login") == ["gpu-a08", "gpu-a09", "gpu-a10", "login"]
    assert expand_nodelist("single") == ["single"]
    assert expand_nodelist("r[1-2]n[3-4],x1") == ["r1n3", "r1n4", "r2n3", "r2n4", "x1"]
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        expand_nodelist("")


def test_launch_env_from_slurm_torchrun_and_plain_python():
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
             "SLURM_JOB_NODELIST": "node[07-10]", "SLURM_JOB_ID": "123456"}
    env = read_launch_env(slurm)
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (5, 8, 1, "node07")
    assert env.master_port == 15000 + 123456 % 20000
    assert read_launch_env({**slurm, "MASTER_PORT": "29555"}).master_port == 29555
    # torchrun's variables win over SLURM's (srun launching torchrun).
    torchrun = {**slurm, "RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1234"}
    env = read_launch_env(torchrun)
    assert (env.rank, env.world_size, env.master_addr, env.master_port) == (2, 4, "h", 1234)
    env = read_launch_env({})
    assert (env.rank, env.world_size) == (0, 1) and env.master_port > 0
    with pytest.raises(ValueError, match="SLURM_NTASKS"):
        read_launch_env({**slurm, "SLURM_NTASKS": "eight"})
    with pytest.raises(ValueError, match="MASTER_PORT"):
        read_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1"})


def _groups(rank, world_size):
    from megatron.core import parallel_state as ps

    from megatron_transnormer.parallel import MegatronMPU, destroy_distributed, init_distributed

    layout = init_distributed(tensor=2, pipeline=2)
    again = init_distributed(tensor=2, pipeline=2)  # idempotent
    assert layout == again
    mpu = MegatronMPU()
    out = {
        "layout": (layout.tp_rank, layout.pp_rank, layout.dp_rank, layout.dp_size),
        "tp": dist.get_process_group_ranks(ps.get_tensor_model_parallel_group()),
        "pp": dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group()),
        "mpu": (mpu.get_model_parallel_rank(), mpu.get_pipeline_model_parallel_rank(), mpu.get_data_parallel_rank()),
    }
    destroy_distributed()
    return out


def test_rank_order_matches_deepspeed_topology():
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    topo = PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=1)
    results = run_ranks(_groups, 4, timeout=120)
    for rank, r in enumerate(results):
        tp, pp, dp = rank % 2, rank // 2, 0  # tp fastest, then dp, then pp
        coord = topo.get_coord(rank)
        assert r["layout"] == (tp, pp, dp, 1)
        assert (coord.model, coord.pipe, coord.data) == (tp, pp, dp)
        assert r["mpu"] == (tp, pp, dp)
        assert r["tp"] == [rank - tp, rank - tp + 1]
        assert r["pp"] == [tp, tp + 2]
