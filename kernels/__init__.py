"""Attention kernels for TransNormer: Triton on CUDA, PyTorch references elsewhere.

Standalone: nothing here imports `megatron_transnormer`.
"""
from .reference import diag_attention, norm_attention, norm_attention_quadratic, simple_rms_norm

__all__ = ["diag_attention", "norm_attention", "norm_attention_quadratic", "simple_rms_norm"]
