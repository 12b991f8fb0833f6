"""A trained model as a Hugging Face model directory:

    export(config, weights, tokenizer, out_dir)

config: the training config as a dict (what a checkpoint carries, after validation);
weights: the model's state dict with the canonical parameter names; tokenizer: the
dataset's. Writes config.json (with `auto_map`), model.safetensors,
generation_config.json, the tokenizer files (tokenizer.py) and the two code files,
so that `AutoModelForCausalLM` (head lm) or `AutoModelForMaskedLM` (head masked_lm)
loads it with `trust_remote_code=True` and nothing of this package installed.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from .configuration_transnormer import TransNormerConfig
from .modeling_transnormer import TransNormerForCausalLM, TransNormerForMaskedLM
from .tokenizer import save_tokenizer

CODE_FILES = ("configuration_transnormer.py", "modeling_transnormer.py")
MODEL_CLASSES = {"lm": (TransNormerForCausalLM, "AutoModelForCausalLM"),
                 "masked_lm": (TransNormerForMaskedLM, "AutoModelForMaskedLM")}
# The training config's model settings the exported network keeps; the others shape only
# training (dropout, init, kernels) or are checked below (arch, norm, input).
MODEL_KEYS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "layers", "variant", "mlp", "ffn_hidden_size",
              "norm_position", "block_size", "causal", "positions", "max_positions", "embedding_scale",
              "embedding_norm", "decay", "head")


class ExportError(ValueError):
    """A model this exporter does not cover, or weights that do not fit it; the message names the setting or key."""


def hf_config(model: dict, tokenizer) -> TransNormerConfig:
    """The TransNormerConfig of a validated `model` config section, with the tokenizer's special ids."""
    if model.get("arch") != "transnormer":
        raise ExportError(f"model.arch={model.get('arch')!r}: only TransNormer models are exported "
                          f"(the softmax and 1+elu baselines are not)")
    if model.get("head") not in MODEL_CLASSES:
        raise ExportError(f"model.head={model.get('head')!r}: exported heads are {', '.join(MODEL_CLASSES)}")
    if model.get("norm", "") not in ("", "srms"):  # "": the family's, SimpleRMSNorm for TransNormer
        raise ExportError(f"model.norm={model['norm']!r}: exported models use SimpleRMSNorm")
    if model.get("input", "tokens") != "tokens":
        raise ExportError(f"model.input={model['input']!r}: exported models read tokens")
    other = sorted(set(model.get("layers", [])) - {"diag", "norm"})
    if other:
        raise ExportError(f"model.layers holds {', '.join(other)}: exported layers are diag and norm")
    if tokenizer.vocab_size != model["vocab_size"]:
        raise ExportError(f"the tokenizer has {tokenizer.vocab_size} ids, model.vocab_size={model['vocab_size']}")
    ids = lambda i: i if i >= 0 else None  # noqa: E731
    causal_lm = model["head"] == "lm"
    special = dict(eos_token_id=tokenizer.eod_id, pad_token_id=ids(tokenizer.pad_id),
                   bos_token_id=tokenizer.eod_id if causal_lm else ids(tokenizer.bos_id))
    model_class, _ = MODEL_CLASSES[model["head"]]
    return TransNormerConfig(**{k: model[k] for k in MODEL_KEYS}, architectures=[model_class.__name__], **special)


def hf_state_dict(weights: dict) -> dict[str, torch.Tensor]:
    """The project's parameter names -> the exported model's: the network under `transnormer.`,
    the masked LM's head as it is. Entries that are not tensors (megatron's empty `_extra_state`) go."""
    return {(name if name.startswith("head.") else f"transnormer.{name}"): tensor
            for name, tensor in weights.items() if isinstance(tensor, torch.Tensor)}


def build_hf_model(config: dict, weights: dict, tokenizer):
    """The exported model's class holding `weights`: -> (model, its Auto class name)."""
    model_config = hf_config(config["model"], tokenizer)
    model_class, auto_class = MODEL_CLASSES[model_config.head]
    model = model_class(model_config)
    state = hf_state_dict(weights)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ExportError(f"the weights do not fit the model the config describes: missing {missing[:4]}, "
                          f"unexpected {unexpected[:4]}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ExportError(f"weight {name}: shape {list(tensor.shape)}, the config says "
                              f"{list(expected[name].shape)}")
    model.load_state_dict(state, strict=True)
    return model.eval(), auto_class


def export(config: dict, weights: dict, tokenizer, out_dir: str | os.PathLike) -> list[str]:
    """Writes the model directory (module docstring); returns its file names."""
    model, auto_class = build_hf_model(config, weights, tokenizer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.config.auto_map = {"AutoConfig": "configuration_transnormer.TransNormerConfig",
                             auto_class: f"modeling_transnormer.{type(model).__name__}"}
    model.save_pretrained(out, safe_serialization=True)
    for name in CODE_FILES:
        shutil.copyfile(Path(__file__).with_name(name), out / name)
    learned = model.config.positions == "learned"
    save_tokenizer(tokenizer, model.config.head, str(out), model.config.max_positions if learned else None)
    return sorted(p.name for p in out.iterdir())
