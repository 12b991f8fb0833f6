"""Attention kernels for TransNormer: Triton on CUDA, PyTorch references elsewhere.

Imported as `transnormer_kernels` (the project installs this folder under that name).
Standalone: nothing here imports `megatron_transnormer`. Every public function takes
`backend`: "auto" (Triton for CUDA tensors when available, else the reference),
"torch" (always the reference) or "triton" (required; an error if unavailable).
"""
from .dispatch import diag_attention, norm_attention, simple_rms_norm
from .reference import norm_attention_quadratic

__all__ = ["diag_attention", "norm_attention", "norm_attention_quadratic", "simple_rms_norm"]
