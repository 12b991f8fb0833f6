"""TransNormer ("The Devil in Linear Transformer", Qin et al. 2022) for Hugging Face transformers.

Self-contained: plain torch and transformers, no training package, no custom kernels. This
file and configuration_transnormer.py are copied beside the weights by the exporter
(tools/export_hf.py), so that

    AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)   # head = lm
    AutoModelForMaskedLM.from_pretrained(dir, trust_remote_code=True)   # head = masked_lm

load it anywhere. It is the inference form of the training package's model, the same
math written once more in plain torch, with the parameter names of its checkpoints (under
`transnormer.`, the heads' under `head.`); no dropout.

    embedding:  x = √d·E[token] (optional scale) + sinusoidal or learned position, LayerNorm (optional)
    a layer:    pre-norm   x = x + mixer(srms(x));  x = x + mlp(srms(x))
                post-norm  x = srms(x + mixer(x));  x = srms(x + mlp(x))
    mixers:     NormAttention  q = LRPE(φ(x W_q + b)), k = LRPE(φ(x W_k + b)), v = x W_v + b,
                               O = (Q Kᵀ ⊙ M) V (causal, M = λ^(t-s) with decay) or Q (Kᵀ V),
                               out = srms(concat heads(O)) W_o + b;  φ = elu (T1) or 1 + elu (T2)
                DiagAttention  attention inside blocks of `block_size` tokens, q scaled by D^-1/2,
                               LRPE on q and k with the position inside the block;
                               T2 softmax, T1 ReLU then srms over all heads
    srms(x) = x / (‖x‖₂ · d^(-1/2) + 1e-8), no parameters
    heads:      lm: logits = h Eᵀ;  masked_lm: LayerNorm(gelu(h W + b)) Eᵀ + bias

Decoding keeps a fixed-size recurrent state per layer (`TransNormerCache`): NormAttention's
[B, H, D, E] sum Σ λ^(t-s) k_s v_sᵀ, DiagAttention's keys and values of the current block,
and each row's next position; a new token costs the same however long the text is.
Prompts of different lengths are left-padded (attention_mask 0 first): each row's real tokens
sit at positions 0..len-1 as they would alone, and padding reaches no state.
"""
from __future__ import annotations

import array
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutputWithPast, MaskedLMOutput

from .configuration_transnormer import TransNormerConfig

EPS = 1e-8  # SimpleRMSNorm's epsilon, added outside the root
CHUNK = 64  # tokens per chunk of the causal NormAttention


def srms(x: torch.Tensor) -> torch.Tensor:
    """SimpleRMSNorm over the last dimension, computed in float32 at least."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf / (xf.norm(dim=-1, keepdim=True) * x.shape[-1] ** -0.5 + EPS)).to(x.dtype)


def sinusoidal(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """fairseq's sinusoidal embedding [..., N] -> [..., N, dim]: sin in the first half, cos in the
    second, frequencies 10000^(-i/(dim/2 - 1)); an odd dim gets a zero last column."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32, device=positions.device)
                     * -(math.log(10000.0) / (half - 1)))
    angle = positions.to(torch.float32).unsqueeze(-1) * freq
    table = torch.cat([angle.sin(), angle.cos()], dim=-1)
    return F.pad(table, (0, 1)) if dim % 2 else table


def decay_rates(num_heads: int, layer_index: int, num_layers: int) -> list[float]:
    """TransNormerLLM's per-head decay λ_h = exp(−2^(−8(h+1)/H) · (1 − l/(L−1) + 1e-5)), rounded to
    float32 as the training model holds them. Plain Python: models are built on the meta device."""
    depth = 1.0 - layer_index / max(num_layers - 1, 1) + 1e-5
    return array.array("f", [math.exp(-(2.0 ** (-8.0 * (h + 1) / num_heads)) * depth)
                             for h in range(num_heads)]).tolist()


def causal_linear_attention(q, k, v, decay: list[float] | None):
    """o_t = Σ_{s≤t} λ^(t-s) (q_t·k_s) v_s (λ = 1 without decay), chunk by chunk: the masked
    quadratic form inside a chunk, a running Kᵀ V state (float32 at least) across chunks.
    q, k [B, H, N, D], v [B, H, N, E] -> (O [B, H, N, E], the state after the last token)."""
    b, h, n, d = q.shape
    acc = torch.promote_types(q.dtype, torch.float32)
    lam = torch.tensor(decay if decay is not None else [1.0] * h, dtype=torch.float64, device=q.device).view(h, 1)
    state = q.new_zeros(b, h, d, v.shape[-1], dtype=acc)
    outs = []
    for start in range(0, n, CHUNK):
        qc, kc, vc = (t[:, :, start:start + CHUNK].to(acc) for t in (q, k, v))
        c = qc.shape[2]
        i = torch.arange(c, dtype=torch.float64, device=q.device)
        lag = i[:, None] - i[None, :]
        weight = torch.where(lag >= 0, lam.view(h, 1, 1) ** lag.clamp(min=0), 0.0).to(acc)  # [H, c, c]
        intra = ((qc @ kc.transpose(-1, -2)) * weight) @ vc
        inter = (qc * (lam ** (i + 1)).to(acc)[None, :, :, None]) @ state
        outs.append(intra + inter)
        entering = (kc * (lam ** (c - 1 - i)).to(acc)[None, :, :, None]).transpose(-1, -2) @ vc
        state = (lam ** c).to(acc).view(1, h, 1, 1) * state + entering
    out = torch.cat(outs, dim=2) if outs else v.new_zeros(v.shape)
    return out.to(v.dtype), state


def block_attention(q, k, v, block: int, causal: bool, kind: str, valid: torch.Tensor | None):
    """Attention only inside blocks of `block` columns. A query sees the keys of its block that
    are real (`valid` [B, N]; all when None), at or before it when causal, and always its own
    key, so that no row is empty. kind: softmax (T2) or relu (T1)."""
    b, h, n, _ = q.shape
    pad = (-n) % block
    real = torch.ones(b, n, dtype=torch.bool, device=q.device) if valid is None else valid
    real = F.pad(real, (0, pad), value=False)
    q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    nb = (n + pad) // block
    qb, kb, vb = (t.reshape(b, h, nb, block, t.shape[-1]) for t in (q, k, v))
    idx = torch.arange(block, device=q.device)
    keep = real.view(b, 1, nb, 1, block) | (idx[:, None] == idx[None, :])
    if causal:
        keep = keep & (idx[:, None] >= idx[None, :])
    logits = qb @ kb.transpose(-1, -2)
    if kind == "softmax":
        probs = torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)
    else:
        probs = torch.relu(logits.masked_fill(~keep, 0.0))
    return (probs @ vb).reshape(b, h, nb * block, -1)[:, :, :n]


def gather_columns(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t [B, H, N, X] at the columns index [B, M] of each row -> [B, H, M, X]."""
    return t.gather(2, index[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]))


class LRPE(nn.Module):
    """LRPE(x_t) = R(θ, t) H x_t: a Householder reflection H = I − 2uuᵀ (u fixed, saved with the
    model), then each interleaved pair (x_2i, x_2i+1) rotated by θ_i·t (θ learned)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.theta = nn.Parameter(10000.0 ** (-2.0 * torch.arange(head_dim // 2) / head_dim))
        u = torch.randn(head_dim)
        self.u = nn.Parameter(u / u.norm(), requires_grad=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, H, N, D], positions [B or 1, N]."""
        acc = torch.promote_types(x.dtype, torch.float32)
        xf, u = x.to(acc), self.u.to(acc)
        u = u / u.norm()
        xf = xf - 2.0 * (xf @ u).unsqueeze(-1) * u
        angle = positions.to(acc)[:, None, :, None] * self.theta.to(acc)
        cos, sin = angle.cos(), angle.sin()
        even, odd = xf[..., 0::2], xf[..., 1::2]
        return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2).to(x.dtype)


class Mixer(nn.Module):
    """What both token mixers share: the q, k, v and output projections and the head reshapes."""

    def __init__(self, config: TransNormerConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_heads
        self.head_dim = d // config.num_heads
        self.causal = config.causal
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))
        self.lrpe = LRPE(self.head_dim)

    def qkv(self, x):
        b, n, _ = x.shape
        return (p(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
                for p in (self.q_proj, self.k_proj, self.v_proj))

    @staticmethod
    def merge(o):
        b, h, n, e = o.shape
        return o.transpose(1, 2).reshape(b, n, h * e)


class NormAttention(Mixer):
    """Linear attention with a normalised output; state: the running Σ λ^(t-s) k_s v_sᵀ."""

    def __init__(self, config: TransNormerConfig, layer_index: int):
        super().__init__(config)
        self.variant = config.variant
        # Fixed by the layer's depth, not trained: recomputed here, never stored.
        self.decay = decay_rates(config.num_heads, layer_index, config.num_layers) if config.decay else None

    def _features(self, x, positions, valid):
        q, k, v = self.qkv(x)
        phi = F.elu if self.variant == "t1" else (lambda t: 1.0 + F.elu(t))
        q, k = self.lrpe(phi(q), positions), self.lrpe(phi(k), positions)
        if valid is not None:  # a zero key adds nothing to any sum: padding reaches no token
            k = k * valid[:, None, :, None].to(k.dtype)
        return q, k, v

    def forward(self, x, positions, valid, want_state: bool):
        q, k, v = self._features(x, positions, valid)
        if not self.causal:
            return self.out_proj(srms(self.merge(q @ (k.transpose(-1, -2) @ v)))), None
        o, state = causal_linear_attention(q, k, v, self.decay)
        return self.out_proj(srms(self.merge(o))), (state if want_state else None)

    def step(self, x, positions, state: torch.Tensor):
        """One token per row: S = λ S + k vᵀ (in place), o = q S."""
        q, k, v = self._features(x, positions, None)
        if self.decay is not None:
            state.mul_(torch.tensor(self.decay, dtype=state.dtype, device=state.device).view(1, -1, 1, 1))
        state.add_(k.to(state.dtype).transpose(-1, -2) @ v.to(state.dtype))
        return self.out_proj(srms(self.merge((q.to(state.dtype) @ state).to(v.dtype))))


class DiagAttention(Mixer):
    """Block-diagonal local attention; state: the keys and values of each row's current block,
    slot j holding the token at the position ≡ j (mod block)."""

    def __init__(self, config: TransNormerConfig, layer_index: int):
        super().__init__(config)
        self.block = config.block_size
        self.kind = "relu" if config.variant == "t1" else "softmax"

    def _features(self, x, positions):
        q, k, v = self.qkv(x)
        inside = positions % self.block  # positions restart in every block
        return self.lrpe(q * self.head_dim ** -0.5, inside), self.lrpe(k, inside), v

    def _out(self, o):
        o = self.merge(o)
        return self.out_proj(srms(o) if self.kind == "relu" else o)

    def forward(self, x, positions, valid, want_state: bool):
        q, k, v = self._features(x, positions)
        b, n = x.shape[:2]
        if not self.causal or valid is None:  # blocks by column, as the training forward cuts them
            o = block_attention(q, k, v, self.block, self.causal, self.kind, valid)
            lengths = torch.full((b,), n, device=x.device)
        else:
            # Blocks by position: each row turned so that its real tokens start at column 0,
            # attended, and turned back (padding before the tokens would shift the blocks).
            start = valid.int().argmax(dim=1)
            lengths = valid.sum(dim=1)
            columns = torch.arange(n, device=x.device)
            turn = (columns + start[:, None]) % n
            q, k, v = (gather_columns(t, turn) for t in (q, k, v))
            o = block_attention(q, k, v, self.block, True, self.kind, valid.gather(1, turn))
            o = gather_columns(o, (columns - start[:, None]) % n)
        if not want_state:
            return self._out(o), None
        # Slot j <- the token at (the start of the last block) + j; slots past the row's last
        # token are written before they are read.
        slots = ((lengths - lengths % self.block)[:, None] + torch.arange(self.block, device=x.device)).clamp(max=n - 1)
        return self._out(o), (gather_columns(k, slots), gather_columns(v, slots))

    def step(self, x, positions, state):
        """One token per row: written into its slot, then attention over the slots up to it."""
        keys, values = state
        q, k, v = self._features(x, positions)
        b = x.shape[0]
        slot = positions[:, 0] % self.block
        rows = torch.arange(b, device=x.device)
        keys[rows, :, slot] = k[:, :, 0]
        values[rows, :, slot] = v[:, :, 0]
        keep = (torch.arange(self.block, device=x.device) <= slot[:, None]).view(b, 1, 1, self.block)
        logits = (q @ keys.transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32))
        if self.kind == "softmax":
            probs = torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)
        else:
            probs = torch.relu(logits.masked_fill(~keep, 0.0))
        return self._out(probs.to(v.dtype) @ values)


class GLU(nn.Module):
    """w3(silu(w1 x) ⊙ w2 x)."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(d, hidden), nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class FFN(nn.Module):
    """fc2(act(fc1 x)), act = relu or gelu."""

    def __init__(self, d: int, hidden: int, activation: str):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.activation = F.relu if activation == "relu" else F.gelu

    def forward(self, x):
        return self.fc2(self.activation(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, config: TransNormerConfig, layer_index: int):
        super().__init__()
        self.post_norm = config.norm_position == "post"
        mixer = NormAttention if config.layers[layer_index] == "norm" else DiagAttention
        self.mixer = mixer(config, layer_index)
        d, hidden = config.hidden_size, config.ffn_hidden_size
        self.mlp = GLU(d, hidden) if config.mlp == "glu" else FFN(d, hidden, config.mlp)

    def _layer(self, x, mix):
        if self.post_norm:
            out, state = mix(x)
            x = srms(x + out)
            return srms(x + self.mlp(x)), state
        out, state = mix(srms(x))
        x = x + out
        return x + self.mlp(srms(x)), state

    def forward(self, x, positions, valid, want_state: bool):
        return self._layer(x, lambda h: self.mixer(h, positions, valid, want_state))

    def step(self, x, positions, state):
        return self._layer(x, lambda h: (self.mixer.step(h, positions, state), None))[0]


class Embedding(nn.Module):
    def __init__(self, config: TransNormerConfig):
        super().__init__()
        d = config.hidden_size
        self.word = nn.Embedding(config.vocab_size, d)
        self.scale = math.sqrt(d) if config.embedding_scale else None
        self.kind = config.positions
        self.position_table = nn.Embedding(config.max_positions, d) if config.positions == "learned" else None
        self.norm = nn.LayerNorm(d, eps=1e-5) if config.embedding_norm else None

    def forward(self, input_ids, positions):
        x = self.word(input_ids)
        if self.scale is not None:
            x = x * self.scale
        if self.kind == "sinusoidal":
            x = x + sinusoidal(positions, x.shape[-1]).to(x.dtype)
        elif self.kind == "learned":
            if int(positions.max()) >= self.position_table.num_embeddings:
                raise ValueError(f"position {int(positions.max())} is past the learned position table "
                                 f"(max_positions={self.position_table.num_embeddings})")
            x = x + self.position_table(positions).to(x.dtype)
        return self.norm(x) if self.norm is not None else x


class TransNormerCache:
    """The recurrent state of decoding: `states[i]` is layer i's (NormAttention: the [B, H, D, E]
    float32 sum; DiagAttention: (keys [B, H, block, D], values [B, H, block, E]) of the current
    block), `positions` [B] each row's next position, `columns` how many input columns (padding
    included) it has consumed. Its size is fixed once the prompt is in."""

    def __init__(self):
        self.states: list = []
        self.positions: torch.Tensor | None = None
        self.columns = 0

    @property
    def started(self) -> bool:
        return self.positions is not None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.columns

    def tensors(self) -> list[torch.Tensor]:
        flat = []
        for state in self.states:
            flat.extend(state if isinstance(state, tuple) else [state])
        return flat + ([self.positions] if self.positions is not None else [])

    def nbytes(self) -> int:
        """Bytes held: the same after the prompt and after any number of new tokens."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Rows in the order of `beam_idx` (beam search)."""
        pick = lambda t: t.index_select(0, beam_idx.to(t.device))  # noqa: E731
        self.states = [tuple(pick(t) for t in s) if isinstance(s, tuple) else pick(s) for s in self.states]
        self.positions = pick(self.positions)


def _output_with_cache(cls, cache, **fields):
    """The output with the cache under the name this transformers version reads back in
    generate (`cache` from 5.x, `past_key_values` before)."""
    names = {f.name for f in dataclasses.fields(cls)}
    fields["cache" if "cache" in names else "past_key_values"] = cache
    return cls(**fields)


def _prompt_positions(attention_mask: torch.Tensor | None, shape, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(positions [B or 1, N], valid [B, N] or None) of a batch: each row's real tokens at
    positions 0..len-1. Real tokens must be one run per row (left or right padding)."""
    if attention_mask is None or bool(attention_mask.all()):
        return torch.arange(shape[1], device=device).unsqueeze(0), None
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != tuple(shape):
        raise ValueError(f"attention_mask must be [B, N] = {list(shape)}, got {list(attention_mask.shape)}")
    valid = attention_mask.bool()
    starts = (valid[:, 1:] & ~valid[:, :-1]).sum(dim=1) + valid[:, 0].long()
    if (starts != 1).any():
        raise ValueError("attention_mask must mark one run of real tokens (1) per row, padding (0) before or "
                         "after it")
    return (valid.long().cumsum(dim=1) - 1).clamp(min=0), valid


def _masked_lm_inputs(input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(positions, valid) of masked-LM samples: positions are columns, as in training, and
    attention_mask only marks the padding (its keys reach no token)."""
    valid = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool()
    return torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0), valid


class TransNormerPreTrainedModel(PreTrainedModel):
    config_class = TransNormerConfig
    base_model_prefix = "transnormer"
    _no_split_modules = ["Block"]
    # Decoding carries a recurrent state of its own (TransNormerCache), not a key/value cache.
    _is_stateful = True

    def _init_weights(self, module):
        """For models made from a config (exports load every weight)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class TransNormerModel(TransNormerPreTrainedModel):
    """Embedding -> layers -> final srms (pre-norm models) -> hidden states [B, N, d]."""

    def __init__(self, config: TransNormerConfig):
        super().__init__(config)
        self.embedding = Embedding(config)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.final_norm = config.norm_position == "pre"
        self.post_init()

    def get_input_embeddings(self):
        return self.embedding.word

    def set_input_embeddings(self, value):
        self.embedding.word = value

    def run(self, input_ids, positions, valid, want_state: bool = False):
        """-> (hidden [B, N, d], every layer's state after the last column, or None)."""
        x = self.embedding(input_ids, positions)
        states = []
        for block in self.layers:
            x, state = block(x, positions, valid, want_state)
            states.append(state)
        return (srms(x) if self.final_norm else x), (states if want_state else None)

    def step(self, input_ids, cache: TransNormerCache):
        """One token per row ([B, 1]) at the cache's positions -> hidden [B, 1, d]; the cache advances."""
        positions = cache.positions[:, None]
        x = self.embedding(input_ids, positions)
        for block, state in zip(self.layers, cache.states):
            x = block.step(x, positions, state)
        cache.positions = cache.positions + 1
        cache.columns += 1
        return srms(x) if self.final_norm else x

    def forward(self, input_ids, attention_mask=None, **kwargs) -> BaseModelOutput:
        """input_ids [B, N] -> the last hidden states [B, N, d] (causal models: padding before or after)."""
        if self.config.causal:
            positions, valid = _prompt_positions(attention_mask, input_ids.shape, input_ids.device)
        else:
            positions, valid = _masked_lm_inputs(input_ids, attention_mask)
        return BaseModelOutput(last_hidden_state=self.run(input_ids, positions, valid)[0])


class TransNormerForCausalLM(TransNormerPreTrainedModel, GenerationMixin):
    """Next-token logits through the tied embedding table; `generate` decodes recurrently."""

    def __init__(self, config: TransNormerConfig):
        super().__init__(config)
        if config.head != "lm":
            raise ValueError(f"TransNormerForCausalLM needs head=lm, this config has head={config.head} "
                             f"(AutoModelForMaskedLM loads a masked LM)")
        self.transnormer = TransNormerModel(config)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its TransNormerCache itself

    def get_input_embeddings(self):
        return self.transnormer.embedding.word

    def set_input_embeddings(self, value):
        self.transnormer.embedding.word = value

    def get_output_embeddings(self):
        return None  # the logits use the input table itself: nothing to tie

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                cache: TransNormerCache | None = None, past_key_values: TransNormerCache | None = None,
                use_cache: bool | None = None, labels: torch.LongTensor | None = None, **kwargs):
        """input_ids [B, N] -> logits [B, N, vocab]. With a started cache the tokens continue it
        (one state update per token; attention_mask is then not needed: new tokens are real).
        use_cache=True returns the cache after the last column (left padding only)."""
        cache = cache if cache is not None else past_key_values
        if cache is not None and cache.started:
            hidden = torch.cat([self.transnormer.step(input_ids[:, t:t + 1], cache)
                                for t in range(input_ids.shape[1])], dim=1)
        else:
            positions, valid = _prompt_positions(attention_mask, input_ids.shape, input_ids.device)
            want_state = bool(use_cache) or cache is not None
            if want_state and valid is not None and not bool(valid[:, -1].all()):
                raise ValueError("decoding needs left padding: every row's last column must be a real token "
                                 "(tokenizer.padding_side = 'left')")
            hidden, states = self.transnormer.run(input_ids, positions, valid, want_state)
            if want_state:
                cache = cache if cache is not None else TransNormerCache()
                cache.states = states
                cache.positions = positions[:, -1].expand(input_ids.shape[0]) + 1
                cache.columns = input_ids.shape[1]
        logits = F.linear(hidden, self.transnormer.embedding.word.weight)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return _output_with_cache(CausalLMOutputWithPast, cache, loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, use_cache=True, **kwargs):
        """The columns the cache has not consumed yet (the whole prompt first, then the new token)."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        inputs = {"use_cache": use_cache, "attention_mask": attention_mask}
        if cache is not None and cache.started:
            input_ids = input_ids[:, cache.columns:]
            inputs["cache"] = cache
        inputs["input_ids"] = input_ids
        return inputs


class TransNormerForMaskedLM(TransNormerPreTrainedModel):
    """RoBERTa's LM head over a bidirectional TransNormer: logits at every position."""

    def __init__(self, config: TransNormerConfig):
        super().__init__(config)
        if config.head != "masked_lm":
            raise ValueError(f"TransNormerForMaskedLM needs head=masked_lm, this config has head={config.head}")
        self.transnormer = TransNormerModel(config)
        self.head = MaskedLMHead(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.transnormer.embedding.word

    def get_output_embeddings(self):
        return None

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, **kwargs):
        """input_ids [B, N] (attention_mask 0 on padding) -> logits [B, N, vocab]; labels: -100 where
        nothing is predicted."""
        hidden, _ = self.transnormer.run(input_ids, *_masked_lm_inputs(input_ids, attention_mask))
        logits = self.head(hidden, self.transnormer.embedding.word.weight)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=logits)


class MaskedLMHead(nn.Module):
    def __init__(self, config: TransNormerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=1e-5)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden, embedding_weight):
        return F.linear(self.norm(F.gelu(self.dense(hidden))), embedding_weight, self.bias)
