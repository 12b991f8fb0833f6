"""The memory planner against measurements: the per-token formulas against what autograd
keeps (every mixer, MLP and norm kind, fp32 and bf16, with and without the attention
core's recomputation, at TP 1 and 2), and the planned peak against the peak of the tensors
real DeepSpeed training steps create (one process at ZeRO 0; two processes at context
parallel 2 and at data parallel 2 with ZeRO 1). Long sequences at a tiny width, so that
activations dominate."""
from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from megatron_transnormer.config import Config, validate_config
from megatron_transnormer.planning import activations as act
from tests.multiproc import run_ranks

SEQ = 2048  # above the reference kernels' segment (1024), as the no-recompute formulas assume
# Every token mixer (both variants) with the GLU, in fp32 and bf16, with and without the
# core's recomputation; the other channel mixers and LayerNorm once per precision.
BLOCK_CASES = ([(mixer, variant, "glu", "srms", dtype, recompute)
                for mixer, variant in (("diag", "t1"), ("diag", "t2"), ("norm", "t1"), ("norm", "t2"), ("linear", "t2"))
                for dtype in (torch.float32, torch.bfloat16) for recompute in (True, False)]
               + [("norm", "t2", mlp, "srms", dtype, True) for mlp in ("relu", "gelu")
                  for dtype in (torch.float32, torch.bfloat16)]
               + [("softmax", "t2", "relu", "layernorm", dtype, True) for dtype in (torch.float32, torch.bfloat16)])
# Exact but for CPU LayerNorm's statistics (kept in the input's dtype, 2 bytes less each in
# bf16 than the fp32 the formula assumes for the GPU) and the segment states (a constant).
BLOCK_RTOL = 0.01
PEAK_RTOL = 0.15


def _config(seq=SEQ, hidden=64, heads=4, layers=2, **settings) -> Config:
    c = Config()
    m = c.model
    m.vocab_size, m.hidden_size, m.num_heads, m.num_layers = 128, hidden, heads, layers
    m.dropout, m.kernels = 0.0, "torch"
    c.data.seq_len = seq
    c.train.micro_batch_size, c.train.global_batch_size = 1, 1
    for key, value in settings.items():
        section, name = key.split("__")
        setattr(getattr(c, section), name, value)
    return c


def _widths(cfg, dtype, tp=1):
    from megatron_transnormer.planning.planner import widths
    cfg.train.precision = "fp32" if dtype == torch.float32 else "bf16"
    return widths(cfg, tensor=tp)


def _block_saved(cfg, mixer, mlp, norm, dtype, seq):
    """Saved bytes per token of one block built with these kinds, on this rank."""
    from megatron_transnormer.model.blocks import Block, BlockSpec
    from megatron_transnormer.parallel.tensor_parallel import initialize_parameters
    from megatron_transnormer.planning.saved import saved_activation_bytes
    block = Block(cfg.model, BlockSpec(0, mixer, mlp, norm, False))
    initialize_parameters(block, seed=1)
    block = block.to(dtype)
    x = torch.randn(1, seq, cfg.model.hidden_size, dtype=dtype, requires_grad=True)
    positions = torch.arange(seq).unsqueeze(0)
    out, saved = saved_activation_bytes(lambda: block(x, positions), block.parameters())
    # The positions are an input of every recomputed region, one tensor for the whole model
    # (the planner counts it once per model, not per block).
    recomputed = cfg.model.recompute_attention and mixer != "softmax"
    return (saved - (act.INDEX * seq if recomputed else 0)) / seq


@pytest.fixture(scope="module")
def one_process():
    from megatron_transnormer.parallel import destroy_distributed, init_distributed
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    init_distributed(1, 1)
    yield
    destroy_distributed()


def test_block_formulas_match_what_autograd_keeps(one_process):
    misses = []
    for mixer, variant, mlp, norm, dtype, recompute in BLOCK_CASES:
        cfg = _config(hidden=32, heads=2, model__layers=[mixer] * 2, model__mlp=mlp, model__variant=variant,
                      model__recompute_attention=recompute)
        validate_config(cfg)
        measured = _block_saved(cfg, mixer, mlp, norm, dtype, SEQ)
        predicted = act.block_bytes(mixer, mlp, norm, _widths(cfg, dtype), recompute)
        # CPU LayerNorm keeps mean and rstd in bf16 (2 x 2 bytes less per norm than on a GPU)
        slack = 2 * 2 * 2 if norm == "layernorm" and dtype == torch.bfloat16 else 0
        if abs(predicted - measured) > BLOCK_RTOL * measured + slack:
            misses.append(f"{mixer}/{variant}/{mlp}/{norm}/{dtype}/recompute={recompute}: "
                          f"formula {predicted:.1f} B/token, measured {measured:.1f}")
    assert not misses, "\n".join(misses)


@pytest.mark.parametrize("settings", [
    dict(),
    dict(train__precision="bf16", train__activation_checkpointing=True),
    dict(model__arch="vanilla", model__dropout=0.1),
    dict(model__layers=["diag", "norm"], model__recompute_attention=False, train__precision="bf16"),
], ids=["t2_fp32", "bf16_checkpointing", "vanilla_dropout", "no_recompute_bf16"])
def test_model_saved_bytes_match_the_plan(one_process, settings):
    from megatron_transnormer.planning import plan_memory
    from megatron_transnormer.planning.measure import model_saved_bytes
    cfg = validate_config(_config(**settings), world_size=1)
    plan = plan_memory(cfg, 1)
    predicted = plan.worst.activations()
    measured = model_saved_bytes(cfg)
    assert predicted == pytest.approx(measured, rel=BLOCK_RTOL), f"{settings}: plan {predicted}, measured {measured}"


def _peak_case(cfg, layout, steps=1):
    """(planned growth, measured tensor peak, RSS growth, planned saved, measured saved) on this rank."""
    from megatron_transnormer.planning import plan_memory
    from megatron_transnormer.planning.measure import training_peak
    measured = training_peak(cfg, layout, steps=steps)
    plan = plan_memory(cfg, layout.world_size)
    s = plan.worst
    # The parameters, the fp32 master copies and Adam's moments exist before the measured
    # steps (the moments from the warm-up update); the rest is made during them.
    planned = s.peak() - s.states.parameters - s.states.master - s.states.moments
    return planned, measured["peak_tensor_bytes"], measured["peak_rss_growth"], s.activations(), \
        measured["saved_bytes"]


def _train_layouts(rank, world_size, cases):
    import logging

    from deepspeed.utils import logger

    from megatron_transnormer.parallel import destroy_distributed, init_distributed
    logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    out = {}
    for name, (tp, cp, zero, seq, settings) in cases.items():
        cfg = _config(seq=seq, hidden=32, heads=2, model__ffn_hidden_size=96, parallel__tensor=tp, parallel__context=cp,
                      parallel__zero_stage=zero, **settings)
        dp = world_size // (tp * cp)
        cfg.train.global_batch_size = dp
        validate_config(cfg, world_size=world_size)
        layout = init_distributed(tp, 1, context=cp)
        if name == "tp2_blocks":  # the formulas with heads and FFN split over two ranks
            out[name] = [(case, _block_saved(cfg, *case, seq), act.block_bytes(*case[:3], _widths(cfg, case[3], tp)))
                         for case in (("norm", "glu", "srms", torch.float32), ("diag", "gelu", "srms", torch.bfloat16),
                                      ("softmax", "relu", "layernorm", torch.float32))]
        else:
            out[name] = _peak_case(cfg, layout)
    destroy_distributed()
    return out


def _check_peaks(results):
    for name, (planned, peak, rss, planned_saved, saved) in results.items():
        what = (f"{name}: planned {planned / 2**20:.1f} MiB, tensors' peak {peak / 2**20:.1f} MiB "
                f"(peak RSS growth {rss / 2**20:.1f} MiB)")
        assert planned == pytest.approx(peak, rel=PEAK_RTOL), what
        assert planned_saved == pytest.approx(saved, rel=BLOCK_RTOL), f"{name}: saved {planned_saved} vs {saved}"


@pytest.fixture
def heap_only_malloc(monkeypatch):
    """Spawned ranks start with bench/seq_scaling.py's malloc settings (read at start-up),
    so that the RSS growth in the messages is measured as the benchmarks measure it."""
    from bench.seq_scaling import CPU_MALLOC_ENV
    for key, value in CPU_MALLOC_ENV.items():
        monkeypatch.setenv(key, value)


def test_one_process_zero0_peak_within_15_percent(heap_only_malloc):
    (results,) = run_ranks(_train_layouts, 1, {"zero0": (1, 1, 0, 4096, {})})
    _check_peaks(results)


def test_two_processes_context_and_data_parallel_peaks_within_15_percent(heap_only_malloc):
    cases = {"tp2_blocks": (2, 1, 0, SEQ, {}),
             "cp2_zero0": (1, 2, 0, 4096, {}),
             "dp2_zero1": (1, 1, 1, 2048, {})}
    results = run_ranks(_train_layouts, 2, cases)
    for rank_results in results:
        for case, measured, predicted in rank_results.pop("tp2_blocks"):
            assert predicted == pytest.approx(measured, rel=BLOCK_RTOL), f"TP 2, {case}: {predicted} vs {measured}"
        _check_peaks(rank_results)
    # Context parallelism halves each rank's activations (measured against one rank's plan).
    from megatron_transnormer.planning import plan_memory
    whole = plan_memory(validate_config(_config(seq=4096, hidden=32, heads=2, model__ffn_hidden_size=96)), 1)
    for r in results:
        assert r["cp2_zero0"][4] == pytest.approx(whole.worst.activations() / 2, rel=0.02)
