"""Hugging Face transformers form of TransNormer: configuration and model classes written in
plain torch (configuration_transnormer.py, modeling_transnormer.py: the two files an export
carries), the tokenizer conversion (tokenizer.py) and the exporter (export.py;
tools/export_hf.py is its command line).

Importing this package registers the classes with transformers' Auto classes, so that
`AutoModelForCausalLM.from_pretrained(dir)` loads an export without `trust_remote_code`
where the package is installed.
"""
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

from .configuration_transnormer import TransNormerConfig
from .export import ExportError, export
from .modeling_transnormer import TransNormerCache, TransNormerForCausalLM, TransNormerForMaskedLM, TransNormerModel
from .tokenizer import TokenizerExportError, hf_tokenizer

AutoConfig.register(TransNormerConfig.model_type, TransNormerConfig, exist_ok=True)
AutoModelForCausalLM.register(TransNormerConfig, TransNormerForCausalLM, exist_ok=True)
AutoModelForMaskedLM.register(TransNormerConfig, TransNormerForMaskedLM, exist_ok=True)

__all__ = ["ExportError", "TokenizerExportError", "TransNormerCache", "TransNormerConfig", "TransNormerForCausalLM",
           "TransNormerForMaskedLM", "TransNormerModel", "export", "hf_tokenizer"]
