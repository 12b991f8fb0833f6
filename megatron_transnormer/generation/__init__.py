"""Text generation with the causal LM's recurrent path (prefill once, then one state update
per token): sampling settings, batched and streaming generation. Imports only the model,
parallel, kernels and data packages; tools/generate.py is its command line."""
from .generate import generate, generate_tokens, left_pad
from .sampling import Sampling, filter_logits, next_tokens

__all__ = ["Sampling", "filter_logits", "generate", "generate_tokens", "left_pad", "next_tokens"]
