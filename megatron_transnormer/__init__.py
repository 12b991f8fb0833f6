"""megatron_transnormer: distributed pretraining of TransNormer language models."""
__version__ = "0.1.0"
