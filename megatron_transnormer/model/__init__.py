"""TransNormer and its baselines on megatron-core tensor-parallel layers (no DeepSpeed, no
objectives, no training loop here). `spec.py` describes a model as parts; `transnormer.py`
runs them in one process; the NormAttention/DiagAttention layers are in `attention.py`,
their mixing math in the top-level `kernels/` folder (imported as `transnormer_kernels`)."""
from .accounting import count_parameters, flops_per_token
from .attention import MIXERS, DiagAttention, LinearEluAttention, NormAttention, SoftmaxAttention
from .blocks import Block, BlockSpec
from .decoding import DecodeCache, prompt_positions
from .embedding import Embedding, WordTable, sinusoidal
from .heads import ClassificationHead, LMHead, MaskedLMHead, build_head, vocab_logits
from .lrpe import LRPE
from .norms import SimpleRMSNorm
from .spec import Part, block_specs, model_inputs, model_parts, table_part
from .transnormer import TransNormerModel, build_block, build_model

__all__ = ["Block", "BlockSpec", "ClassificationHead", "DecodeCache", "DiagAttention", "Embedding", "LMHead", "LRPE",
           "LinearEluAttention", "MIXERS", "MaskedLMHead", "NormAttention", "Part", "SimpleRMSNorm",
           "SoftmaxAttention", "TransNormerModel", "WordTable", "block_specs", "build_block", "build_head", "build_model",
           "count_parameters", "flops_per_token", "model_inputs", "model_parts", "prompt_positions", "sinusoidal", "table_part",
           "vocab_logits"]
