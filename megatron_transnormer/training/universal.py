"""Layout-free checkpoints: a checkpoint of any layout as whole tensors under canonical
names, loadable by any other layout (TP, PP, DP, ZeRO 0-3, CP), optimizer state included.

    export(rt, out, client_state, rank_state)  collective, on the layout that loaded a checkpoint
    load(rt, path) -> (client_state, rank_state)  collective, on any layout (runtime.load_checkpoint)
    read_model(path) -> (config dict, state dict)  one process, no engine (generation, evaluation)

A layout-free checkpoint is a directory:

    meta.json              {"format": "layout-free", "version", "step", "model": the settings
                           that shape the tensors, "data_blend": data.blend's normalised
                           weights ([]: one dataset), "source": the layout it was converted from,
                           "model_only", "checksums"}
    config.yaml            the run's resolved config
    model.safetensors      canonical name -> the full fp32 tensor (the names of the
                           single-process model's state dict, model/spec.py), master weights
                           where the run kept fp32 copies of bf16 weights
    optimizer.safetensors  "<name>.exp_avg", "<name>.exp_avg_sq": Adam's full moments
    state.json             Adam's step count, the LR schedule's state, the loop's client
                           state (step, ...), the per-rank state every rank shares (the data
                           stream position, which TokenStream continues on any data-parallel
                           size), DeepSpeed's step counters
    checksums.json         as every checkpoint (checkpoint.publish_directory), published by rename

`--model-only` exports hold meta.json, config.yaml and model.safetensors. Nothing is
pickled: tensors are safetensors, the rest JSON and YAML. Frozen parameters (no optimizer
holds them) are in model.safetensors, with zero moments.

RNG states are per rank of the layout that saved them (dropout streams per pipeline stage,
data- and context-parallel rank), so they do not carry over to another layout: a rank
that loads a layout-free checkpoint seeds its generators from (train.seed, step, its
pipeline, data and context rank), as a fresh run seeds them from (train.seed, its ranks).
With dropout off nothing draws from them and a resumed run continues the loss curve of
the uninterrupted one.

Why not DeepSpeed's universal checkpoints (`deepspeed.checkpoint.ds_to_universal`, then
`"checkpoint": {"load_universal": true}`), tried on this stack (DeepSpeed 0.19.8, CPU, gloo):
  * conversion fails on our checkpoints: megatron-core's linear layers keep an
    `_extra_state` entry (None) in the module state dict and ds_to_universal calls
    `.float()` on every entry; it also asserts a `universal_checkpoint_info` declaration;
  * it reads only ZeRO optimizer files, and the engine restores a universal checkpoint only
    inside the ZeRO optimizers (`_load_zero_checkpoint`) while skipping the module state:
    a ZeRO 0 source has nothing to convert and a ZeRO 0 target (the default stage, and
    the usual one with pipelining) would load nothing;
  * parameters are keyed by the engine module's names, which differ between our
    PipelineModule ("3.part.mixer.q_proj.weight", "tied_modules.embedding.part.word.weight")
    and the single-stage model ("layers.2.mixer.q_proj.weight"), so a change of pipeline
    size cannot be expressed;
  * it unpickles every file (weights_only=False), which this project never does
    (deepspeed_loading.py).
What it offers that we need, gathering ZeRO partitions and writing them back, DeepSpeed
exposes per parameter (`safe_get_full_fp32_param`, `safe_set_full_optimizer_state`, ...);
this module uses those on a live engine: the source layout loads its checkpoint through the
verified, weights-only path of checkpoint.py, every parameter is gathered over data
parallelism (DeepSpeed) and tensor parallelism (its megatron `partition_dim`), and the
target layout slices each tensor the way `initialize_parameters` does
(`full.chunk(tp)[tp_rank]` along that dimension) and writes it into whatever DeepSpeed
wrapped the AdamW in.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from megatron.core import parallel_state

from . import checkpoint, rng
from .deepspeed_loading import CheckpointError

FORMAT, VERSION = checkpoint.LAYOUT_FREE, 1
MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, CONFIG_FILE = ("model.safetensors", "optimizer.safetensors", "state.json",
                                                       "config.yaml")
MOMENTS = ("exp_avg", "exp_avg_sq")  # Adam's state tensors, next to its "step"


def is_layout_free(path) -> bool:
    """Whether `path` is a layout-free checkpoint (its meta.json says so)."""
    try:
        meta = checkpoint.read_meta(path)
    except ValueError:
        return False  # a damaged meta.json: the regular load reports it
    return isinstance(meta, dict) and meta.get("format") == FORMAT


# --------------------------------------------------------------- parameters by canonical name

def local_parameters(engine, layout) -> list[tuple[str, torch.nn.Parameter]]:
    """(canonical name, parameter) of this rank's parameters, in the engine module's order.

    The single-stage model's names are canonical. A PipelineModule names a layer's
    parameters "<layer index>.part.<name in the part>" and a tied layer's
    "tied_modules.<key>.part.<...>"; its layer specs carry the `Part` each layer was built
    from, whose name is the canonical prefix (model/spec.py)."""
    module = engine.module
    if layout.pp_size == 1:
        return list(module.named_parameters())
    specs = module._layer_specs
    tied = {s.key: s for s in specs if hasattr(s, "key")}
    out = []
    for name, param in module.named_parameters():
        head, _, rest = name.partition(".")
        spec = None
        if head == "tied_modules":
            key, _, rest = rest.partition(".")
            spec = tied.get(key)
        elif head.isdigit() and int(head) < len(specs):
            spec = specs[int(head)]
        if spec is None or not rest.startswith("part.") or not spec.module_args:
            raise RuntimeError(f"pipeline parameter {name!r} does not follow <layer>.part.<name>: "
                               f"its canonical name is unknown")
        out.append((f"{spec.module_args[0].name}.{rest[len('part.'):]}", param))
    return out


def _local_shape(param) -> torch.Size:
    return torch.Size(getattr(param, "ds_shape", param.shape))  # ZeRO 3 keeps the shape in ds_shape


def _split_dim(param, layout) -> int | None:
    """The dimension TP splits param along (megatron's attributes, set by initialize_parameters)."""
    if layout.tp_size > 1 and getattr(param, "tensor_model_parallel", False):
        return int(param.partition_dim)
    return None


def _gather_tp(value: torch.Tensor, param, layout) -> torch.Tensor:
    """The full tensor (on the CPU) from every TP rank's shard (collective over the TP group,
    on the rank's device: NCCL gathers only GPU tensors)."""
    dim = _split_dim(param, layout)
    if dim is None:
        return value
    local = value.to(layout.device).contiguous()
    parts = [torch.empty_like(local) for _ in range(layout.tp_size)]
    dist.all_gather(parts, local, group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=dim).cpu()


def _shard(full: torch.Tensor, param, layout) -> torch.Tensor:
    """This TP rank's shard of a full tensor: the slicing `initialize_parameters` does."""
    dim = _split_dim(param, layout)
    return full if dim is None else full.chunk(layout.tp_size, dim=dim)[layout.tp_rank]


def _full_shape(param, layout) -> torch.Size:
    shape = list(_local_shape(param))
    if (dim := _split_dim(param, layout)) is not None:
        shape[dim] *= layout.tp_size
    return torch.Size(shape)


# ------------------------------------------------- fp32 values and Adam state behind DeepSpeed

def _frozen(param, value: torch.Tensor | None) -> torch.Tensor | None:
    """Read (value None) or write a parameter no optimizer holds. ZeRO 3 partitions it all
    the same: gathered over data parallelism for the read or write (collective there)."""
    if not hasattr(param, "ds_id"):
        if value is None:
            return param.detach().float().cpu()
        with torch.no_grad():
            param.data.copy_(value.to(param.dtype))
        return None
    from deepspeed.runtime.zero import GatheredParameters
    with GatheredParameters([param], modifier_rank=None if value is None else 0):
        if value is None:
            return param.detach().float().cpu().clone()
        with torch.no_grad():
            param.data.copy_(value.to(param.dtype))
    return None


class _Optimizer:
    """This rank's fp32 values and Adam state of its parameters (its TP shard, whole over
    data parallelism), whatever DeepSpeed wrapped the torch AdamW in:

      * ZeRO 0, fp32: the AdamW itself, keyed by the model's parameters;
      * ZeRO 0, bf16: FP16_UnfusedOptimizer, fp32 master copies keyed like the bf16 ones;
      * ZeRO 1/2: flat fp32 partitions; each parameter's fragment through `_hp_mapping`;
      * ZeRO 3: flat fp32 partitions of partitioned parameters, through the optimizer.
    `get` is collective over the data-parallel group under ZeRO (DeepSpeed gathers the
    partitions); `put` is local."""

    def __init__(self, rt):
        from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        self.rt, self.wrapper, self.adam = rt, rt.engine.optimizer, rt._optimizer
        if isinstance(self.wrapper, DeepSpeedZeroOptimizer_Stage3):
            self.kind = "zero3"
        elif isinstance(self.wrapper, DeepSpeedZeroOptimizer):
            self.kind = "zero12"
        elif isinstance(self.wrapper, FP16_UnfusedOptimizer):
            self.kind = "unfused"
            self.master = {id(low): master for lows, masters in zip(self.wrapper.fp16_groups, self.wrapper.fp32_groups)
                           for low, master in zip(lows, masters, strict=True)}
        elif self.wrapper is self.adam:
            self.kind = "plain"
        else:
            raise RuntimeError(f"layout-free checkpoints do not know DeepSpeed's {type(self.wrapper).__name__}")

    def has_state(self) -> bool:
        return bool(self.adam.state)

    def step(self) -> int | None:
        """Adam's step count; every parameter is updated by every step (AdamW's per-tensor
        counts agree, checked), None before the first step."""
        steps = {int(s["step"]) for s in self.adam.state.values() if "step" in s}
        if len(steps) > 1:
            raise RuntimeError(f"Adam's step counts differ between parameters ({sorted(steps)}): "
                               f"a layout-free checkpoint records one")
        return steps.pop() if steps else None

    def _link_fragments(self) -> None:
        """Point every ZeRO 1/2 parameter's fragment at the current flat Adam state (DeepSpeed
        links them lazily after its first step; a freshly loaded or created state is not yet)."""
        from deepspeed.utils import lazy_init_hp_params_optimizer_state
        w = self.wrapper
        for i, _ in enumerate(w.optimizer.param_groups):
            lazy_init_hp_params_optimizer_state(w.bit16_groups[i], w.single_partition_of_fp32_groups[i],
                                                w.optimizer.state)
        w._hp_optimizer_states_linked = True

    def get(self, param, moments: bool) -> tuple[torch.Tensor, dict]:
        """(fp32 value, {moment: tensor}) of this rank's shard of param; moments empty when
        not asked for or before the first step."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
        shape = _local_shape(param)
        if not param.requires_grad:  # frozen (no optimizer holds it): the weight itself
            return _frozen(param, None), {}
        want = moments and self.has_state()
        if self.kind in ("zero12", "zero3"):
            if self.kind == "zero12" and want:
                self._link_fragments()
            value = safe_get_full_fp32_param(param).reshape(shape)
            found = {k: safe_get_full_optimizer_state(param, k).reshape(shape) for k in MOMENTS} if want else {}
            return value.detach().float().cpu(), {k: v.detach().float().cpu() for k, v in found.items()}
        owner = self.master[id(param)] if self.kind == "unfused" else param
        state = self.adam.state.get(owner, {}) if want else {}
        return owner.detach().float().cpu(), {k: state[k].detach().float().cpu() for k in MOMENTS if k in state}

    def create_state(self, step: int) -> None:
        """Adam state (zero moments, `step`) for every tensor the AdamW steps, before `put`
        writes the moments in; the torch optimizer would otherwise create it at its next step
        with step 0."""
        def fresh(t: torch.Tensor) -> dict:
            return {"step": torch.tensor(float(step)), **{k: torch.zeros_like(t) for k in MOMENTS}}

        self.adam.state.clear()
        if self.kind == "zero12":
            for flat in self.wrapper.single_partition_of_fp32_groups:
                self.adam.state[flat] = fresh(flat)
            self._link_fragments()
        elif self.kind == "zero3":
            for flat in self.wrapper.fp32_partitioned_groups_flat:
                self.adam.state[flat] = fresh(flat)
        else:
            for group in self.adam.param_groups:
                for p in group["params"]:
                    self.adam.state[p] = fresh(p)

    def put(self, param, value: torch.Tensor, moments: dict) -> None:
        """Write this rank's shard (fp32 value, moments) of param; `create_state` first."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
        if not param.requires_grad:
            _frozen(param, value)
            return
        if self.kind == "zero3":
            self.wrapper.set_full_hp_param(value.to(param.ds_tensor.device), param)
            for k, v in moments.items():
                self.wrapper.set_full_hp_param(v.to(param.ds_tensor.device), param, k)
            return
        with torch.no_grad():
            param.data.copy_(value.to(param.dtype))  # the (bf16) model weight, whole on every DP rank
        if self.kind == "zero12":
            safe_set_full_fp32_param(param, value.to(param.device))
            for k, v in moments.items():
                safe_set_full_optimizer_state(param, v.to(param.device), k)
            return
        owner = self.master[id(param)] if self.kind == "unfused" else param
        with torch.no_grad():
            owner.data.copy_(value.to(owner.device))
        for k, v in moments.items():
            self.adam.state[owner][k].copy_(v)

    def finish(self) -> None:
        """ZeRO 3 keeps the weights in flat partitions beside the fp32 ones: copy them over,
        as DeepSpeed does after every step."""
        if self.kind == "zero3":
            w = self.wrapper
            for g, flat in enumerate(w.fp32_partitioned_groups_flat):
                if w.fp16_partitioned_groups_flat[g] is not None:
                    w.fp16_partitioned_groups_flat[g].data.copy_(flat.data)


# ------------------------------------------------------------------------------------- export

def _json_safe(obj, what: str):
    try:
        return json.loads(json.dumps(obj))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{what} is not plain JSON data ({e}); a layout-free checkpoint stores it as JSON") \
            from None


def _agreed(values: list[int], layout, op) -> list[int]:
    if layout.world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.int64, device=layout.device)
    dist.all_reduce(t, op=op)
    return [int(v) for v in t.tolist()]


def _same_on_every_rank(obj, layout, what: str) -> None:
    """Collective: obj (JSON) is identical on every rank, else CheckpointError on all of them."""
    digest = hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).digest()
    mine = int.from_bytes(digest[:7], "little")
    low, high = _agreed([mine], layout, dist.ReduceOp.MIN)[0], _agreed([mine], layout, dist.ReduceOp.MAX)[0]
    if low != high:
        raise CheckpointError(f"{what} differs between ranks; a layout-free checkpoint keeps one copy for all")


def export(rt, out, client_state: dict, rank_state: dict, model_only: bool = False, source: dict | None = None) -> Path:
    """Collective: write the state of `rt` (its engine, optimizer, schedule) with the loop's
    client_state and the rank_state every rank shares as a layout-free checkpoint at `out`
    (replaced if it exists; complete or absent). source: the layout record of the checkpoint
    converted (meta.json's `source`). Returns the directory."""
    from safetensors.torch import save_file

    layout, cfg = rt.layout, rt.cfg
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    client = {k: v for k, v in client_state.items() if k != "config"}
    client, rank_state = _json_safe(client, "the client state"), _json_safe(rank_state, "the per-rank state")
    _same_on_every_rank(rank_state, layout, "the per-rank state (the data stream position)")
    if layout.rank == 0:
        if tmp.exists():  # left by a conversion that died
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()

    opt = _Optimizer(rt)
    step = opt.step() if not model_only else None
    mine = -1 if step is None else step
    low, high = _agreed([mine], layout, dist.ReduceOp.MIN)[0], _agreed([mine], layout, dist.ReduceOp.MAX)[0]
    if low != high:
        raise CheckpointError(f"Adam's step count differs between ranks ({low} and {high})")
    weights, moments = {}, {}
    for name, param in local_parameters(rt.engine, layout):
        value, found = opt.get(param, moments=not model_only)
        weights[name] = _gather_tp(value, param, layout)
        for k in MOMENTS if not model_only else ():
            # No state yet (converted before the first update): zero moments, as Adam starts.
            moments[f"{name}.{k}"] = _gather_tp(found.get(k, torch.zeros_like(value)), param, layout)
    # One writer per pipeline stage: its other ranks hold the same tensors.
    if layout.tp_rank == 0 and layout.dp_rank == 0 and layout.cp_rank == 0:
        stage = f"stage{layout.pp_rank:05d}"
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / f"{stage}.{MODEL_FILE}"))
        if not model_only:
            save_file({k: v.contiguous() for k, v in moments.items()}, str(tmp / f"{stage}.{OPTIMIZER_FILE}"))
    dist.barrier()
    if layout.rank == 0:
        _merge_stages(tmp, layout.pp_size, [MODEL_FILE] + ([] if model_only else [OPTIMIZER_FILE]))
        from .cli import resolved_config
        config = client_state.get("config") or resolved_config(cfg)
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(_json_safe(config, "the config"), sort_keys=False))
        saved_step = int(client.get("step", rt.engine.global_steps))
        if not model_only:
            engine = rt.engine
            state = {"adam_step": max(low, 0), "scheduler": _json_safe(engine.lr_scheduler.state_dict(), "the LR "
                                                                                                          "schedule"),
                     "client_state": client, "rank_state": rank_state,
                     "engine": {"global_steps": int(engine.global_steps), "global_samples": int(engine.global_samples),
                                "skipped_steps": int(engine.skipped_steps)}}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
        record = checkpoint.layout_record(cfg, layout.world_size)
        meta = {"format": FORMAT, "version": VERSION, "step": saved_step, "model": record.pop("model"),
                "data_blend": record.pop("data_blend"),
                "source": source or record, "model_only": model_only, "checksums": checkpoint.CHECKSUM_FILE}
        (tmp / checkpoint.META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        checkpoint.publish_directory(tmp, out)
    dist.barrier()  # nobody returns before the directory is published
    return out


def _merge_stages(tmp: Path, stages: int, names: list[str]) -> None:
    """One file per kind from the pipeline stages' files. The tied embedding is on the first
    and the last stage, identical: the first stage's copy is kept."""
    from safetensors.torch import load_file, save_file
    for name in names:
        merged = {}
        for s in range(stages):
            part = tmp / f"stage{s:05d}.{name}"
            for key, value in load_file(str(part)).items():
                merged.setdefault(key, value)
            part.unlink()
        save_file(merged, str(tmp / name))


# --------------------------------------------------------------------------------------- load

def read_meta(path) -> dict:
    """meta.json of a layout-free checkpoint; CheckpointError naming the file otherwise."""
    path = Path(path)
    try:
        meta = checkpoint.read_meta(path)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from None
    if meta is None or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path / checkpoint.META_FILE}: not a layout-free checkpoint "
                              f"(tools/convert_checkpoint.py writes them)")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path / checkpoint.META_FILE}: layout-free format version {meta.get('version')!r}, "
                              f"this code reads version {VERSION}")
    return meta


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing") from None
    except ValueError as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} does not hold a JSON object")
    return data


def _tensor(f, file: Path, key: str, shape: torch.Size) -> torch.Tensor:
    if key not in f.keys():
        raise CheckpointError(f"{file}: no tensor {key!r}; the checkpoint does not hold this model's parameter")
    t = f.get_tensor(key)
    if t.shape != shape:
        raise CheckpointError(f"{file}: {key!r} has shape {tuple(t.shape)}, this model's is {tuple(shape)}")
    return t.float()


def load(rt, path, weights_only: bool = False) -> tuple[dict, dict]:
    """Collective: restore a layout-free checkpoint into `rt`, built for any layout. Returns
    (client_state, rank_state) as checkpoint.load does, and reseeds this rank's generators
    (see the module docstring). weights_only: the model's weights alone (evaluation; a
    model-only export is enough), nothing else of `rt` changes. A damaged checkpoint, one of
    another model, or a model-only export to resume raises CheckpointError naming the file
    or key, on every rank alike."""
    from safetensors import safe_open

    from .cli import layout_mismatch

    layout, path = rt.layout, Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a complete checkpoint: there is no such directory")
    checkpoint.verify(path, layout)
    meta = read_meta(path)
    if not weights_only and (meta.get("model_only") or not (path / STATE_FILE).is_file()):
        raise CheckpointError(f"checkpoint {path} holds only the model's weights (a --model-only export, no "
                              f"{STATE_FILE} or {OPTIMIZER_FILE}); resuming needs the full layout-free checkpoint")
    if what := layout_mismatch(meta, rt.cfg, layout.world_size):  # it records no layout: model settings only
        raise CheckpointError(f"checkpoint {path} holds another model ({what})")
    failure, client_state, rank_state = None, {}, {}
    try:
        state = {} if weights_only else _read_json(path / STATE_FILE)
        opt = _Optimizer(rt)
        if not weights_only:
            opt.create_state(int(state["adam_step"]))
        model_file, optim_file = path / MODEL_FILE, path / OPTIMIZER_FILE
        with contextlib.ExitStack() as files:
            fm = files.enter_context(safe_open(str(model_file), framework="pt"))
            fo = None if weights_only else files.enter_context(safe_open(str(optim_file), framework="pt"))
            for name, param in local_parameters(rt.engine, layout):
                shape = _full_shape(param, layout)
                value = _shard(_tensor(fm, model_file, name, shape), param, layout)
                moments = {} if fo is None or not param.requires_grad else {
                    k: _shard(_tensor(fo, optim_file, f"{name}.{k}", shape), param, layout) for k in MOMENTS}
                opt.put(param, value, moments)
            if layout.pp_size == 1:  # the whole model is here: nothing in the file may be left over
                names = {n for n, _ in local_parameters(rt.engine, layout)}
                extra = sorted(set(fm.keys()) - names)
                if extra:
                    raise CheckpointError(f"{model_file}: holds {extra[:3]}{' ...' if len(extra) > 3 else ''}, "
                                          f"which this model does not have")
        opt.finish()
        if not weights_only:
            _restore_schedule(rt, state)
            client_state, rank_state = dict(state["client_state"]), dict(state["rank_state"])
    except (KeyError, TypeError, ValueError) as e:
        failure = e if isinstance(e, CheckpointError) else CheckpointError(
            f"checkpoint {path}: {STATE_FILE} or a tensor file is not what tools/convert_checkpoint.py writes "
            f"({type(e).__name__}: {e})")
    # Pipeline stages read different tensors: agree on a failure, so that no rank goes on alone.
    if _agreed([int(failure is not None)], layout, dist.ReduceOp.MAX)[0]:
        raise failure or CheckpointError(f"checkpoint {path}: another rank could not restore it (its message says why)")
    client_state.setdefault("step", int(meta["step"]))
    if not weights_only:
        rng.seed_all(int(np.random.SeedSequence([rt.cfg.train.seed, int(meta["step"])]).generate_state(1)[0]),
                     layout.tp_rank, layout.pp_rank, layout.dp_rank, layout.cp_rank)
    return client_state, rank_state


def _restore_schedule(rt, state: dict) -> None:
    """The LR schedule's position and DeepSpeed's step counters."""
    scheduler = rt.engine.lr_scheduler
    scheduler.load_state_dict(state["scheduler"])
    # LambdaLR restores its counters, not the rates it wrote into the optimizer's groups.
    for group, lr in zip(rt._optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr
    for key, value in state.get("engine", {}).items():
        if key in ("global_steps", "global_samples", "skipped_steps"):
            setattr(rt.engine, key, int(value))


def read_model(path) -> tuple[dict, dict]:
    """(the run's config dict, the model's state dict: canonical name -> tensor) of a
    layout-free checkpoint, full or model-only, in this process; files checked first."""
    from safetensors.torch import load_file

    path = Path(path)
    read_meta(path)
    checkpoint.verify(path)
    try:
        config = yaml.safe_load((path / CONFIG_FILE).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: {e}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path / CONFIG_FILE} does not hold the run's config")
    return config, load_file(str(path / MODEL_FILE))
