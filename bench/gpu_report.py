#!/usr/bin/env python
"""The GPU suite's bookkeeping and its report: bench/gpu_suite.sh's output folder -> markdown.

    python bench/gpu_report.py report DIR [DIR ...] [--results bench/RESULTS.md] [--output FILE]
    python bench/gpu_report.py env                                       # one JSON line: the machine
    python bench/gpu_report.py record NAME RC SECONDS BUDGET [--junit X] # one JSON line: a stage

The suite appends `env` and one `record` per stage to DIR/stages.jsonl; the benchmarks
write DIR/kernels_{norm,decay,diag,rms}.json and DIR/train_throughput.json. `report`
reads whatever of these exists (a stage that failed or ran out of time leaves its file
partial or absent) and writes a markdown section: the machine, the stages, the tests,
each kernel table, the training runs, and every target of bench/RESULTS.md beside the
figure it is read from, marked met, missed or not measured. With --results it also
replaces the section between the GPU-suite markers of that file. Several folders (a
full run, then a rerun of some stages with GPU_SUITE_STAGES) make one report: a file
is taken from the last folder that has it, a stage from the last that ran it. The
markdown goes to --output, by default the first folder's gpu_report.md (the device
tool's copies are read-only: then it is only printed). Nothing here holds a figure of
its own: every number comes from the folders.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

BEGIN, END = "<!-- gpu-suite:begin -->", "<!-- gpu-suite:end -->"
KERNEL_FILES = (("norm", "Causal NormAttention"), ("decay", "Causal NormAttention with per-head decay"),
                ("diag", "DiagAttention (softmax, causal, 64-token blocks)"),
                ("rms", "SimpleRMSNorm ([tokens, H·d] rows; n = tokens)"))
FLAT = 0.85  # "flat within 15 %": slowest over fastest ≥ 0.85
MFU_TARGET = 0.40


# ---------------------------------------------------------------- env and stage records

def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(module)
    except Exception:
        return None


def env_record() -> dict:
    rec = {"stage": "env", "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "python": platform.python_version(), "host_cpus": _cpu_count()}
    smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    if smi:
        name, driver, memory = [x.strip() for x in smi.splitlines()[0].split(",")][:3]
        rec.update(gpu=name, driver=driver, gpu_memory=memory)
    try:
        import torch
        rec.update(torch=torch.__version__, cuda=torch.version.cuda)
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            rec.update(device=torch.cuda.get_device_name(0), sm=f"{p.major}.{p.minor}",
                       multiprocessors=p.multi_processor_count)
        else:
            rec["device"] = "cpu"
    except Exception as exc:  # the report must still be written
        rec["torch_error"] = f"{type(exc).__name__}: {exc}"
    for name in ("triton", "deepspeed", "megatron-core", "fla-core"):
        rec[name] = _version(name)
    return rec


def _cpu_count() -> int:
    import os
    return os.cpu_count() or 0


def junit_summary(path: Path) -> dict:
    """Counts and failing test ids of a pytest --junitxml file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    out = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    out["passed"] = out["tests"] - out["failures"] - out["errors"] - out["skipped"]
    out["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
                     if c.find("failure") is not None or c.find("error") is not None][:50]
    return out


def stage_record(name: str, rc: int, seconds: float, budget: float, junit: Path | None) -> dict:
    status = "ok" if rc == 0 else "timed out" if rc in (124, 137) else "skipped" if rc == -1 else "failed"
    rec = {"stage": name, "rc": rc, "status": status, "seconds": round(seconds, 1), "budget_s": budget}
    if junit is not None and junit.is_file():
        try:
            rec["tests"] = junit_summary(junit)
        except ET.ParseError as exc:
            rec["tests_error"] = str(exc)
    return rec


# ---------------------------------------------------------------- reading the folder

def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_stages(folders: list[Path]) -> tuple[dict, list[dict]]:
    env, stages = {}, {}
    for folder in folders:
        path = folder / "stages.jsonl"
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("stage") == "env":
                env = rec
            elif rec.get("status") != "skipped" or rec.get("stage") not in stages:
                stages[rec.get("stage")] = rec
    return env, list(stages.values())


def _latest(folders: list[Path], name: str) -> dict | None:
    for folder in reversed(folders):
        if (data := _load(folder / name)) is not None:
            return data
    return None


def _rates(results: list[dict], method: str, key: str = "fwd_bwd_tokens_per_s") -> dict[int, float]:
    return {r["n"]: r[key] for r in results if r.get("method") == method and key in r}


def _fmt(x, spec=".2f", none="–"):
    return none if x is None else format(x, spec)


def _mark(ok: bool | None, why: str = "") -> str:
    if ok is None:
        return f"not measured{f' ({why})' if why else ''}"
    return "**met**" if ok else "**missed**"


# ---------------------------------------------------------------- targets

def kernel_targets(kern: dict[str, dict]) -> list[tuple[str, str, str]]:
    """The NormAttention targets, for the plain kernel and again for the one with decay."""
    return _norm_targets(kern.get("norm"), "", "kernels_norm.json") + \
        _norm_targets(kern.get("decay"), ", with decay", "kernels_decay.json")


def _norm_targets(norm: dict | None, suffix: str, file: str) -> list[tuple[str, str, str]]:
    titles = [f"fwd+bwd throughput flat within 15 % from 2K to 64K{suffix} (≥ 0.85)",
              f"faster than SDPA flash from 4K{suffix} (fwd+bwd)",
              f"at least as fast as fla chunk_simple_gla at every length{suffix} (fwd+bwd)"]
    rows = []
    if norm is None:
        return [(t, "–", _mark(None, f"no {file}")) for t in titles]
    ours_name = norm["summary"]["ours"] if "summary" in norm else "triton"
    res = norm.get("results", [])
    asked = sorted(int(x) for x in str(norm.get("args", {}).get("seqlens", "")).split(",") if x.strip())
    ours = _rates(res, ours_name)
    long_n = [n for n in asked if n >= 2048]
    have = [n for n in long_n if n in ours]
    if len(have) >= 2:
        flat = min(ours[n] for n in have) / max(ours[n] for n in have)
        missing = sorted(set(long_n) - set(have))
        figure = f"slowest / fastest = {flat:.2f} over n = {have[0]}–{have[-1]}" + (
            f" (n = {missing} missing)" if missing else "")
        rows.append((titles[0], figure,
                     _mark(flat >= FLAT) if not missing else _mark(None, f"n = {missing} missing") +
                     (", **missed** on the rest" if flat < FLAT else "")))
    else:
        rows.append((titles[0], "–", _mark(None, "too few lengths")))
    for other, title, lo, strict in (("sdpa_flash", titles[1], 4096, True),
                                     ("fla_chunk_simple_gla", titles[2], 0, False)):
        theirs = _rates(res, other)
        if other in norm.get("skipped_methods", {}):
            rows.append((title, "–", _mark(None, norm["skipped_methods"][other])))
            continue
        sp = {n: ours[n] / theirs[n] for n in ours if n in theirs and n >= lo}
        if not sp:
            rows.append((title, "–", _mark(None, "no common lengths")))
            continue
        ok = all((v > 1) if strict else (v >= 1) for v in sp.values())
        figure = "speed-up " + ", ".join(f"{_n(n)} {v:.2f}×" for n, v in sorted(sp.items()))
        rows.append((title, figure, _mark(ok)))
    return rows


def _n(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def train_targets(train: dict | None) -> list[tuple[str, str, str]]:
    titles = ("385M MFU at seq 2048, kernels on (≥ 40 %)", "kernels-on speed-up, end to end (> 1)",
              "long-context step time flat within 15 % from 2K to 32K (≥ 0.85)")
    if train is None:
        return [(t, "–", _mark(None, "no train_throughput.json")) for t in titles]
    s = train.get("summary", {})
    rows = []
    mfu = s.get("mfu")
    if mfu is None:
        rows.append((titles[0], "–", _mark(None, "no MFU (CPU, or the kernels-on run failed)")))
    else:
        at = s.get("seq_len")
        note = "" if at == 2048 else f" (at seq {at}, not 2048)"
        rows.append((titles[0], f"MFU {100 * mfu:.1f} % ({_fmt(s.get('tflops_per_device'), '.0f')} TFLOP/s){note}",
                     _mark(mfu >= MFU_TARGET) if at == 2048 else _mark(None, f"seq {at}")))
    sp = s.get("kernels_speedup")
    rows.append((titles[1], "–" if sp is None else f"{sp:.2f}×",
                 _mark(None, "a run failed") if sp is None else _mark(sp > 1)))
    steps = {int(k): v for k, v in s.get("long_context_step_s", {}).items()}
    asked = [int(x) for x in str(train.get("args", {}).get("long_lengths", "")).split(",") if x.strip()]
    if len(steps) >= 2:
        flat = min(steps.values()) / max(steps.values())
        missing = sorted(set(asked) - set(steps))
        figure = "step " + ", ".join(f"{_n(n)} {1e3 * v:.0f} ms" for n, v in sorted(steps.items())) + \
            f"; fastest / slowest = {flat:.2f}"
        rows.append((titles[2], figure, _mark(flat >= FLAT) if not missing else _mark(None, f"n = {missing} missing")))
    else:
        rows.append((titles[2], "–", _mark(None, "fewer than two lengths ran")))
    return rows


# ---------------------------------------------------------------- the markdown

def kernel_table(name: str, title: str, data: dict) -> list[str]:
    res = data.get("results", [])
    methods = list(dict.fromkeys(r["method"] for r in res))
    if not methods:
        return [f"**{title}**: no rows" + ("" if data.get("complete") else " (cut short)"), ""]
    ours = methods[0]
    a = data.get("args", {})
    first = res[0]
    head = (f"**{title}** — {a.get('heads')} heads, d = {a.get('dim')}, "
            + (f"B·n = {first['batch'] * first['n']} tokens" if name != "rms" else "one row per token")
            + f", {first.get('dtype')}; M tokens/s, fwd / fwd+bwd; (×) = ours over that method, fwd+bwd"
            + ("" if data.get("complete") else "; **cut short**"))
    lines = [head, "", "| n | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    ours_fb = _rates(res, ours)
    for n in sorted({r["n"] for r in res}):
        cells = []
        for m in methods:
            row = next((r for r in res if r["n"] == n and r["method"] == m), None)
            if row is None:
                cells.append("–")
            elif "error" in row:
                cells.append(row["error"][:40])
            else:
                cell = f"{row['fwd_tokens_per_s'] / 1e6:.3g} / {row['fwd_bwd_tokens_per_s'] / 1e6:.3g}"
                if m != ours and n in ours_fb:
                    cell += f" ({ours_fb[n] / row['fwd_bwd_tokens_per_s']:.2f}×)"
                cells.append(cell)
        lines.append(f"| {_n(n)} | " + " | ".join(cells) + " |")
    for m, why in data.get("skipped_methods", {}).items():
        lines.append(f"\n{m}: not run, {why}")
    return lines + [""]


def train_table(train: dict) -> list[str]:
    lines = [f"**End to end** — `{train.get('config')}` on one {train.get('device', 'device')}, synthetic tokens, "
             f"`Runtime.train_step` timed after warm-up" + ("" if train.get("complete") else "; **cut short**"), "",
             "| run | micro-batch × seq | timed steps | step ms (median) | tokens/s | TFLOP/s | MFU | peak GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in train.get("runs", []):
        if "error" in r:
            lines.append(f"| {r['name']} | {r['micro_batch']} × {r['seq_len']} | {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['name']} | {r['micro_batch']} × {r['seq_len']} | {r['timed_steps']} | "
                     f"{_fmt(r.get('step_s_median') and 1e3 * r['step_s_median'], '.1f')} | "
                     f"{_fmt(r.get('tokens_per_s'), ',.0f')} | {_fmt(r.get('tflops_per_device'), '.1f')} | "
                     f"{_fmt(r.get('mfu') and 100 * r['mfu'], '.1f')} | {_fmt(r.get('peak_memory_gib'), '.1f')} |")
    params = next((r["parameters"] for r in train.get("runs", []) if "parameters" in r), None)
    peak = next((r["peak_tflops"] for r in train.get("runs", []) if r.get("peak_tflops")), None)
    if params:
        lines.append(f"\n{params:,} parameters; MFU over the device's dense bf16 peak ({_fmt(peak, '.0f')} TFLOP/s, "
                     "`training.metrics.PEAK_BF16_TFLOPS`).")
    return lines + [""]


def render(folders: Path | list[Path]) -> str:
    folders = [folders] if isinstance(folders, Path) else list(folders)
    env, stages = read_stages(folders)
    kern = {name: d for name, _ in KERNEL_FILES if (d := _latest(folders, f"kernels_{name}.json")) is not None}
    train = _latest(folders, "train_throughput.json")
    dry = bool(train and train.get("dry_run")) or env.get("device") == "cpu"
    lines = ["## GPU suite: " + (env.get("gpu") or env.get("device") or "unknown device")
             + (" (CPU dry run: pipeline check, not results)" if dry else ""), ""]
    lines.append(f"{env.get('date', 'date unknown')}; driver {env.get('driver', '–')}, "
                 f"CUDA {env.get('cuda', '–')}, torch {env.get('torch', '–')}, Triton {env.get('triton', '–')}, "
                 f"Python {env.get('python', '–')}, "
                 f"DeepSpeed {env.get('deepspeed', '–')}, megatron-core {env.get('megatron-core', '–')}, "
                 f"fla-core {env.get('fla-core') or 'absent'}. Produced by `bash bench/gpu_suite.sh`, "
                 f"written by `bench/gpu_report.py`.")
    lines += ["", "| target | figure | result |", "|---|---|---|"]
    for t, fig, mark in kernel_targets(kern) + train_targets(train):
        lines.append(f"| {t} | {fig} | {mark} |")
    lines += ["", "| stage | status | seconds (budget) |", "|---|---|---|"]
    for s in stages:
        status = s["status"] if s["rc"] in (0, -1) else f"{s['status']} (exit {s['rc']})"
        lines.append(f"| {s['stage']} | {status} | {s['seconds']} ({s['budget_s']}) |")
    tests = next((s for s in stages if "tests" in s), None)
    if tests:
        t = tests["tests"]
        lines += ["", f"**Correctness** (`pytest -m gpu tests/kernels`, bf16/fp16 ≤ 1e-2 and fp32 ≤ 1e-5 relative "
                  f"to float64): {t['passed']} passed, {t['failures'] + t['errors']} failed, {t['skipped']} skipped."]
        lines += [f"- failed: `{name}`" for name in t["failed"]]
    lines.append("")
    for name, title in KERNEL_FILES:
        if name in kern:
            lines += kernel_table(name, title, kern[name])
    if train is not None:
        lines += train_table(train)
    return "\n".join(lines).rstrip() + "\n"


def update_results(results: Path, section: str) -> None:
    """Put the section between the markers of `results` (appended, with markers, if absent)."""
    text = results.read_text()
    block = f"{BEGIN}\n{section}{END}"
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: block, text, count=1, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    results.write_text(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("report")
    r.add_argument("folders", type=Path, nargs="+")
    r.add_argument("--results", type=Path, help="also replace the GPU-suite section of this markdown file")
    r.add_argument("--output", type=Path, help="default: the first folder's gpu_report.md")
    sub.add_parser("env")
    rec = sub.add_parser("record")
    rec.add_argument("name")
    rec.add_argument("rc", type=int, help="exit code; -1: not run (no time left)")
    rec.add_argument("seconds", type=float)
    rec.add_argument("budget", type=float)
    rec.add_argument("--junit", type=Path)
    a = p.parse_args(argv)
    if a.command == "env":
        print(json.dumps(env_record()))
    elif a.command == "record":
        print(json.dumps(stage_record(a.name, a.rc, a.seconds, a.budget, a.junit)))
    else:
        section = render(a.folders)
        output = a.output or a.folders[0] / "gpu_report.md"
        try:
            output.write_text(section)
        except OSError as exc:
            print(f"not written: {output} ({exc.strerror})", file=sys.stderr)
        if a.results:
            update_results(a.results, section)
        print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
