"""Reading DeepSpeed's checkpoint files without running code stored in them.

DeepSpeed 0.19.8's TorchCheckpointEngine reads its model and optimizer files with the
full unpickler (weights_only off): a checkpoint file holding a pickled object whose
`__reduce__` names any callable (os.system, ...) would run it on every rank that resumes,
and checkpoints get copied between machines and shared directories. Every file of a
checkpoint is therefore read by torch's weights-only unpickler, which builds only
tensors, containers and plain values, plus the three DeepSpeed types these files hold.
They were found by saving checkpoints of ZeRO 0-3 in fp32 and bf16, with pipeline and
tensor parallelism, and listing what the files pickle
(`torch.serialization.get_unsafe_globals_in_checkpoint`):

  * `LossScaler`: the ZeRO and bf16 optimizers store their static loss scaler (the
    attributes `cur_scale` and `dynamic`);
  * `ZeroStageEnum`: the ZeRO and bf16 optimizers record their stage as this int enum;
  * `fragment_address`: ZeRO 1/2 and the bf16 optimizer map each parameter to its slice
    (`numel`, `start`) of the flat partition.

Unpickling them only sets those attributes. OrderedDict, torch.Size and dtypes, which
the files hold too, are on torch's own weights-only list.

`install(engine)` gives a DeepSpeed engine a checkpoint engine that saves as DeepSpeed's
own does and loads this way; DeepSpeed routes every file it reads while resuming through
`engine.checkpoint_engine.load`.
"""
from __future__ import annotations

import os

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address



class CheckpointError(ValueError):
    """A checkpoint that is damaged, incomplete or not safe to load; the message names the file."""


ALLOWED_TYPES = (LossScaler, ZeroStageEnum, fragment_address)

# Lines of torch's weights-only refusal that explain nothing about the file.
_BOILERPLATE = ("Weights only load failed", "In PyTorch 2.6", "Re-running `torch.load`", "Check the documentation")


def _reason(error: Exception) -> str:
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(_BOILERPLATE)] or lines or [type(error).__name__]
    text = " ".join(useful)
    if len(text) > 160 and ". " in text:  # e.g. miniz's advice after "failed finding central directory."
        text = text[:text.index(". ") + 1]
    return text if len(text) <= 300 else text[:297] + "..."


def _load(path, map_location, mmap: bool):
    with torch.serialization.safe_globals(list(ALLOWED_TYPES)):
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def refusal(path: str | os.PathLike, mmap: bool = False) -> str | None:
    """Why `load_weights_only` would refuse a file (one line), or None if it reads it.
    mmap: map the tensors instead of reading them (zip-format files only)."""
    try:
        _load(path, "cpu", mmap)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, OSError, EOFError, ...
        return _reason(e)
    return None


def load_weights_only(path: str | os.PathLike, map_location=None):
    """torch.load of one checkpoint file with the weights-only unpickler and `ALLOWED_TYPES`;
    any failure (a refused object, a damaged archive, a read error) is a CheckpointError
    naming the file."""
    try:
        return _load(path, map_location, mmap=False)
    except Exception as e:  # as in `refusal`
        raise CheckpointError(f"{path}: refused by the weights-only loader: {_reason(e)}") from None


class WeightsOnlyCheckpointEngine(CheckpointEngine):
    """DeepSpeed's TorchCheckpointEngine (whose saving it keeps), loading through
    `load_weights_only`. `last_loaded` is the file read last, for error messages."""

    def __init__(self, inner: TorchCheckpointEngine):
        super().__init__()
        self.inner, self.name, self.last_loaded = inner, "WeightsOnlyCheckpointEngine", None

    def create(self, info):
        return self.inner.create(info)

    def save(self, state_dict, path: str):
        return self.inner.save(state_dict, path)

    def commit(self, info):
        return self.inner.commit(info)

    def load(self, path: str, map_location=None):
        self.last_loaded = path
        return load_weights_only(path, map_location)


def install(engine) -> WeightsOnlyCheckpointEngine:
    """Make `engine` read checkpoint files with `load_weights_only` (idempotent)."""
    current = engine.checkpoint_engine
    if isinstance(current, WeightsOnlyCheckpointEngine):
        return current
    if type(current) is not TorchCheckpointEngine:  # another writer: its files are not known here
        raise CheckpointError(f"DeepSpeed's checkpoint engine is {type(current).__name__}; only the files of "
                              f"its TorchCheckpointEngine are known to load safely (weights only)")
    engine.checkpoint_engine = WeightsOnlyCheckpointEngine(current)
    return engine.checkpoint_engine
