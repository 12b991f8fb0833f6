"""The configuration schema: one dataclass per component, validated once at the edge.

Every field can be set from YAML (`model: {hidden_size: 512}`) or from the command
line (`model.hidden_size=512`). `validate_config` checks everything that can be
checked without a process group, so a bad setting fails before any rank can hang.
"""
from __future__ import annotations

from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A configuration value is missing, malformed or inconsistent; the message names the key."""


MIXERS = ("diag", "norm", "softmax", "linear")  # token mixers a layer can hold (model/attention.py)
HEADS = ("lm", "masked_lm", "classification")


@dataclass
class ModelConfig:
    # transnormer: the paper's model; vanilla: softmax transformer baseline;
    # linear_1elu: the "1+elu" linear transformer baseline (denominator, no norm).
    # The family sets the defaults of `layers`, `mlp` and the norm (SRMSNorm / LayerNorm).
    arch: str = "transnormer"
    variant: str = "t2"  # t1 | t2 (TransNormer's feature map and DiagAttention kind; spec §1)
    vocab_size: int = 0  # 0: taken from the dataset manifest
    pad_id: int = -1  # the padding token, whose embedding row starts at zero; -1: none
    hidden_size: int = 512
    num_layers: int = 6
    num_heads: int = 8
    # Heads of the DiagAttention layers when they differ from num_heads (the LRA models' "local
    # heads", spec §9); 0: num_heads.
    local_heads: int = 0
    # The token mixer of every layer: diag (DiagAttention), norm (NormAttention), softmax
    # (full softmax attention), linear (1+elu linear attention). A list, or a compact
    # string such as "diag*6,norm*6". Empty: the family's pattern (TransNormer: the first
    # half diag, the rest norm; vanilla: softmax; linear_1elu: linear).
    layers: list[str] = field(default_factory=list)
    mlp: str = ""  # glu (SiLU GLU) | relu | gelu (two-layer FFN); empty: glu for TransNormer, relu otherwise
    ffn_hidden_size: int = 0  # 0: int(8/3 * d) for GLU, 4 * d for the two-layer FFN
    norm_position: str = "pre"  # pre (the ALM) | post (the masked LM)
    block_size: int = 64  # DiagAttention block (spec §4)
    causal: bool = True
    # Absolute positions added to the token embeddings: sinusoidal (fixed), learned (a table
    # of max_positions rows), none.
    positions: str = "sinusoidal"
    max_positions: int = 0  # rows of the learned position table; 0: data.seq_len
    embedding_scale: bool = True  # multiply token embeddings by sqrt(d)
    embedding_norm: bool = False  # LayerNorm after adding the positions (the masked LM)
    # default: each layer's own initialisation (spec §3-§6); bert: every Linear and
    # Embedding weight N(0, 0.02), biases 0 (the masked LM, spec §8).
    init: str = "default"
    # What the last layer feeds: lm (next-token logits through the tied embedding), masked_lm
    # (RoBERTa's head: dense, GELU, LayerNorm, tied decoder + bias), classification
    # (pooling over real tokens, dense, GELU, class logits). The training objective follows.
    head: str = "lm"
    num_classes: int = 0  # classification only
    pooling: str = "mean"  # classification: mean over real tokens | first (token 0)
    # classification: what follows the pooling. mlp: dense, GELU, class logits; linear: one
    # linear layer (the LRA models, spec §9); two_tower: each sample is two documents encoded
    # by the same network (LRA Retrieval), their pooled u, v classified from [u, v, u·v, u−v]
    # by dense, GELU, class logits.
    classifier: str = "mlp"
    # The norm of the blocks (and the final norm): empty for the family's (SRMSNorm for
    # TransNormer, LayerNorm otherwise); batch: batch norm over the real tokens of the global
    # batch (statistics all-reduced over data parallelism, running statistics in evaluation),
    # also as the attention-output norm (the LRA models, spec §9).
    norm: str = ""
    # What the sequence holds: tokens (ids into the embedding table) or pixels (intensities
    # 0-255, each one feature (v/255 - pixel_mean) / pixel_std through a linear encoder).
    input: str = "tokens"
    pixel_mean: float = 0.5
    pixel_std: float = 0.5
    dropout: float = 0.1
    attention_dropout: float = 0.0
    # Triton kernels: auto (on CUDA), torch (reference, always), triton (required).
    kernels: str = "auto"
    # Per-head exponential decay in NormAttention (TransNormerLLM variant, spec §11).
    decay: bool = False
    # Recompute each attention layer's core (feature map, LRPE, mixing, output norm) in the
    # backward from the q, k, v projections, instead of keeping its intermediates: one more
    # forward of the core per layer for about half of an attention layer's activation memory
    # (megatron's "selective" recomputation). Results are bit-identical either way.
    recompute_attention: bool = True


@dataclass
class DataConfig:
    path: str = ""  # a prepared dataset directory (holds manifest.json) or a manifest file
    train_split: str = "train"
    valid_split: str = "valid"
    # Classification datasets (LRA): scored at the end of training with the checkpoint of the
    # best validation accuracy.
    test_split: str = "test"
    seq_len: int = 0  # 0: the manifest's sequence length
    num_workers: int = 0  # loader worker processes per rank
    shuffle_buffer: int = 1000  # samples held for shuffling
    skip_corrupt: bool = False  # skip a corrupt shard with a warning instead of failing
    verify: bool = True  # check each local shard's sha256 before reading it
    # where the manifest's shards are: '' (beside it), a folder or URL prefix, a glob, or a
    # template with {name} such as 'pipe:aws s3 cp s3://bucket/ds/{name} -'
    shards: str = ""
    # Several prepared datasets mixed by weight, instead of data.path: items 'WEIGHT PATH'
    # (YAML list, or on the command line "0.7 data/web,0.3 data/books"). Weights are
    # normalised; every data-parallel rank takes its samples from the datasets in the same
    # deterministic order, which keeps each dataset's share of every run prefix within one
    # global batch row of its weight (data/blend.py). The datasets share one tokenizer and
    # sample length; each is validated and reported on its own as well.
    blend: list[str] = field(default_factory=list)


@dataclass
class OptimConfig:
    lr: float = 5e-4
    min_lr: float = 0.0
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    weight_decay: float = 0.01
    # Parameters without weight decay: norms and biases always; embeddings if set.
    decay_embeddings: bool = True
    # inverse_sqrt (the paper's ALM), polynomial (its masked LM: (1 - progress)^decay_power
    # down to min_lr), cosine, linear (= polynomial of power 1), constant; all after a
    # linear warm-up.
    schedule: str = "inverse_sqrt"
    decay_power: float = 1.0
    warmup_steps: int = 8000
    warmup_init_lr: float = 1e-7
    clip_grad: float = 0.0  # 0: no clipping (the paper's ALM runs)


@dataclass
class ObjectiveConfig:
    """Settings of the training objective, which follows model.head: lm trains a causal LM,
    masked_lm RoBERTa's masked LM (these keys)."""
    mask_prob: float = 0.15  # share of each sample's real tokens that are predicted
    leave_unmasked_prob: float = 0.1  # of those, kept as they are
    random_token_prob: float = 0.1  # of those, replaced by a random token (the rest: <mask>)


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    # Context parallelism: every sequence is split into this many contiguous slices, one per
    # rank of a context-parallel group (parallel/context.py); the rank order is megatron-core's
    # tp-cp-dp-pp. For long sequences: activation memory per rank falls with it.
    context: int = 1
    # Sequence parallelism (megatron's) inside the tensor-parallel group: between the
    # attention and MLP regions (norms, dropout, residuals) each TP rank keeps only its slice
    # of the sequence, dividing that activation memory by `tensor` (parallel/sequence.py).
    sequence: bool = False
    zero_stage: int = 0  # 0..3; 2 and 3 need pipeline == 1
    # Data-parallel size is derived: world_size / (tensor * pipeline * context).


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer updates
    micro_batch_size: int = 8  # samples per rank per forward
    global_batch_size: int = 8  # samples per update over all data-parallel ranks
    precision: str = "fp32"  # fp32 | bf16
    seed: int = 1
    run_dir: str = "runs/default"
    resume: str = "auto"  # auto: latest complete checkpoint in run_dir; none; or a checkpoint path
    # A run directory that already holds a run (metrics.jsonl, checkpoints) is continued by
    # resume=auto and refused with resume=none or another run's checkpoint, unless overwrite
    # is true: then its metrics, checkpoints, TensorBoard logs, plot and config.yaml are
    # deleted first. With resume=auto overwrite changes nothing, so that a requeued job that
    # repeats the command line (plus train.resume=auto) continues instead of starting over.
    overwrite: bool = False
    save_interval: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    log_interval: int = 1
    eval_interval: int = 0  # 0: only at the end
    eval_batches: int = 0  # 0: the whole validation split
    activation_checkpointing: bool = False
    tensorboard: bool = True
    # Weights & Biases logging next to TensorBoard: off, online, or offline (written under
    # <run_dir>/wandb without a network; `wandb sync` uploads it later). Needs the wandb extra.
    wandb: str = "off"
    wandb_project: str = "megatron_transnormer"
    plot: bool = True
    # Seconds a rank waits in one collective (and for its peers at start-up) before it gives
    # up with an error naming what it was doing, instead of hanging on a frozen, stuck or dead
    # peer. Passed to init_process_group (gloo and NCCL both honour it) and to every group
    # made after it. It must exceed the longest legitimate wait between two collectives: one
    # rank writing its checkpoint shard or pruning old checkpoints, or fetching a remote
    # shard, while the others wait. 600 s is NCCL's own default; gloo's would be 30 minutes.
    collective_timeout_s: float = 600.0
    # After SIGUSR1/SIGTERM the run checkpoints at the next step boundary. If none comes
    # within this many seconds (a rank stuck in data loading or in a collective), the rank
    # exits anyway: 0 when nothing was trained since the last checkpoint, else 128 + the
    # signal number; a second signal before the boundary exits at once. Checkpoint writing
    # does not count against it. 120 s leaves the rest of SLURM's 300 s warning
    # (launch/*.slurm) for the checkpoint; raise it above the longest step.
    stop_grace_s: float = 120.0


@dataclass
class Config:
    name: str = "tiny_cpu"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def blend_entries(items: list[str]) -> list[tuple[float, str]]:
    """data.blend's (weight, path) pairs, weights as written; a malformed item raises a
    ConfigError naming it."""
    out = []
    for i, item in enumerate(items):
        weight, _, path = str(item).strip().partition(" ")
        try:
            w = float(weight)
        except ValueError:
            w = None
        path = path.strip()
        if w is None or not path:
            raise ConfigError(f"data.blend[{i}]: {item!r} is not 'WEIGHT PATH' (e.g. '0.7 data/web')")
        if not w > 0 or w == float("inf"):
            raise ConfigError(f"data.blend[{i}]: weight {weight} of {path} must be a positive number")
        out.append((w, path))
    paths = [p for _, p in out]
    for i, p in enumerate(paths):
        if p in paths[:i]:
            raise ConfigError(f"data.blend[{i}]: {p} is already blended as data.blend[{paths.index(p)}]; "
                              f"give it one entry with the summed weight")
    return out


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _one_of(value, key: str, choices) -> None:
    _check(value in choices, key, f"{value!r} is not one of {', '.join(map(repr, choices))}")


def default_layers(m: ModelConfig) -> list[str]:
    if m.arch == "vanilla":
        return ["softmax"] * m.num_layers
    if m.arch == "linear_1elu":
        return ["linear"] * m.num_layers
    # TransNormer: DiagAttention in the first half, NormAttention in the second (spec §1).
    _check(m.num_layers % 2 == 0, "model.num_layers",
           f"{m.num_layers} must be even (half DiagAttention, half NormAttention layers), or list "
           f"model.layers explicitly")
    half = m.num_layers // 2
    return ["diag"] * half + ["norm"] * half


def _validate_model(m: ModelConfig) -> None:
    _one_of(m.arch, "model.arch", ("transnormer", "vanilla", "linear_1elu"))
    _one_of(m.variant, "model.variant", ("t1", "t2"))
    _one_of(m.kernels, "model.kernels", ("auto", "torch", "triton"))
    for key in ("hidden_size", "num_layers", "num_heads", "block_size"):
        _check(getattr(m, key) > 0, f"model.{key}", f"must be positive, got {getattr(m, key)}")
    _check(m.vocab_size >= 0, "model.vocab_size", f"must be >= 0, got {m.vocab_size}")
    _check(m.hidden_size % m.num_heads == 0, "model.hidden_size",
           f"{m.hidden_size} is not divisible by model.num_heads={m.num_heads}")
    head_dim = m.hidden_size // m.num_heads
    _check(head_dim % 2 == 0, "model.hidden_size",
           f"head dimension {head_dim} must be even (LRPE rotates pairs)")
    _check(m.local_heads >= 0, "model.local_heads", f"must be >= 0, got {m.local_heads}")
    if m.local_heads:
        _check(m.hidden_size % m.local_heads == 0 and (m.hidden_size // m.local_heads) % 2 == 0, "model.local_heads",
               f"{m.local_heads} heads must split model.hidden_size={m.hidden_size} into heads of an even dimension")
    if m.layers:  # the loader has expanded a compact "diag*6,norm*6" into names
        for name in m.layers:
            _one_of(name, "model.layers", MIXERS)
        _check(len(m.layers) == m.num_layers, "model.layers",
               f"{len(m.layers)} layers listed, model.num_layers={m.num_layers}")
    else:
        m.layers = default_layers(m)
    if not m.mlp:
        m.mlp = "glu" if m.arch == "transnormer" else "relu"
    _one_of(m.mlp, "model.mlp", ("glu", "relu", "gelu"))
    if m.ffn_hidden_size == 0:
        m.ffn_hidden_size = int(8 / 3 * m.hidden_size) if m.mlp == "glu" else 4 * m.hidden_size
    _one_of(m.norm_position, "model.norm_position", ("pre", "post"))
    _one_of(m.positions, "model.positions", ("sinusoidal", "learned", "none"))
    _check(m.max_positions >= 0, "model.max_positions", f"must be >= 0, got {m.max_positions}")
    _one_of(m.init, "model.init", ("default", "bert"))
    _one_of(m.head, "model.head", HEADS)
    _one_of(m.pooling, "model.pooling", ("mean", "first"))
    # A causal LM must not see the future; a masked LM is trained to use both sides.
    _check(not (m.head == "lm" and not m.causal), "model.causal",
           "false with model.head=lm: next-token prediction needs causal attention")
    _check(not (m.head == "masked_lm" and m.causal), "model.causal",
           "true with model.head=masked_lm: the masked LM attends to both sides; set model.causal=false")
    if m.head == "classification":
        _check(m.num_classes >= 2, "model.num_classes",
               f"model.head=classification needs at least 2 classes, got {m.num_classes}")
    _one_of(m.classifier, "model.classifier", ("mlp", "linear", "two_tower"))
    _check(m.classifier == "mlp" or m.head == "classification", "model.classifier",
           f"{m.classifier!r} needs model.head=classification, not {m.head!r}")
    _one_of(m.norm, "model.norm", ("", "srms", "layernorm", "batch"))
    _one_of(m.input, "model.input", ("tokens", "pixels"))
    _check(m.pixel_std > 0, "model.pixel_std", f"must be positive, got {m.pixel_std}")
    if m.norm == "batch":
        # Batch statistics over the real tokens need the padding mask and a whole sample per rank.
        _check(m.head == "classification", "model.norm",
               f"batch needs model.head=classification (padded samples with a mask), not {m.head!r}")
        # Recomputation reruns the norm in the backward, which would update the running
        # statistics a second time.
        _check(not m.recompute_attention, "model.recompute_attention",
               "true with model.norm=batch: recomputing the attention would update the batch-norm running "
               "statistics twice; set model.recompute_attention=false")
    if m.input == "pixels":
        _check(m.head == "classification", "model.input",
               f"pixels needs model.head=classification, not {m.head!r}")
    for key in ("dropout", "attention_dropout"):
        v = getattr(m, key)
        _check(0.0 <= v < 1.0, f"model.{key}", f"must be in [0, 1), got {v}")


def _validate_objective(o: ObjectiveConfig) -> None:
    _check(0.0 < o.mask_prob < 1.0, "objective.mask_prob", f"must be in (0, 1), got {o.mask_prob}")
    for key in ("leave_unmasked_prob", "random_token_prob"):
        v = getattr(o, key)
        _check(0.0 <= v <= 1.0, f"objective.{key}", f"must be in [0, 1], got {v}")
    _check(o.leave_unmasked_prob + o.random_token_prob <= 1.0, "objective.random_token_prob",
           f"objective.leave_unmasked_prob + random_token_prob = "
           f"{o.leave_unmasked_prob + o.random_token_prob} exceeds 1")


def validate_config(cfg: Config, world_size: int | None = None) -> Config:
    """Check values and cross-field consistency; fill derived defaults. Returns cfg.

    world_size, when given, is checked against tensor * pipeline * data-parallel.
    """
    m, p, t, o, d = cfg.model, cfg.parallel, cfg.train, cfg.optim, cfg.data
    _validate_model(m)
    _validate_objective(cfg.objective)
    _check(p.tensor >= 1, "parallel.tensor", f"must be >= 1, got {p.tensor}")
    _check(p.pipeline >= 1, "parallel.pipeline", f"must be >= 1, got {p.pipeline}")
    _one_of(p.zero_stage, "parallel.zero_stage", (0, 1, 2, 3))
    _check(m.num_heads % p.tensor == 0, "parallel.tensor",
           f"model.num_heads={m.num_heads} is not divisible by tensor-parallel size {p.tensor}")
    _check((m.local_heads or m.num_heads) % p.tensor == 0, "parallel.tensor",
           f"model.local_heads={m.local_heads} is not divisible by tensor-parallel size {p.tensor}")
    _check(m.ffn_hidden_size % p.tensor == 0, "parallel.tensor",
           f"model.ffn_hidden_size={m.ffn_hidden_size} is not divisible by tensor-parallel size {p.tensor}")
    _check(not (p.pipeline > 1 and p.zero_stage > 1), "parallel.zero_stage",
           f"ZeRO stage {p.zero_stage} cannot be combined with pipeline parallelism "
           f"(parallel.pipeline={p.pipeline}); use zero_stage 0 or 1")
    _check(m.num_layers >= p.pipeline, "parallel.pipeline",
           f"{p.pipeline} stages for {m.num_layers} layers")

    _one_of(t.precision, "train.precision", ("fp32", "bf16"))
    # DeepSpeed's bf16 optimizer at ZeRO 0 under a pipeline cannot load its own checkpoints.
    _check(not (p.pipeline > 1 and t.precision == "bf16" and p.zero_stage == 0), "parallel.zero_stage",
           "bf16 with pipeline parallelism needs zero_stage 1 "
           "(DeepSpeed cannot resume bf16 pipeline checkpoints at ZeRO 0)")
    _one_of(o.schedule, "optim.schedule", ("inverse_sqrt", "polynomial", "cosine", "linear", "constant"))
    _check(o.decay_power > 0, "optim.decay_power", f"must be positive, got {o.decay_power}")
    _check(t.steps >= 1, "train.steps", f"must be >= 1, got {t.steps}")
    _check(t.micro_batch_size >= 1, "train.micro_batch_size", f"must be >= 1, got {t.micro_batch_size}")
    _check(t.global_batch_size % t.micro_batch_size == 0, "train.global_batch_size",
           f"{t.global_batch_size} is not a multiple of train.micro_batch_size={t.micro_batch_size}")
    _check(o.lr > 0, "optim.lr", f"must be positive, got {o.lr}")
    _check(0 <= o.min_lr <= o.lr, "optim.min_lr", f"must be in [0, optim.lr={o.lr}], got {o.min_lr}")
    _check(o.warmup_init_lr >= 0, "optim.warmup_init_lr", f"must be >= 0, got {o.warmup_init_lr}")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    _check(o.clip_grad >= 0, "optim.clip_grad", f"must be >= 0, got {o.clip_grad}")
    _check(len(o.betas) == 2, "optim.betas", f"needs two values, got {o.betas}")
    _check(all(0 <= b < 1 for b in o.betas), "optim.betas", f"each must be in [0, 1), got {list(o.betas)}")
    _check(o.eps > 0, "optim.eps", f"must be positive, got {o.eps}")
    _check(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _check(t.seed >= 0, "train.seed", f"must be >= 0, got {t.seed}")
    for key in ("eval_batches", "eval_interval", "save_interval", "log_interval"):
        _check(getattr(t, key) >= 0, f"train.{key}", f"must be >= 0, got {getattr(t, key)}")
    _check(bool(t.run_dir), "train.run_dir", "must not be empty")
    for key in ("collective_timeout_s", "stop_grace_s"):
        _check(getattr(t, key) > 0, f"train.{key}", f"must be positive, got {getattr(t, key)}")
    _one_of(t.wandb, "train.wandb", ("off", "online", "offline"))
    _check(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    if d.blend:
        _check(not d.path, "data.path", f"{d.path!r} and data.blend are both set; a run reads one dataset "
                                        f"(data.path) or a blend of several (data.blend)")
        blend_entries(d.blend)
    _check(d.seq_len >= 0, "data.seq_len", f"must be >= 0, got {d.seq_len}")
    if d.seq_len:
        check_sequence_length(cfg, d.seq_len)

    _check(p.context >= 1, "parallel.context", f"must be >= 1, got {p.context}")
    if is_lra_model(m):
        # Batch norm is synchronised over the data-parallel group only, and the pixel encoder
        # and two-tower head exist unsharded: these models train with data parallelism (and ZeRO).
        what = lra_model_keys(m)
        for key, size in (("tensor", p.tensor), ("pipeline", p.pipeline), ("context", p.context)):
            _check(size == 1, f"parallel.{key}",
                   f"{size} with {what} (an LRA model): only data parallelism (with any parallel.zero_stage) "
                   f"is supported for it; set parallel.{key}=1")
        _check(not (t.activation_checkpointing and m.norm == "batch"), "train.activation_checkpointing",
               f"true with model.norm=batch: recomputing the blocks would update the batch-norm running statistics "
               f"twice; set train.activation_checkpointing=false")
    if p.context > 1:
        # Softmax attention would need every slice's keys and values on every rank.
        _check("softmax" not in m.layers, "parallel.context",
               f"{p.context} with softmax attention in model.layers: it has no context-parallel form here; "
               f"use parallel.context=1 for the softmax baseline")
        _check(m.head != "classification", "parallel.context",
               f"{p.context} with model.head=classification: pooling over a split sequence is not supported; "
               f"use parallel.context=1")
    if world_size is not None:
        mp = p.tensor * p.pipeline * p.context
        _check(world_size % mp == 0, "parallel",
               f"world size {world_size} is not divisible by tensor ({p.tensor}) x pipeline "
               f"({p.pipeline}) x context ({p.context}) = {mp}")
        dp = world_size // mp
        per_update = t.micro_batch_size * dp
        _check(t.global_batch_size % per_update == 0, "train.global_batch_size",
               f"{t.global_batch_size} is not a multiple of micro_batch_size ({t.micro_batch_size}) "
               f"x data-parallel size ({dp})")
    return cfg


def lra_model_keys(m: ModelConfig) -> str:
    """The settings that make `m` one of the LRA models, as "model.norm=batch, ...", or ""."""
    keys = [("norm", "batch"), ("input", "pixels"), ("classifier", "two_tower")]
    return ", ".join(f"model.{k}={v}" for k, v in keys if getattr(m, k) == v)


def is_lra_model(m: ModelConfig) -> bool:
    return bool(lra_model_keys(m))


def check_sequence_length(cfg: Config, seq_len: int) -> None:
    """The DiagAttention block must tile the training sequence; a learned position table
    must cover it (its size defaults to the sequence length)."""
    m, cp = cfg.model, cfg.parallel.context
    if "diag" in m.layers:
        _check(seq_len % m.block_size == 0, "data.seq_len",
               f"sequence length {seq_len} cannot be tiled by model.block_size={m.block_size}; "
               f"use a multiple of {m.block_size}")
    # Each context-parallel rank holds seq_len / context tokens; DiagAttention needs no
    # exchange only when every slice is a whole number of its blocks.
    unit = cp * (m.block_size if "diag" in m.layers else 1)
    _check(seq_len % unit == 0, "parallel.context",
           f"{cp} slices of data.seq_len={seq_len} tokens"
           + (f" are not whole model.block_size={m.block_size} blocks" if "diag" in m.layers else " are unequal")
           + f"; use a sequence length that is a multiple of {unit}")
    tp = cfg.parallel.tensor
    if cfg.parallel.sequence and tp > 1:
        _check(seq_len % (cp * tp) == 0, "parallel.sequence",
               f"data.seq_len={seq_len} over context ({cp}) x tensor ({tp}) ranks: sequence parallelism splits "
               f"each context slice over the tensor-parallel ranks; use a multiple of {cp * tp}")
    if m.positions == "learned":
        if m.max_positions == 0:
            m.max_positions = seq_len
        _check(seq_len <= m.max_positions, "model.max_positions",
               f"{m.max_positions} learned positions cannot cover data.seq_len={seq_len}")
