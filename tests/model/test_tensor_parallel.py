"""TP=2 equals TP=1: same initial weights, logits, per-token loss and gradients (2 gloo processes),
for the causal LM of every architecture, the masked LM (post-norm, learned positions, BERT
init, padding, projection of the masked positions only) and a classifier."""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.multiproc import run_ranks

from .conftest import small_config

MLM = dict(head="masked_lm", causal=False, norm_position="post", positions="learned", max_positions=40,
           embedding_scale=False, embedding_norm=True, init="bert", pad_id=1, attention_dropout=0.0)
CASES = [dict(arch="transnormer", variant="t1"), dict(arch="transnormer", variant="t2", decay=True),
         dict(arch="vanilla"), dict(arch="linear_1elu"), dict(MLM, variant="t1"), dict(MLM, variant="t2"),
         dict(head="classification", causal=False, num_classes=3, pad_id=1)]


def _gather(t: torch.Tensor, param) -> torch.Tensor:
    """The full tensor of a TP-sharded parameter (or its gradient)."""
    from megatron_transnormer.parallel.tensor_parallel import tp_group, tp_size
    if not getattr(param, "tensor_model_parallel", False):
        return t
    parts = [torch.empty_like(t) for _ in range(tp_size())]
    dist.all_gather(parts, t.contiguous(), group=tp_group())
    return torch.cat(parts, dim=param.partition_dim)


def softmax_key_bias(cfg, name: str) -> bool:
    """Plain softmax attention's key bias (LRPE rotates the bias per position, so not DiagAttention's)."""
    return cfg.arch == "vanilla" and name.endswith("mixer.k_proj.bias")


def _inputs(cfg):
    """(model inputs, labels): padded samples for the bidirectional heads."""
    ids = torch.randint(2, 96, (2, 40), generator=torch.Generator().manual_seed(0))
    if cfg.head == "lm":
        return (ids,), ids.roll(-1, 1)
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[1, 29:] = False
    ids = ids.masked_fill(~valid, cfg.pad_id)
    if cfg.head == "classification":
        return (ids, None, valid), torch.tensor([0, 2])
    output_mask = (torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.3) & valid
    return (ids, None, valid, output_mask), ids[output_mask]


def _run(model, cfg):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    inputs, labels = _inputs(cfg)
    model.zero_grad()
    out = model(*inputs)
    if cfg.head == "classification":
        loss = F.cross_entropy(out.float(), labels, reduction="none")
    else:
        loss = vocab_parallel_cross_entropy(out.float().clone(), labels)
    (loss.sum() / loss.numel()).backward()
    with torch.no_grad():
        logits = model(*inputs)
    return loss.detach(), logits


def _full_logits(logits, cfg):
    from megatron_transnormer.parallel.tensor_parallel import tp_group, tp_size
    if cfg.head == "classification":  # class logits are replicated, not split
        return logits
    parts = [torch.empty_like(logits) for _ in range(tp_size())]
    dist.all_gather(parts, logits.contiguous(), group=tp_group())
    return torch.cat(parts, dim=-1)


def _compare_tp2_with_tp1(rank, world_size):
    from megatron_transnormer.model import build_model
    from megatron_transnormer.parallel import MegatronMPU, init_distributed

    report = {}
    for case in CASES:
        cfg = small_config(ffn_hidden_size=64, **case)
        name = "/".join(f"{k}={v}" for k, v in case.items() if k in ("arch", "variant", "head", "decay"))
        layout = init_distributed(tensor=1)  # reference: the whole model on each rank
        assert (layout.tp_size, layout.dp_size) == (1, 2)
        ref = build_model(cfg, seed=11)
        ref_loss, ref_logits = _run(ref, cfg)
        ref_params = {n: p.detach().clone() for n, p in ref.named_parameters()}
        ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}
        grad_scale = max(g.abs().max().item() for g in ref_grads.values())

        layout = init_distributed(tensor=2)
        assert (layout.tp_size, layout.tp_rank, layout.dp_size) == (2, rank, 1)
        mpu = MegatronMPU()
        assert (mpu.get_model_parallel_world_size(), mpu.get_model_parallel_rank()) == (2, rank)
        assert mpu.get_data_parallel_world_size() == 1
        model = build_model(cfg, seed=11)
        # Recomputation replays the TP collectives in backward: check it in one case.
        model.activation_checkpointing = case is CASES[0]
        loss, logits = _run(model, cfg)
        errors = {"loss": ((loss - ref_loss).abs().max() / ref_loss.abs().max()).item(),
                  "logits": ((_full_logits(logits, cfg) - ref_logits).abs().max() / ref_logits.abs().max()).item(),
                  "init": 0.0, "grad": 0.0}
        for n, p in model.named_parameters():
            full = _gather(p.detach(), p)
            assert full.shape == ref_params[n].shape, n
            errors["init"] = max(errors["init"], (full - ref_params[n]).abs().max().item())
            if p.grad is not None:
                g = _gather(p.grad, p)
                if softmax_key_bias(cfg, n):
                    # Softmax is shift-invariant: this gradient is zero in theory, rounding noise
                    # in practice. Check it is noise on both sides instead of comparing noise.
                    assert max(g.abs().max().item(), ref_grads[n].abs().max().item()) < 1e-6 * grad_scale, n
                    continue
                scale = max(ref_grads[n].abs().max().item(), 1e-30)
                err = ((g - ref_grads[n]).abs().max() / scale).item()
                if err > errors["grad"]:
                    errors["grad"], errors["worst"] = err, n
        sharded = sum(getattr(p, "tensor_model_parallel", False) for p in model.parameters())
        errors["sharded_params"] = sharded
        report[name] = errors
    return report


def test_tp2_equals_tp1_for_every_architecture():
    reports = run_ranks(_compare_tp2_with_tp1, 2, timeout=240)
    for rank, report in enumerate(reports):
        for name, errors in report.items():
            assert errors["init"] == 0.0, (rank, name, errors)
            assert errors["sharded_params"] > 0, (rank, name, errors)
            for key in ("loss", "logits", "grad"):
                assert errors[key] < 1e-5, (rank, name, key, errors.get("worst"), errors)
