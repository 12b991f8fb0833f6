"""The GPU suite's pieces on CPU: the report's target logic, the wheel checks, the suite
script's stage bookkeeping under its time limit, and the new benchmark modes in their
tiny CPU forms. The whole dry run (every stage, a few minutes on two cores) is
`make gpu-suite-dry-run`."""
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load(name: str):
    # By path, not by putting bench/ on sys.path: bench/ is a folder of scripts, not a package,
    # and its module names (kernels, generation, ...) would shadow others for later tests.
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_report = _load("gpu_report")
gpu_wheels = _load("gpu_wheels")


def _kernel_rows(rates: dict[str, dict[int, float]]) -> list[dict]:
    return [{"n": n, "batch": 1, "method": m, "dtype": "bfloat16", "fwd_tokens_per_s": 2 * r,
             "fwd_bwd_tokens_per_s": r} for m, by_n in rates.items() for n, r in by_n.items()]


def _write_folder(tmp_path: Path, ours: dict[int, float], sdpa: dict[int, float], fla: dict[int, float] | None,
                  train_summary: dict) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    rates = {"triton": ours, "sdpa_flash": sdpa}
    skipped = {}
    if fla is None:
        skipped["fla_chunk_simple_gla"] = "import failed: ModuleNotFoundError: No module named 'fla'"
    else:
        rates["fla_chunk_simple_gla"] = fla
    lengths = ",".join(str(n) for n in sorted(ours))
    (tmp_path / "kernels_norm.json").write_text(json.dumps({
        "args": {"seqlens": lengths, "heads": 16, "dim": 128}, "results": _kernel_rows(rates),
        "skipped_methods": skipped, "summary": {"ours": "triton"}, "complete": True}))
    (tmp_path / "train_throughput.json").write_text(json.dumps({
        "config": "scale/385m", "device": "NVIDIA H200", "complete": True,
        "args": {"long_lengths": "2048,8192,32768"}, "runs": [], "summary": train_summary}))
    (tmp_path / "stages.jsonl").write_text(
        json.dumps({"stage": "env", "gpu": "NVIDIA H200", "driver": "580", "torch": "2.11.0", "triton": "3.6.0",
                    "date": "2026-01-01 00:00 UTC"}) + "\n"
        + json.dumps(gpu_report.stage_record("tests", 0, 12.0, 110, None)) + "\n")
    return tmp_path


def _targets(text: str) -> dict[str, str]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 3 and any(m in cells[2] for m in ("**met**", "**missed**", "not measured")):
            rows[cells[0]] = cells[2]
    return rows


def test_report_marks_targets_met_and_missed(tmp_path):
    lengths = [1024, 2048, 4096, 65536]
    folder = _write_folder(
        tmp_path, ours={n: 100.0 for n in lengths}, sdpa={1024: 200.0, 2048: 120.0, 4096: 90.0, 65536: 5.0},
        fla={1024: 100.0, 2048: 100.0, 4096: 99.0, 65536: 101.0},
        train_summary={"seq_len": 2048, "mfu": 0.41, "tflops_per_device": 405.0, "kernels_speedup": 1.3,
                       "long_context_step_s": {"2048": 1.0, "8192": 1.1, "32768": 1.3}})
    text = gpu_report.render(folder)
    marks = _targets(text)
    assert len(marks) == 9, marks
    flat, sdpa, fla, *decay, mfu, speedup, longctx = marks.values()
    assert all(m == "not measured (no kernels_decay.json)" for m in decay)
    assert "**met**" in flat            # equal rates at every length
    assert "**met**" in sdpa            # SDPA is faster below 4K, which the target leaves out
    assert "**missed**" in fla          # 0.99× of fla at 4K
    assert "**met**" in mfu and "**met**" in speedup
    assert "**missed**" in longctx      # 1.0 / 1.3 < 0.85
    assert "NVIDIA H200" in text and "2.11.0" in text


def test_report_without_fla_or_training_says_not_measured(tmp_path):
    folder = _write_folder(tmp_path, ours={2048: 100.0, 4096: 50.0}, sdpa={2048: 10.0, 4096: 10.0}, fla=None,
                           train_summary={})
    (folder / "train_throughput.json").unlink()
    marks = list(_targets(gpu_report.render(folder)).values())
    assert "**missed**" in marks[0]  # 50 / 100 is not flat
    assert "not measured (import failed" in marks[2]
    assert all("not measured" in m for m in marks[3:])


def test_report_merges_a_rerun(tmp_path):
    """A rerun of some stages (GPU_SUITE_STAGES) adds to the first run's folder: its files and
    the stages it ran replace the first run's, the stages it skipped do not."""
    first = _write_folder(tmp_path / "a", ours={2048: 100.0, 4096: 100.0}, sdpa={4096: 10.0}, fla=None,
                          train_summary={})
    (first / "train_throughput.json").unlink()
    with (first / "stages.jsonl").open("a") as f:
        f.write(json.dumps(gpu_report.stage_record("train", 124, 200, 200, None)) + "\n")
    rerun = tmp_path / "b"
    rerun.mkdir()
    (rerun / "stages.jsonl").write_text(json.dumps(gpu_report.stage_record("tests", -1, 0, 100, None)) + "\n"
                                        + json.dumps(gpu_report.stage_record("train", 0, 150, 200, None)) + "\n")
    (rerun / "train_throughput.json").write_text(json.dumps({"args": {}, "runs": [], "summary": {
        "seq_len": 2048, "mfu": 0.3, "tflops_per_device": 300.0}}))
    text = gpu_report.render([first, rerun])
    assert "| tests | ok |" in text and "| train | ok |" in text
    assert _targets(text)["385M MFU at seq 2048, kernels on (≥ 40 %)"] == "**missed**"


def test_report_replaces_its_section_of_results(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text(f"# Results\n\nbefore\n\n{gpu_report.BEGIN}\nold\n{gpu_report.END}\n\nafter\n")
    gpu_report.update_results(results, "## GPU suite: new\n")
    text = results.read_text()
    assert "old" not in text and "## GPU suite: new" in text and text.index("before") < text.index("new") < \
        text.index("after")


def test_junit_summary(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
                   '<testcase classname="a" name="ok"/><testcase classname="a" name="bad"><failure/></testcase>'
                   '<testcase classname="a" name="skip"><skipped/></testcase></testsuite></testsuites>')
    rec = gpu_report.stage_record("tests", 1, 3.0, 110, xml)
    assert rec["status"] == "failed"
    assert rec["tests"] == {"tests": 3, "failures": 1, "errors": 0, "skipped": 1, "passed": 1, "failed": ["a::bad"]}
    assert gpu_report.stage_record("x", 124, 1, 1, None)["status"] == "timed out"


def _fake_wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    path = folder / f"{name}-{version}-py3-none-any.whl"
    meta = "\n".join(["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
                      *(f"Requires-Dist: {r}" for r in requires)])
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta + "\n")
    return path


def test_wheel_requirements_against_image_and_carried(tmp_path):
    _fake_wheel(tmp_path, "alpha", "1.0", ["beta>=2", "numpy", "torch>=99", 'gamma; python_version < "3.11"',
                                           'delta; extra == "docs"'])
    _fake_wheel(tmp_path, "beta", "2.1", [])
    carried, reqs = gpu_wheels.all_requirements(tmp_path)
    assert carried["alpha"].public == "1.0"
    names = {r.name for who, r in reqs if who.startswith("alpha")}
    assert names == {"beta", "numpy", "torch"}  # markers false on Python 3.12, extras off
    image = gpu_wheels.image_packages()
    assert image["torch"] is not None and "numpy" in image
    problems = gpu_wheels.unmet([(w, r) for w, r in reqs if w.startswith("alpha")], {**image, **carried})
    assert problems == [f"alpha 1.0 needs torch>=99: torch {image['torch']} there"]


@pytest.mark.skipif(not list((REPO / "bench" / "wheels").glob("*.whl")), reason="no bench/wheels: make gpu-wheels")
def test_carried_wheels_fit_the_device():
    result = gpu_wheels.check(REPO / "bench" / "wheels")
    assert result["problems"] == [], result["problems"]
    assert result["carried_bytes"] < gpu_wheels.CARRY_LIMIT


def _run(cmd, env=None, timeout=120):
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_suite_records_every_stage_within_its_limit(tmp_path):
    """With 20 s in all, less than the report's reserve plus a stage's minimum, every stage is
    recorded as skipped; the report is written anyway and the exit code says the suite is
    incomplete."""
    p = _run(["bash", "bench/gpu_suite.sh", "--dry-run"],
             env={"OUT": str(tmp_path), "GPU_SUITE_LIMIT_S": "20", "PYTHON": sys.executable})
    stages = [json.loads(line) for line in (tmp_path / "stages.jsonl").read_text().splitlines()]
    assert [s["stage"] for s in stages] == ["env", "install", "tests", "kernels_norm", "kernels_decay",
                                            "kernels_diag", "kernels_rms", "train"], p.stdout + p.stderr
    assert all(s["status"] == "skipped" for s in stages[1:]), stages
    assert p.returncode == 1
    report = (tmp_path / "gpu_report.md").read_text()
    assert "CPU dry run" in report and "| train | skipped |" in report
    assert sorted(f.name for f in tmp_path.iterdir()) == ["gpu_report.md", "gpu_suite.log", "stages.jsonl"]


def test_kernel_bench_rms_cpu_smoke(tmp_path):
    out = tmp_path / "kernels_rms.json"
    p = _run([sys.executable, "bench/kernels.py", "--cpu-smoke", "--rms", "--out", str(out)])
    assert p.returncode == 0, p.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["complete"] and {r["method"] for r in data["results"]} == {"triton_rms", "torch_rms"}
    assert all("error" not in r for r in data["results"])


def test_train_throughput_dry_run(tmp_path):
    out = tmp_path / "train.json"
    p = _run([sys.executable, "bench/train_throughput.py", "--dry-run", "--kernels", "torch", "--long-lengths", "",
              "--out", str(out)], timeout=180)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    data = json.loads(out.read_text())
    (run,) = data["runs"]
    assert data["complete"] and run["timed_steps"] == 2 and run["tokens_per_s"] > 0
    assert run["first_loss"] == pytest.approx(run["last_loss"], rel=0.5)  # finite, plausible losses
