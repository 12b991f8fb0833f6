"""Sequence parallelism's pieces on real gloo ranks (TP=2): the gathers and scatters invert
each other, and dropout in the sequence-parallel region draws a different mask on each TP
rank (they hold other tokens), the same one again under activation checkpointing's RNG
replay, and leaves the default generator where every TP rank agrees."""
from tests.multiproc import run_ranks


def _pieces(rank, world_size):
    import torch

    from megatron_transnormer.parallel import destroy_distributed, init_distributed
    from megatron_transnormer.parallel import sequence

    try:
        init_distributed(2, 1, sequence=True)
        torch.manual_seed(0)  # alike on both TP ranks, as training seeds them
        full = torch.arange(2 * 8 * 3, dtype=torch.float32).view(2, 8, 3)
        local = sequence.scatter(full)
        back = sequence.gather(local, partial_grads=False)
        state = torch.get_rng_state()
        mask = sequence.dropout(torch.ones(1, 64, 16), 0.5, True) != 0
        after = torch.get_rng_state()
        torch.set_rng_state(state)  # what checkpoint's replay does
        again = sequence.dropout(torch.ones(1, 64, 16), 0.5, True) != 0
        off = sequence.dropout(torch.ones(4), 0.5, False)
        return {"local": local.tolist(), "back_equal": torch.equal(back, full), "mask": mask.tolist(),
                "replayed": torch.equal(mask, again), "after": after.tolist(), "off": off.tolist()}
    finally:
        destroy_distributed()


def test_sequence_parallel_pieces_on_two_tensor_parallel_ranks():
    r0, r1 = run_ranks(_pieces, 2)
    full = [[[float(3 * (8 * b + t) + c) for c in range(3)] for t in range(8)] for b in range(2)]
    assert r0["local"] == [row[:4] for row in full] and r1["local"] == [row[4:] for row in full]
    assert r0["back_equal"] and r1["back_equal"]
    assert r0["replayed"] and r1["replayed"]
    assert r0["mask"] != r1["mask"]  # each rank's tokens get their own mask
    assert r0["after"] == r1["after"]  # the default streams stay in step over the TP group
    assert r0["off"] == r1["off"] == [1.0] * 4
