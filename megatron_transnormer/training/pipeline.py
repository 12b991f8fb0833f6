"""The model as a DeepSpeed PipelineModule, one pipeline layer per part of `model_parts`:

    TiedLayerSpec("embedding")   (input_ids, positions, ...) -> (hidden, positions, ...)   first stage
    PipeBlock(i)                 (hidden, positions, ...)    -> (hidden, positions, ...)   split evenly
    PipeFinalNorm                (pre-norm models)                                         last stage
    TiedLayerSpec("embedding")   PipeTable: appends this stage's copy of E (tied heads)    last stage
    PipeHead                     -> the head's output                                      last stage
    loss_fn                      PipelineLoss: the objective's loss sum, scaled            last stage

Every part is built by `model_parts`, so pipeline layer i has the single-stage model's
weights. Between layers and stages travels one tuple: the hidden states (or the token
ids, before the embedding) followed by the model's other inputs (`model_inputs`), so
positions and padding masks reach every stage. Masks travel as uint8: DeepSpeed's p2p
turns only a trailing bool tensor back into bool. The embedding table E is the LM
heads' output projection; DeepSpeed keeps a copy on the first and the last stage, sums
their gradients and marks the last stage's copy `ds_pipe_replicated`.
"""
from __future__ import annotations

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from torch import nn

from megatron_transnormer.model import Part, model_inputs, model_parts, table_part

MASKS = ("valid", "output_mask")


class Wire:
    """The tuple the pipeline passes: `x` (the token ids before the embedding, the hidden
    states after it) followed by the model's other inputs, masks as uint8."""

    def __init__(self, model_cfg):
        self.names = ("x", *model_inputs(model_cfg)[1:])

    def pack(self, values) -> tuple:
        return tuple(v.to(torch.uint8) if n in MASKS else v for n, v in zip(self.names, values, strict=True))

    def unpack(self, acts) -> dict:
        return {n: v.bool() if n in MASKS else v for n, v in zip(self.names, acts, strict=True)}


class _PipePart(nn.Module):
    """A part of `model_parts` as one pipeline layer."""

    def __init__(self, part: Part, wire: Wire):
        super().__init__()
        self.part = part.build()
        self.wire = wire

    def step(self, acts, fn) -> tuple:
        """Replace x by fn(x, inputs) and pass the inputs on."""
        x = self.wire.unpack(acts)
        return self.wire.pack((fn(x["x"], x), *(x[n] for n in self.wire.names[1:])))


class PipeEmbedding(_PipePart):
    def forward(self, acts):
        return self.step(acts, lambda ids, x: self.part(ids, x["positions"]))


class PipeBlock(_PipePart):
    def forward(self, acts):
        return self.step(acts, lambda h, x: self.part(h, x["positions"], x.get("valid")))


class PipeFinalNorm(_PipePart):
    def forward(self, acts):
        return self.step(acts, lambda h, x: self.part(h))


class PipeTable(_PipePart):
    """The last stage's copy of E (tied to the embedding's): appended to the tuple for the head."""

    def forward(self, acts):
        return (*acts, self.part.weight)


class PipeHead(_PipePart):
    def forward(self, acts):
        table = None
        if self.part.tied:
            acts, table = acts[:-1], acts[-1]
        x = self.wire.unpack(acts)
        return self.part(x["x"], x.get("valid"), x.get("output_mask"), table)


class PipelineLoss:
    """PipelineModule's loss_fn: the objective's loss sum of a micro-batch, times `scale`
    (set by the runtime per update). The unscaled sums are kept for reporting."""

    def __init__(self, objective):
        self.objective = objective
        self.scale = 1.0
        self.sums: list[torch.Tensor] = []

    def __call__(self, output, labels: torch.Tensor) -> torch.Tensor:
        loss_sum = self.objective.loss_sum(output, labels)
        self.sums.append(loss_sum.detach())
        return loss_sum * self.scale


_LAYERS = {"embedding": PipeEmbedding, "block": PipeBlock, "final_norm": PipeFinalNorm, "head": PipeHead}
_TABLE = "part.word.weight"  # E in PipeEmbedding and in PipeTable


def build_pipeline_module(model_cfg, layout, seed: int, activation_checkpointing: bool,
                          objective) -> PipelineModule:
    wire = Wire(model_cfg)
    layers = []
    for part in model_parts(model_cfg, seed):
        if part.role == "embedding":
            layers.append(TiedLayerSpec("embedding", PipeEmbedding, part, wire, tied_weight_attr=[_TABLE]))
            continue
        if part.tied:
            layers.append(TiedLayerSpec("embedding", PipeTable, table_part(model_cfg, seed), wire,
                                        tied_weight_attr=[_TABLE]))
        layers.append(LayerSpec(_LAYERS[part.role], part, wire))
    # DeepSpeed's data axis is megatron's data x context parallel (rank order tp-cp-dp-pp).
    topology = PipeModelDataParallelTopology(num_pp=layout.pp_size, num_mp=layout.tp_size,
                                             num_dp=layout.dp_size * layout.cp_size)
    # Balance the blocks only; the embedding then lands on the first stage, norm and head on the last.
    # no_grad: PipelineModule broadcasts the tied table in place at construction; recorded by
    # autograd, that broadcast would become part of the embedding's backward graph.
    with torch.no_grad():
        module = PipelineModule(layers=layers, topology=topology, loss_fn=PipelineLoss(objective),
                                partition_method=f"type:^{PipeBlock.__name__}$")
    for layer in module.modules():
        if isinstance(layer, PipeBlock):
            layer.part.activation_checkpointing = activation_checkpointing
    return module
