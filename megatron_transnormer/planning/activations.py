"""Activation memory per token: what autograd keeps for the backward, component by component.

The formulas follow the code (and `tests/planning/test_plan.py` checks them against
`saved.saved_activation_bytes` on real modules). Notation, all per token of one sample on
one rank:

    a     bytes of the activation dtype (4 fp32, 2 bf16); f32 = 4
    d     hidden size;  dl = d / tp  (q, k, v and the attention output on this rank)
    hl    heads on this rank (H / tp);  D = d / H, the head dimension
    fl    FFN width on this rank (ffn / tp)
    r     tp under sequence parallelism, else 1: the width-d tensors outside the
          attention and MLP regions (block input, norms, the projections' input) are
          split along the sequence over the TP group

Block (pre- or post-norm alike): two norms + the token mixer + the channel mixer.
  SRMSNorm keeps an fp32 copy of its input (4d; the input itself when training in fp32)
  and two fp32 scalars (8); LayerNorm keeps its input (a d) and mean / rstd (8).
  Token mixer with `model.recompute_attention` (not softmax): its input (a d / r, shared
  by the q, k, v projections), q, k, v (3 a dl, the recomputed core's inputs) and the
  core's output (a dl, the output projection's input): a (d/r + 4 dl).
  Softmax attention (never recomputed): the same plus the row log-sum-exp (4 hl).
  Without recomputation the core's intermediates stay too (LRPE keeps the Householder
  image in fp32 (4 dl) and fp32 angles, cosines, sines of the D/2 rotations (3 * 4 D/2) and
  the positions (4) for q and for k; the feature map its output (a dl each for q, k); the
  output SRMSNorm its fp32 copy (4 dl) + 8): `core_bytes`.
  Channel mixer: its input (a d / r) and GLU: W1x, W2x, silu(W1x)W2x (3 a fl); ReLU: the
  activation's output (a fl, shared with the second layer's input); GELU: its input and
  output (2 a fl).
  Dropout (p > 0) keeps a mask per element it drops on: in the input's dtype on CPU (a),
  one byte on CUDA, so the formula is an upper bound there.
Model: + the int64 token ids (8, the embedding's input) + the int64 positions (8, an input
of every recomputed region, one tensor for all layers) + the final norm and the head's
input (a d) + the loss's fp32 softmax over this rank's vocabulary slice (4 V/tp).
Activation checkpointing (train.activation_checkpointing) keeps only each block's input
(a d / r) and recomputes the block in the backward.

Transients on top of what is kept (the peak of a step, planner.py): at the loss, the
fp32 gradient of the logits (`loss_transient_bytes`); later in the backward, once the head's
softmax and input are freed, the recomputed block (under checkpointing) and attention
core with the gradients of its q, k, v (`core_backward_bytes`).
"""
from __future__ import annotations

from dataclasses import dataclass

F32 = 4
INDEX = 8  # int64 token ids and positions
NORM_STATS = 2 * F32  # SRMSNorm: the norm and its denominator; LayerNorm: mean and rstd

MIXER_KINDS = ("diag", "norm", "softmax", "linear")
MLP_KINDS = ("glu", "relu", "gelu")
NORM_KINDS = ("srms", "layernorm")


@dataclass(frozen=True)
class Widths:
    """The sizes the formulas read, on one rank."""

    hidden: int
    heads: int  # all heads (model.num_heads)
    ffn: int  # model.ffn_hidden_size
    vocab: int
    act_bytes: int  # 4 (fp32) or 2 (bf16)
    tp: int = 1
    sequence_parallel: bool = False
    variant: str = "t2"
    dropout: bool = False  # model.dropout > 0

    @property
    def dl(self) -> int:
        return self.hidden // self.tp

    @property
    def hl(self) -> int:
        return self.heads // self.tp

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def fl(self) -> int:
        return self.ffn // self.tp

    @property
    def r(self) -> int:
        """What the replicated-width tensors are divided by: tp under sequence parallelism."""
        return self.tp if self.sequence_parallel else 1


def norm_bytes(kind: str, w: Widths) -> float:
    if kind not in NORM_KINDS:
        raise ValueError(f"norm kind {kind!r} is not one of {NORM_KINDS}")
    width = F32 if kind == "srms" else w.act_bytes  # SRMSNorm computes on an fp32 copy
    return (width * w.hidden + NORM_STATS) / w.r


def _lrpe_bytes(w: Widths) -> float:
    """One LRPE call: the Householder image (fp32) and the angles, cosines, sines and positions."""
    return F32 * w.dl + 3 * F32 * (w.head_dim // 2) + F32


def core_bytes(kind: str, w: Widths) -> float:
    """What the attention core keeps beyond q, k, v and its output when it is not recomputed;
    also the working set one layer's recomputation rebuilds in the backward."""
    a, dl = w.act_bytes, w.dl
    copy = F32 * dl if a != F32 else 0  # an fp32 copy that in fp32 is the tensor itself
    if kind == "norm":
        # feature maps of q and k, LRPE on both, the output SRMSNorm's fp32 copy and stats
        return 2 * a * dl + 2 * _lrpe_bytes(w) + F32 * dl + NORM_STATS
    if kind == "diag":
        # LRPE on the scaled q and on k; T1 normalises the ReLU attention's output
        extra = F32 * dl + NORM_STATS if w.variant == "t1" else 0
        return 2 * _lrpe_bytes(w) + extra
    if kind == "linear":
        # feature maps of q and k, the fp32 running key sums and numerator, the denominator
        return 2 * a * dl + 2 * F32 * dl + copy + F32 * w.hl
    if kind == "softmax":
        return 0.0
    raise ValueError(f"mixer kind {kind!r} is not one of {MIXER_KINDS}")


def mixer_bytes(kind: str, w: Widths, recompute: bool = True) -> float:
    a = w.act_bytes
    kept = a * w.hidden / w.r + 4 * a * w.dl  # input, q, k, v, output-projection input
    if kind == "softmax":
        return kept + F32 * w.hl  # the fused attention's log-sum-exp rows
    return kept + (0.0 if recompute else core_bytes(kind, w))


def mlp_bytes(kind: str, w: Widths) -> float:
    a = w.act_bytes
    inner = {"glu": 3, "relu": 1, "gelu": 2}
    if kind not in inner:
        raise ValueError(f"mlp kind {kind!r} is not one of {MLP_KINDS}")
    return a * w.hidden / w.r + inner[kind] * a * w.fl


def dropout_bytes(w: Widths) -> float:
    """The residual branches' dropout masks of one block, when model.dropout > 0."""
    return 2 * w.act_bytes * w.hidden / w.r if w.dropout else 0.0


def block_bytes(mixer: str, mlp: str, norm: str, w: Widths, recompute: bool = True) -> float:
    return 2 * norm_bytes(norm, w) + mixer_bytes(mixer, w, recompute) + mlp_bytes(mlp, w) + dropout_bytes(w)


def checkpointed_block_bytes(w: Widths) -> float:
    """A block under activation checkpointing keeps only its input."""
    return w.act_bytes * w.hidden / w.r


def embedding_bytes(w: Widths) -> float:
    """The token ids (the embedding's input) and the embedding dropout's mask."""
    return INDEX + (w.act_bytes * w.hidden / w.r if w.dropout else 0.0)


def head_bytes(norm: str | None, w: Widths) -> float:
    """Final norm (pre-norm models) + the LM head's input; the loss's softmax is `loss_bytes`."""
    return (norm_bytes(norm, w) if norm else 0.0) + w.act_bytes * w.hidden / w.r


def loss_saved_bytes(w: Widths) -> float:
    """The vocabulary-parallel cross entropy keeps the fp32 softmax of this rank's vocabulary
    slice (its backward turns it into the logits' gradient in place)."""
    return F32 * w.vocab / w.tp


def loss_transient_bytes(w: Widths) -> float:
    """Beyond the kept softmax: at the loss, the logits in the model's dtype while their fp32
    copy becomes the softmax (in fp32 they are that tensor); in the backward, the fp32
    gradient of the logits [tokens, vocab/tp] beside it. The larger is the latter."""
    return max(w.act_bytes if w.act_bytes != F32 else 0, F32) * w.vocab / w.tp


def core_backward_bytes(kind: str, w: Widths) -> float:
    """One attention core's recomputation in the backward: its intermediates again, and the
    gradients of q, k, v it produces while they live."""
    return core_bytes(kind, w) + 3 * w.act_bytes * w.dl
