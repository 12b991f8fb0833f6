"""Benchmark and inspect the Triton attention kernels (not a test).

    python bench/kernels.py                 # GPU: tokens/s table + bench/out/kernels.json
    python bench/kernels.py --decay | --diag | --rms   # with per-head decay; DiagAttention; SimpleRMSNorm
    python bench/kernels.py --cpu-smoke     # no GPU: tiny fp32 run in Triton's interpreter (any mode)
    python bench/kernels.py --sass          # no GPU needed: compile for sm_90, count HGMMA/HMMA,
                                            # registers, spills; SASS in bench/out/sass/

The timing run compares, per sequence length (B·n tokens fixed, H heads of d=128, bf16):
our causal NormAttention kernel, the PyTorch reference (chunked), torch SDPA with the
flash backend on a softmax layer of the same shape, and fla's chunk_simple_gla when it
is importable (a failed import is recorded under `skipped_methods`); forward alone and
forward+backward. --rms times SimpleRMSNorm over [tokens, H·d] rows instead, for each
length in --seqlens as the number of tokens. Timing is triton.testing.do_bench (CUDA
events, median), after one untimed call that runs the autotuner. The JSON is rewritten
after every row, so a run cut short keeps what it measured. bench/RESULTS.md says what
to run.
"""
from __future__ import annotations

import argparse
import collections
import inspect
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NORM_METHODS = "triton,torch,sdpa_flash,fla_chunk_simple_gla"
DIAG_METHODS = "triton_diag,torch_diag,sdpa_flash_blocks"
RMS_METHODS = "triton_rms,torch_rms,torch_rms_norm"
OUT_DIR = ROOT / "bench" / "out"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", default="1024,2048,4096,8192,16384,32768,65536")
    p.add_argument("--tokens", type=int, default=65536, help="B·n per step (B = tokens // n, at least 1)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=128, help="head dim d (= e)")
    p.add_argument("--decay", action="store_true", help="per-head decay λ_h (TransNormerLLM)")
    p.add_argument("--diag", action="store_true", help="DiagAttention (softmax, causal, 64-token blocks) instead")
    p.add_argument("--rms", action="store_true", help="SimpleRMSNorm over [n, heads·dim] rows instead")
    p.add_argument("--methods", default=None, help="comma list; the first is 'ours' in the summary "
                   f"(default: {NORM_METHODS}, with --diag: {DIAG_METHODS}, with --rms: {RMS_METHODS})")
    p.add_argument("--out", default=None, help="default bench/out/kernels[_diag|_rms][_decay].json "
                   "(--cpu-smoke: kernels_cpu_smoke.json)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny fp32 pass in Triton's interpreter")
    p.add_argument("--sass", action="store_true", help="compile for --arch and report the instruction mix")
    p.add_argument("--arch", type=int, default=90, help="compute capability for --sass (90 = H100/H200)")
    p.add_argument("--all-configs", action="store_true", help="--sass: every autotune config, not the first")
    p.add_argument("--sass-dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="--sass: input dtype")
    return p.parse_args(argv)


# ---------------------------------------------------------------- SASS (ahead of time, no GPU)

def _compile_variants(arch: int, all_configs: bool, dtype: str):
    """(name, CompiledKernel) for each kernel variant the model uses, compiled for `arch`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from transnormer_kernels import triton_diag_attention as diag, triton_norm_attention as na
    from transnormer_kernels import triton_rms_norm as rms

    target = GPUTarget("cuda", arch, 32)

    def configs(module):
        return module._configs() if all_configs else module._configs()[:1]

    def build(kernel, types, constexprs, config):
        fn = kernel.fn if hasattr(kernel, "configs") else kernel  # unwrap the autotuner
        consts = {**constexprs, **config.kwargs}
        # Arguments not named in `types` are i32 (sizes and element strides).
        sig = {a: ("constexpr" if a in consts else types.get(a, "i32")) for a in fn.arg_names}
        # Pointers, head dims and strides are multiples of 16 for the model's shapes, and the
        # launcher specialises on that at run time (16-byte vector loads depend on it).
        aligned = [a for a in fn.arg_names if a not in consts and (
            sig[a].startswith("*") or a in ("DA", "DC", "DQK", "DV", "D") or re.fullmatch(r"s[a-z]*_[bhn]", a))]
        attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
        opts = dict(num_warps=config.num_warps, num_stages=config.num_stages)
        return triton.compile(ASTSource(fn, sig, consts, attrs), target=target, options=opts)

    ptr = f"*{dtype}"
    prec = "ieee" if dtype == "fp32" else "tf32"  # what dot_precision() picks
    for d in (128, 64):
        scan_types = dict(A=ptr, B=ptr, C=ptr, OUT=ptr, STATES="*fp32", LOG2_DECAY="*fp32", INIT="*fp32",
                          FINAL="*fp32", N="i32", H="i32", DA="i32", DC="i32", SEG_BLOCKS="i32")
        for config in configs(na):
            for decay in (False, True):
                for reverse in (False, True):
                    for mode in (na.PLAIN, na.SEGMENT_STATE, na.SEGMENT_SCAN):
                        if d == 64 and (mode != na.PLAIN or reverse):
                            continue
                        # A carried state in and out: the plain forward scan at d=128 (context
                        # parallelism, decoding), the final state of the plain reverse one (dS₀).
                        carried = [(False, False)]
                        if d == 128 and mode == na.PLAIN:
                            carried.append((False, True) if reverse else (True, True))
                        for has_init, has_final in carried:
                            consts = dict(HAS_DECAY=decay, REVERSE=reverse, MODE=mode, PREC=prec,
                                          BLOCK_N=na.BLOCK_N, BLOCK_DA=d, HAS_INIT=has_init, HAS_FINAL=has_final)
                            name = (f"scan d={d} C={config.kwargs['BLOCK_C']} w={config.num_warps} "
                                    f"s={config.num_stages} decay={int(decay)} rev={int(reverse)} mode={mode}"
                                    f" state={int(has_init)}{int(has_final)}")
                            yield name, build(na._scan_kernel, scan_types, consts, config)
        if d == 128:
            for decay in (False, True):
                for reverse in (False, True):
                    consts = dict(HAS_DECAY=decay, REVERSE=reverse, HAS_INIT=not reverse, HAS_FINAL=True, BLOCK=1024)
                    types = dict(STATES="*fp32", LOG2_DECAY="*fp32", INIT="*fp32", FINAL="*fp32")
                    yield (f"carry decay={int(decay)} rev={int(reverse)}",
                           build(na._carry_kernel, types, consts, triton.Config({})))
        for kernel, extra in ((diag._diag_fwd, dict(OUT=ptr)), (diag._diag_bwd, dict(DO=ptr, DQ=ptr, DK=ptr, DVAL=ptr))):
            types = dict(Q=ptr, K=ptr, V=ptr, N="i32", DQK="i32", DV="i32", **extra)
            # The model's 64-token blocks; at d=128 also the other sizes the dispatcher accepts.
            for block in ((16, 32, 64, 128) if d == 128 else (64,)):
                for config in configs(diag):
                    for kind in (diag.SOFTMAX, diag.RELU) if block == 64 else (diag.SOFTMAX,):
                        # With a padding mask only at the model's block (the masked LM's case).
                        for masked in (False, True) if block == 64 else (False,):
                            consts = dict(KIND=kind, CAUSAL=not masked, PREC=prec, BLOCK=block, BLOCK_D=d,
                                          BLOCK_E=d, HAS_MASK=masked)
                            if not masked:
                                consts["M"] = None
                            name = (f"{kernel.fn.__name__} d={d} block={block} kind={kind} mask={int(masked)}"
                                    f" w={config.num_warps}")
                            yield name, build(kernel, dict(types, M="*u8"), consts, config)
    for kernel, types in ((rms._rms_fwd, dict(X=ptr, Y=ptr)), (rms._rms_bwd, dict(X=ptr, DY=ptr, DX=ptr))):
        types = dict(types, D="i32", inv_sqrt_d="fp32", eps="fp32")
        for config in configs(rms):
            yield f"{kernel.fn.__name__} D=1024 w={config.num_warps}", build(kernel, types, dict(BLOCK_D=1024), config)


def sass_report(arch: int, all_configs: bool, dtype: str) -> int:
    os.environ.pop("TRITON_INTERPRET", None)  # real compilation, not the interpreter
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    from triton import knobs

    sass_dir = OUT_DIR / "sass"
    sass_dir.mkdir(parents=True, exist_ok=True)
    cuobjdump = knobs.nvidia.cuobjdump.path
    rows = []
    print(f"{'kernel':64s} {'regs':>4s} {'stack':>5s} {'smem':>6s} {'HGMMA':>5s} {'HMMA':>4s} {'LDL/STL':>7s}")
    for name, kernel in _compile_variants(arch, all_configs, dtype):
        sass = kernel.asm["sass"]
        ops = collections.Counter(re.findall(r"\b(HGMMA|HMMA|LDL|STL)\b", sass))
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        regs = re.search(r"REG:(\d+)", usage)
        stack = re.search(r"STACK:(\d+)", usage)
        row = dict(kernel=name, regs=int(regs.group(1)) if regs else None, stack=int(stack.group(1)) if stack else None,
                   shared=kernel.metadata.shared, HGMMA=ops["HGMMA"], HMMA=ops["HMMA"], LDL_STL=ops["LDL"] + ops["STL"])
        rows.append(row)
        (sass_dir / (re.sub(r"[^A-Za-z0-9=]+", "_", f"{dtype} {name}") + ".sass")).write_text(sass)
        print(f"{name:64s} {row['regs']!s:>4s} {row['stack']!s:>5s} {row['shared']:>6d} {row['HGMMA']:>5d} "
              f"{row['HMMA']:>4d} {row['LDL_STL']:>7d}", flush=True)
    table = OUT_DIR / f"kernels_sass_sm{arch}_{dtype}.json"
    table.write_text(json.dumps(rows, indent=1))
    print(f"SASS in {sass_dir}, table in {table}")
    return 0


# ---------------------------------------------------------------- timing

def _methods(names):
    """(name -> (prepare(q, k, v, lam) -> args, run(*args) -> out), name -> why it is missing);
    prepare stays out of the timing. SimpleRMSNorm's methods take q as their input row block."""
    import torch
    import torch.nn.functional as F

    import transnormer_kernels as kernels

    def same(q, k, v, lam):
        return q, k, v, lam

    def sdpa_run(q, k, v, lam):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def blocks(q, k, v, lam):
        # DiagAttention as SDPA: every 64-token block becomes a batch entry.
        b, h, n, d = q.shape
        return [t.detach().reshape(b * h * n // 64, 1, 64, t.shape[-1]).requires_grad_(t.requires_grad)
                for t in (q, k, v)] + [lam]

    table = {
        "triton": (same, lambda q, k, v, lam: kernels.norm_attention(q, k, v, decay=lam, backend="triton")[0]),
        "torch": (same, lambda q, k, v, lam: kernels.norm_attention(q, k, v, decay=lam, backend="torch")[0]),
        "sdpa_flash": (same, sdpa_run),
        "triton_diag": (same, lambda q, k, v, lam: kernels.diag_attention(q, k, v, backend="triton")),
        "torch_diag": (same, lambda q, k, v, lam: kernels.diag_attention(q, k, v, backend="torch")),
        "sdpa_flash_blocks": (blocks, sdpa_run),
        "triton_rms": (same, lambda x, *_: kernels.simple_rms_norm(x, backend="triton")),
        "torch_rms": (same, lambda x, *_: kernels.simple_rms_norm(x, backend="torch")),
        # torch's own RMSNorm (x / sqrt(mean x² + eps)): the same traffic, a vendor baseline.
        "torch_rms_norm": (same, lambda x, *_: F.rms_norm(x, (x.shape[-1],), eps=1e-8)),
    }
    skipped = {}
    if "fla_chunk_simple_gla" in names:
        try:
            from fla.ops.simple_gla import chunk_simple_gla
        except Exception as exc:  # not carried, or built for another torch/Triton: the others still run
            skipped["fla_chunk_simple_gla"] = f"import failed: {type(exc).__name__}: {exc}"[:300]
            print(f"fla not importable ({skipped['fla_chunk_simple_gla']}): skipping fla_chunk_simple_gla")
        else:
            # fla's layout is [B, T, H, D] (older releases: head_first=True by default, so ask for
            # [B, T, H, D] explicitly); its decay is log λ per head (g_gamma, newer releases).
            extra = {"head_first": False} if "head_first" in inspect.signature(chunk_simple_gla).parameters else {}

            def fla_prepare(q, k, v, lam):
                bthd = [t.detach().transpose(1, 2).contiguous().requires_grad_(t.requires_grad) for t in (q, k, v)]
                return (*bthd, None if lam is None else torch.log(lam.float()))

            def fla_run(q, k, v, g_gamma):
                gamma = {} if g_gamma is None else {"g_gamma": g_gamma}
                return chunk_simple_gla(q, k, v, scale=1.0, **gamma, **extra)[0]

            table["fla_chunk_simple_gla"] = (fla_prepare, fla_run)
    skipped.update({n: "unknown method" for n in names if n not in table and n not in skipped})
    return {n: table[n] for n in names if n in table}, skipped


def _timer(device):
    if device == "cuda":
        import triton.testing
        return lambda fn, grads: triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grads,
                                                         return_mode="median")

    def cpu_time(fn, grads):
        times = []
        for _ in range(3):
            for g in grads:
                g.grad = None
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[1]
    return cpu_time


def _rel_err(x, ref):
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def run_bench(args, device: str, dtype_name: str, seqlens, tokens: int, json_path: Path | None = None) -> dict:
    import torch
    import triton

    dtype = getattr(torch, dtype_name)
    names = [m for m in args.methods.split(",") if m]
    methods, skipped = _methods(names)
    timer = _timer(device)
    h, d = args.heads, args.dim
    results = []
    report = dict(device=torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
                  torch=torch.__version__, triton=triton.__version__, args=vars(args), results=results,
                  skipped_methods=skipped, complete=False)
    for n in seqlens:
        b = 1 if args.rms else max(1, tokens // n)
        torch.manual_seed(n)
        if args.rms:
            # The model normalises every token's H·d features: n tokens, one row each.
            q, k, v = (torch.randn(n, h * d, device=device) * 3).to(dtype), None, None
        else:
            # φ-like inputs (q, k ≥ 0 as after 1+elu), scaled so outputs stay O(1).
            q = (torch.rand(b, h, n, d, device=device) / d).to(dtype)
            k = (torch.rand(b, h, n, d, device=device) / n).to(dtype)
            v = torch.randn(b, h, n, d, device=device).to(dtype)
        lam = torch.exp(-torch.exp2(-8 * torch.arange(1, h + 1, device=device) / h)) if args.decay else None
        ours_out = None
        for name, (prepare, run) in methods.items():
            row = dict(n=n, batch=b, heads=h, dim=d, dtype=dtype_name, method=name)
            try:
                fwd_args = prepare(q, k, v, lam)
                with torch.no_grad():
                    out = run(*fwd_args)
                    row["fwd_ms"] = timer(lambda: run(*fwd_args), [])
                if name == names[0]:
                    ours_out = out
                elif name.startswith("torch") and ours_out is not None:
                    row["rel_err_vs_ours"] = _rel_err(out, ours_out)
                leaves = [None if t is None else t.detach().requires_grad_() for t in (q, k, v)]
                bwd_args = prepare(*leaves, lam)
                grads = [t for t in bwd_args if isinstance(t, torch.Tensor) and t.requires_grad]
                do = torch.randn_like(out)
                run(*bwd_args).backward(do)  # the backward kernels' autotuning, untimed
                row["fwd_bwd_ms"] = timer(lambda: run(*bwd_args).backward(do), grads)
                for key in ("fwd", "fwd_bwd"):
                    row[f"{key}_tokens_per_s"] = b * n / (row[f"{key}_ms"] * 1e-3)
            except torch.cuda.OutOfMemoryError:
                row["error"] = "out of memory"
            except Exception as exc:  # a method that fails at one size still leaves the others
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            if device == "cuda":
                torch.cuda.empty_cache()
            results.append(row)
            _print_row(row)
            report["summary"] = _summary(results, names[0])
            if json_path is not None:
                json_path.write_text(json.dumps(report, indent=1))
    report["summary"] = _summary(results, names[0])
    report["complete"] = True
    return report


def _print_header():
    print(f"{'n':>6s} {'B':>4s} {'method':<22s} {'fwd ms':>9s} {'fwd Mt/s':>9s} {'f+b ms':>9s} {'f+b Mt/s':>9s}")


def _print_row(row):
    if "error" in row:
        print(f"{row['n']:>6d} {row['batch']:>4d} {row['method']:<22s} {row['error']}", flush=True)
        return
    print(f"{row['n']:>6d} {row['batch']:>4d} {row['method']:<22s} {row['fwd_ms']:>9.3f} "
          f"{row['fwd_tokens_per_s'] / 1e6:>9.2f} {row['fwd_bwd_ms']:>9.3f} {row['fwd_bwd_tokens_per_s'] / 1e6:>9.2f}",
          flush=True)


def _summary(results, ours_name):
    """The targets of bench/RESULTS.md, computed from the rows (fwd+bwd tokens/s)."""
    def rates(method):
        return {r["n"]: r["fwd_bwd_tokens_per_s"] for r in results if r["method"] == method and "error" not in r}

    ours = rates(ours_name)
    flat = [v for n, v in ours.items() if n >= 2048]
    summary = {"ours": ours_name, "fwd_bwd_flatness_2k_up": min(flat) / max(flat) if flat else None}
    for other in sorted({r["method"] for r in results} - {ours_name}):
        theirs = rates(other)
        summary[f"speedup_vs_{other}"] = {n: v / theirs[n] for n, v in ours.items() if n in theirs}
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.sass:
        return sass_report(args.arch, args.all_configs, args.sass_dtype)
    if args.diag and args.rms:
        print("bench/kernels.py: --diag and --rms are separate runs", file=sys.stderr)
        return 2
    if args.methods is None:
        args.methods = DIAG_METHODS if args.diag else RMS_METHODS if args.rms else NORM_METHODS
    if args.cpu_smoke:
        # Must precede the first import of the kernel modules (read when they are decorated).
        os.environ["TRITON_INTERPRET"] = "1"
        args.heads, args.dim = 2, 32
        args.methods = ("triton_diag,torch_diag" if args.diag else "triton_rms,torch_rms" if args.rms
                        else "triton,torch")
        _print_header()
        out = Path(args.out or OUT_DIR / "kernels_cpu_smoke.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        report = run_bench(args, "cpu", "float32", [128, 200], tokens=256, json_path=out)
        errors = [r["rel_err_vs_ours"] for r in report["results"] if "rel_err_vs_ours" in r] or [1.0]
        failed = [r for r in report["results"] if "error" in r]
    else:
        import torch
        if not torch.cuda.is_available():
            print("bench/kernels.py: no CUDA device, nothing to time. On a GPU machine run it without flags "
                  "(see bench/RESULTS.md); here, --cpu-smoke exercises the script in Triton's interpreter and "
                  "--sass compiles the kernels for sm_90 and reports their instruction mix.", file=sys.stderr)
            return 2
        _print_header()
        out = Path(args.out or OUT_DIR / f"kernels{'_diag' * args.diag}{'_rms' * args.rms}{'_decay' * args.decay}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        seqlens = [int(x) for x in args.seqlens.split(",")]
        report = run_bench(args, "cuda", "bfloat16", seqlens, args.tokens, json_path=out)
        errors, failed = [], []
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report["summary"], indent=1))
    print(f"wrote {out}")
    if args.cpu_smoke and (failed or max(errors) > 1e-4):
        print(f"cpu smoke FAILED: errors {errors}, failures {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
