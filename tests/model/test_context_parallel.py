"""Context parallelism in the model: each CP rank runs its slice of the sequence, and the
slices' outputs and the CP-summed gradients equal one process running the whole sequence
(float64, real gloo groups), for every token mixer that supports it."""
import pytest
import torch

from tests.multiproc import run_ranks

from .conftest import small_config

SEQ = 64  # 2 or 4 slices of 32 / 16 tokens: whole DiagAttention blocks of 16
CASES = {
    "t1": dict(variant="t1"),
    "t2_decay": dict(variant="t2", decay=True),
    "linear_1elu": dict(arch="linear_1elu"),
    "mixed": dict(layers=["norm", "diag", "linear", "norm"]),
    "masked_lm_t2": dict(head="masked_lm", causal=False, norm_position="post", positions="learned",
                         max_positions=SEQ, embedding_scale=False, embedding_norm=True, pad_id=1),
    "masked_lm_t1": dict(variant="t1", head="masked_lm", causal=False, pad_id=1),
}


def _groups(cp: int):
    from megatron.core import parallel_state

    from megatron_transnormer.parallel import init_distributed
    init_distributed(1, 1)
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(1, 1, context_parallel_size=cp, create_gloo_process_groups=False)


def _inputs(cfg):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, cfg.vocab_size, (2, SEQ), generator=g)
    positions = torch.arange(SEQ).unsqueeze(0)
    if cfg.head == "lm":
        return ids, positions, None, None
    valid = torch.ones(2, SEQ, dtype=torch.bool)
    valid[1, 45:] = False  # padding in the last slice(s)
    return ids.masked_fill(~valid, cfg.pad_id), positions, valid, valid


def _run(cfg, sliced: bool):
    """(the model's output for this rank's positions, every parameter's gradient summed over CP)."""
    import torch.distributed as dist

    from megatron_transnormer.model import build_model
    from megatron_transnormer.parallel import context
    model = build_model(cfg, seed=4).double()
    inputs = _inputs(cfg)
    if sliced:
        inputs = [None if t is None else context.local_slice(t) for t in inputs]
    out = model(*inputs)
    # A loss over every position, so that each slice's gradient reaches the others' states.
    (out.pow(2).sum() + out.sum()).backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = p.grad.clone()
        if sliced:
            dist.all_reduce(g, group=context.cp_group())
        grads[name] = g
    return out.detach(), grads


def _compare(rank, world_size):
    from megatron_transnormer.parallel import context
    report = {}
    for name, case in CASES.items():
        cfg = small_config(hidden_size=32, num_heads=4, block_size=16, ffn_hidden_size=64, **case)
        _groups(1)
        full_out, full_grads = _run(cfg, sliced=False)
        _groups(world_size)
        assert context.cp_size() == world_size and context.cp_rank() == rank
        out, grads = _run(cfg, sliced=True)
        expected = context.local_slice(full_out) if cfg.head == "lm" else full_out
        if cfg.head == "masked_lm":  # projected rows of the output mask, in order: this slice's
            mask = _inputs(cfg)[3]
            rows = torch.zeros_like(mask, dtype=torch.long)
            rows[mask] = torch.arange(int(mask.sum()))
            expected = full_out[context.local_slice(rows)[context.local_slice(mask)]]
        err = {"out": ((out - expected).abs().max() / expected.abs().max()).item()}
        err["grad"] = max(((grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-300)).item()
                          for n, g in full_grads.items() if g.abs().max() > 0)
        err["params_with_grads"] = (sorted(grads) == sorted(full_grads))
        report[name] = err
    return report


@pytest.mark.parametrize("world_size", [2, 4])
def test_slices_equal_the_whole_sequence(world_size):
    for rank, report in enumerate(run_ranks(_compare, world_size, timeout=300)):
        for name, err in report.items():
            assert err["params_with_grads"], (world_size, rank, name)
            assert err["out"] < 1e-10 and err["grad"] < 1e-9, (world_size, rank, name, err)
