"""Generate text with a causal TransNormer LM (or one of its baselines), streamed to stdout.

    python tools/generate.py --checkpoint runs/tiny_cpu --prompt "KING." --max-new-tokens 60
    python tools/generate.py --checkpoint runs/tiny_cpu/checkpoints/step_00000300 --prompt "KING." \\
        --max-new-tokens 60 --temperature 0.8 --top-k 50 --top-p 0.95 --seed 1
    python tools/generate.py --config alm/tiny_cpu [key=value ...] --prompt "KING." --max-new-tokens 20

--checkpoint takes a checkpoint directory (step_NNNNNNNN), or a run directory or its
checkpoints/ folder, whose newest intact checkpoint is used, or a layout-free checkpoint
(tools/convert_checkpoint.py, safetensors). A step checkpoint must come from a one-process
run at ZeRO stage 0, where DeepSpeed keeps the whole state dict in one file
(mp_rank_00_model_states.pt), read with torch's weights-only unpickler; checkpoints of
other layouts keep the weights split over files and are refused (convert them first). The model settings come from the config the
checkpoint carries; the tokenizer from its dataset (data.path in that config, or --data).
--config builds the model a config describes with random weights (seeded by train.seed),
for smoke tests; its tokenizer comes from data.path too.

The prompt is preceded by the end-of-document id, which is what precedes every document
in the packed training stream, and generation stops at the next one. The prompt is echoed,
then the new text is written as it is generated. One process (no launcher), on the GPU when
there is one. Errors are one line (exit code 2 for a bad argument, file or setting, else 1);
TRANSNORMER_TRACEBACK=1 adds the traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from pathlib import Path

MODEL_FILE = "mp_rank_00_model_states.pt"  # DeepSpeed's model file of a one-process ZeRO 0 run


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="generate.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="PATH", help="a checkpoint, run directory or checkpoints folder")
    source.add_argument("--config", metavar="NAME|PATH", help="a config (bundled name or YAML), random weights")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (with --config only)")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, required=True, help="at most this many new tokens")
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy (default %(default)s)")
    p.add_argument("--top-k", type=int, default=0, help="draw from the k most likely tokens; 0: all (default)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="draw from the smallest set of most likely tokens holding this probability; 1: all (default)")
    p.add_argument("--seed", type=int, default=0, help="the sampling generator's seed (default %(default)s)")
    p.add_argument("--data", metavar="PATH", default=None,
                   help="the dataset whose tokenizer to use (default: data.path of the config)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    args = p.parse_intermixed_args(argv)
    if args.overrides and args.checkpoint:
        p.error("key=value overrides go with --config; a checkpoint's settings are the ones it was trained with")
    return args


def checkpoint_dir(path: str) -> Path:
    """The checkpoint `--checkpoint` names: itself, or the newest intact one of a run directory
    or checkpoints folder (`latest_checkpoint`, which checks them against their checksums)."""
    from megatron_transnormer.training.checkpoint import META_FILE, RUN_SUBDIR, latest_checkpoint
    from megatron_transnormer.training.cli import UsageError
    given = Path(path)
    if (given / META_FILE).is_file() or (given / MODEL_FILE).is_file():
        return given
    root = given / RUN_SUBDIR if (given / RUN_SUBDIR).is_dir() else given
    found = latest_checkpoint(root)
    if found is None:
        raise UsageError(f"--checkpoint {path}: no checkpoint there (a step_NNNNNNNN directory, or a run "
                         f"directory or checkpoints folder holding one)")
    return Path(found)


def load_checkpoint(path: Path) -> tuple[dict, dict]:
    """(the config dict the run saved, the model's state dict) of a one-process ZeRO 0
    checkpoint, or of a layout-free checkpoint of any layout (tools/convert_checkpoint.py)."""
    from megatron_transnormer.training import universal
    from megatron_transnormer.training.checkpoint import META_FILE, read_meta
    from megatron_transnormer.training.cli import UsageError
    from megatron_transnormer.training.deepspeed_loading import CheckpointError, load_weights_only
    if universal.is_layout_free(path):  # whole tensors under the model's own names, from safetensors
        try:
            return universal.read_model(path)
        except CheckpointError as e:
            raise UsageError(f"--checkpoint {path}: {e}") from None
    meta = read_meta(path)
    if meta is None:
        raise UsageError(f"--checkpoint {path}: no {META_FILE}, so the layout it was saved with is unknown; "
                         f"a layout-free export of its weights is needed")
    layout = {"world_size": meta.get("world_size"), "tensor": meta.get("tensor"), "pipeline": meta.get("pipeline"),
              "context": meta.get("context", 1), "zero_stage": meta.get("zero_stage")}
    if layout != {"world_size": 1, "tensor": 1, "pipeline": 1, "context": 1, "zero_stage": 0}:
        what = ", ".join(f"{k}={v}" for k, v in layout.items())
        raise UsageError(f"--checkpoint {path}: saved with {what} (its {META_FILE}); only a checkpoint of a "
                         f"one-process run at ZeRO stage 0 holds the whole model in {MODEL_FILE}: for this one "
                         f"a layout-free export of the weights is needed (tools/convert_checkpoint.py)")
    file = path / MODEL_FILE
    if not file.is_file():
        raise UsageError(f"--checkpoint {path}: {MODEL_FILE} is missing; a layout-free export of the weights "
                         f"is needed")
    saved = load_weights_only(file, map_location="cpu")  # torch.load(weights_only=True); names the file if refused
    module, config = (saved.get("module"), saved.get("config")) if isinstance(saved, dict) else (None, None)
    if not isinstance(module, dict) or not isinstance(config, dict):
        raise UsageError(f"{file}: holds no model state dict ('module') and config; not a checkpoint of pretrain.py")
    return config, module


def build(args):
    """-> (model in eval mode on its device, tokenizer)."""
    import torch

    from megatron_transnormer.config import config_from_dict, load_config, validate_config
    from megatron_transnormer.data.tokenizers import dataset_tokenizer
    from megatron_transnormer.model import build_model
    from megatron_transnormer.parallel import init_distributed, read_launch_env
    from megatron_transnormer.training.cli import UsageError, apply_manifest, check_kernels, data_path, load_data_info

    if read_launch_env().world_size != 1:
        raise UsageError("generate.py runs in one process: start it with python, not a multi-process launcher")
    if args.checkpoint:
        path = checkpoint_dir(args.checkpoint)
        config, weights = load_checkpoint(path)
        cfg = validate_config(config_from_dict(config))
        info = load_data_info(args.data or data_path(cfg))
        info.check_model(vocab_size=cfg.model.vocab_size)
    else:
        cfg = validate_config(load_config(args.config, args.overrides))
        info = load_data_info(args.data or data_path(cfg))
        apply_manifest(cfg, info)
        weights = None
    check_kernels(cfg)
    if cfg.model.head != "lm" or not cfg.model.causal:
        raise UsageError(f"model.head={cfg.model.head}, model.causal={cfg.model.causal}: generation needs the "
                         f"causal LM (model.head=lm)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    init_distributed(1, 1, backend="gloo")  # one rank: no collective runs, gloo starts fastest
    model = build_model(cfg.model, seed=cfg.train.seed)
    if weights is not None:
        try:
            missing, unexpected = model.load_state_dict(weights, strict=False)
        except RuntimeError as e:  # a shape mismatch: torch's message lists every tensor, one per line
            missing, unexpected = [str(e).strip().splitlines()[-1].strip()], []
        if missing or unexpected:
            raise UsageError(f"--checkpoint {args.checkpoint}: its weights do not fit the model its config "
                             f"describes (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    return model.to(device).eval(), dataset_tokenizer(info)


def run(args) -> int:
    from megatron_transnormer.generation import Sampling, generate

    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    model, tokenizer = build(args)
    prompt = [tokenizer.eod_id] + tokenizer.encode(args.prompt)
    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    new, shown = [], ""
    for tokens in generate(model, [prompt], args.max_new_tokens, sampling, stop_ids=[tokenizer.eod_id]):
        token = int(tokens[0])
        if token == tokenizer.eod_id:
            break
        new.append(token)
        # The whole continuation is decoded, not each token alone: pieces of a word, or the
        # bytes of one character, only decode together.
        text = tokenizer.decode(new)
        if text.endswith("\ufffd"):  # a character whose remaining bytes are still to come
            continue
        out.write(text[len(shown):])
        out.flush()
        shown = text
    out.write(tokenizer.decode(new)[len(shown):] + "\n")  # whatever was held back, as it decodes
    out.flush()
    return 0


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    args = parse_args(argv)
    # DeepSpeed's logger writes to the stdout it finds at import; stdout carries the text.
    with contextlib.redirect_stdout(sys.stderr):
        import deepspeed  # noqa: F401
        from megatron_transnormer.training.cli import run_tool
    return run_tool("generate.py", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
