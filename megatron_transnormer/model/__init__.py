"""TransNormer and its baselines on megatron-core tensor-parallel layers (no DeepSpeed here)."""
from .accounting import count_parameters, flops_per_token
from .attention import DiagAttention, LinearEluAttention, NormAttention, SoftmaxAttention
from .blocks import Block, build_block
from .embedding import Embedding, lm_head, sinusoidal_positions
from .language_model import TransNormerLM, build_embedding, build_final_norm, build_model
from .lrpe import LRPE
from .norms import SimpleRMSNorm

__all__ = ["Block", "DiagAttention", "Embedding", "LRPE", "LinearEluAttention", "NormAttention",
           "SimpleRMSNorm", "SoftmaxAttention", "TransNormerLM", "build_block", "build_embedding",
           "build_final_norm", "build_model", "count_parameters", "flops_per_token", "lm_head",
           "sinusoidal_positions"]
