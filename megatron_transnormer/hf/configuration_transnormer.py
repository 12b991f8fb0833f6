"""The Hugging Face configuration of an exported TransNormer (causal LM or masked LM).

Self-contained (transformers only): this file is copied beside the weights, so that
`AutoConfig.from_pretrained(dir, trust_remote_code=True)` works without the training
package. The fields are those of the training config's `model` section that shape the
network; `megatron_transnormer.hf.export` fills them from a checkpoint's config.
"""
from __future__ import annotations

from transformers import PretrainedConfig

MIXERS = ("diag", "norm")
MLPS = ("glu", "relu", "gelu")
HEADS = ("lm", "masked_lm")


class TransNormerConfig(PretrainedConfig):
    model_type = "transnormer"
    attribute_map = {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads"}

    def __init__(self, vocab_size: int = 0, hidden_size: int = 512, num_layers: int = 6, num_heads: int = 8,
                 layers: list[str] | None = None, variant: str = "t2", mlp: str = "glu", ffn_hidden_size: int = 1365,
                 norm_position: str = "pre", block_size: int = 64, causal: bool = True,
                 positions: str = "sinusoidal", max_positions: int = 0, embedding_scale: bool = True,
                 embedding_norm: bool = False, decay: bool = False, head: str = "lm", **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.layers = list(layers) if layers is not None else ["diag"] * (num_layers // 2) + ["norm"] * (
            num_layers - num_layers // 2)
        self.variant = variant
        self.mlp = mlp
        self.ffn_hidden_size = ffn_hidden_size
        self.norm_position = norm_position
        self.block_size = block_size
        self.causal = causal
        self.positions = positions
        self.max_positions = max_positions
        self.embedding_scale = embedding_scale
        self.embedding_norm = embedding_norm
        self.decay = decay
        self.head = head
        if positions == "learned":  # the context length tools such as lm-evaluation-harness look for
            kwargs.setdefault("max_position_embeddings", max_positions)
        # The output projection is the embedding table by construction (no separate weight).
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
        self.check()

    def check(self) -> None:
        """A ValueError naming the field for a setting this implementation does not have."""
        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise ValueError(f"TransNormerConfig.{key}={getattr(self, key)!r}: {what}")

        need(len(self.layers) == self.num_layers, "layers", f"needs num_layers={self.num_layers} entries")
        need(all(m in MIXERS for m in self.layers), "layers", f"every entry must be one of {', '.join(MIXERS)}")
        need(self.variant in ("t1", "t2"), "variant", "must be t1 or t2")
        need(self.mlp in MLPS, "mlp", f"must be one of {', '.join(MLPS)}")
        need(self.norm_position in ("pre", "post"), "norm_position", "must be pre or post")
        need(self.positions in ("sinusoidal", "learned", "none"), "positions", "must be sinusoidal, learned or none")
        need(self.positions != "learned" or self.max_positions > 0, "max_positions", "learned positions need > 0")
        need(self.head in HEADS, "head", f"must be one of {', '.join(HEADS)}")
        need(self.head == "masked_lm" or self.causal, "causal", "the causal LM head needs causal=True")
        need(self.hidden_size % self.num_heads == 0, "hidden_size", f"must be divisible by num_heads={self.num_heads}")
        need(not (self.decay and not self.causal), "decay", "decay is defined for causal models only")
