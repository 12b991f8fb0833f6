#!/usr/bin/env python
"""The wheels the GPU suite carries to a machine that has torch and Triton but no registry.

    python bench/gpu_wheels.py build   [--wheels bench/wheels]    # here: download + build (make gpu-wheels)
    python bench/gpu_wheels.py check   [--wheels bench/wheels]    # here: would they install on the device?
    python bench/gpu_wheels.py install --target DIR [--wheels ..] # there: install what is missing, verify

The GPU machine runs Python 3.12 on x86-64 with a fixed image (its package list is
bench/gpu_image_packages.txt, copied from the device documentation): torch, Triton,
numpy, sentencepiece, tokenizers, tensorboard, matplotlib and pytest are there, so only
the project's other dependencies travel, as py3.12 manylinux wheels, with the project
itself as a wheel and fla-core (flash-linear-attention's kernels, the benchmark's
baseline). DeepSpeed publishes only an sdist, so `build` turns it into a wheel here;
with no ops prebuilt (the project uses torch's AdamW, never DeepSpeed's compiled ops)
that wheel is pure Python.

`check` asks pip whether every wheel installs on cp312/manylinux x86-64 (a dry run, no
index) and whether every requirement of every wheel, and of requirements.txt, is met by
another carried wheel or by the image; it also adds up what travels (the working tree
plus the wheels), which the remote GPU runner caps at 64 MiB. `install` skips a carried
package that the image already holds in a version every requirement accepts, installs
the rest with `pip --target`, and checks the requirements again against what is then
importable. Each command prints one JSON object; the exit code is 1 when a check fails.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / "bench" / "wheels"
IMAGE_PACKAGES = REPO / "bench" / "gpu_image_packages.txt"
# The remote GPU runner's cap on the working tree plus carried paths.
CARRY_LIMIT = 64 * 2**20

# Carried, in the versions the CPU test suite runs (read from this environment at build
# time); fla-core is not installed here and is pinned to the release whose
# `chunk_simple_gla(q, k, v, g_gamma=..., scale=...)` bench/kernels.py calls.
CARRIED = ("megatron-core", "webdataset", "braceexpand", "hjson", "pydantic", "pydantic-core", "annotated-types",
           "typing-inspection", "typing-extensions", "zstandard")
SDIST_ONLY = ("deepspeed",)
PINNED = {"fla-core": "0.6.0"}
TARGET = dict(python="3.12", implementation="cp", abi="cp312",
              platforms=("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                         "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64"))
# Markers of the device's interpreter, for requirements such as `; python_version < "3.11"`.
TARGET_MARKERS = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
                  "implementation_name": "cpython", "platform_python_implementation": "CPython",
                  "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
                  "os_name": "posix"}


def _pip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", *args]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if check and p.returncode:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    return p


def _target_args() -> list[str]:
    args = ["--python-version", TARGET["python"], "--implementation", TARGET["implementation"],
            "--abi", TARGET["abi"], "--abi", "abi3", "--abi", "none", "--only-binary=:all:"]
    for p in TARGET["platforms"]:
        args += ["--platform", p]
    return args


def wheel_files(wheels: Path) -> list[Path]:
    return sorted(wheels.glob("*.whl"))


def wheel_requirements(path: Path) -> tuple[str, Version, list[Requirement]]:
    """(canonical name, version, Requires-Dist without extras) of a wheel file."""
    name, version, _, _ = parse_wheel_filename(path.name)
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        text = z.read(meta).decode()
    reqs = [Requirement(line.split(":", 1)[1].strip()) for line in text.splitlines()
            if line.startswith("Requires-Dist:")]
    return canonicalize_name(name), version, [r for r in reqs if _applies(r)]


def _applies(req: Requirement) -> bool:
    """Whether a requirement holds on the device (extras off)."""
    return req.marker is None or req.marker.evaluate({**TARGET_MARKERS, "extra": ""})


def project_requirements() -> list[Requirement]:
    reqs = []
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            if _applies(req):
                reqs.append(req)
    return reqs


def image_packages(path: Path = IMAGE_PACKAGES) -> dict[str, Version | None]:
    """name -> version (None where the documentation gives none) of the GPU image."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[canonicalize_name(name)] = Version(version) if version else None
    return out


def _version_or_none(text: str) -> Version | None:
    try:
        return Version(text)
    except InvalidVersion:  # a local build with a non-standard version: present, version unknown
        return None


def unmet(requirements: list[tuple[str, Requirement]], available: dict[str, Version | None]) -> list[str]:
    """Requirements (with who asks) that nothing available satisfies. A version of None
    (present, version unknown) is taken as a match: the device run verifies it."""
    bad = []
    for who, req in requirements:
        name = canonicalize_name(req.name)
        if name not in available:
            bad.append(f"{who} needs {req}: not carried, not in the image")
        elif available[name] is not None and not req.specifier.contains(available[name], prereleases=True):
            bad.append(f"{who} needs {req}: {name} {available[name]} there")
    return bad


def all_requirements(wheels: Path) -> tuple[dict[str, Version], list[tuple[str, Requirement]]]:
    carried, reqs = {}, [("requirements.txt", r) for r in project_requirements()]
    for path in wheel_files(wheels):
        name, version, wreqs = wheel_requirements(path)
        carried[name] = version
        reqs += [(f"{name} {version}", r) for r in wreqs]
    return carried, reqs


def tree_bytes() -> int:
    """Bytes of what the remote GPU runner sends besides the carried paths: tracked files and
    untracked ones that git does not ignore."""
    try:
        names = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO, check=True,
                               capture_output=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        return 0
    return sum((REPO / n).stat().st_size for n in names if n and (REPO / n).is_file())


# ---------------------------------------------------------------- commands

def build(wheels: Path) -> dict:
    import shutil
    if wheels.exists():
        shutil.rmtree(wheels)
    wheels.mkdir(parents=True)
    pins = {n: md.version(n) for n in CARRIED} | PINNED
    _pip("download", "--quiet", "--no-deps", *_target_args(), "-d", str(wheels),
         *(f"{n}=={v}" for n, v in pins.items()))
    with tempfile.TemporaryDirectory() as tmp:
        for name in SDIST_ONLY:
            _pip("download", "--quiet", "--no-deps", "--no-binary=:all:", "-d", tmp, f"{name}=={md.version(name)}")
        # No build isolation: DeepSpeed's setup.py imports torch, and an isolated build
        # would fetch a multi-GB torch just to find that no op is to be compiled.
        for sdist in Path(tmp).glob("*.tar.gz"):
            _pip("wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(sdist))
    # setuptools packs all of build/lib, files an earlier build left there included (a package
    # since renamed, say): the project's wheel starts from an empty build folder.
    shutil.rmtree(REPO / "build", ignore_errors=True)
    _pip("wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO))
    return check(wheels)


def check(wheels: Path) -> dict:
    files = wheel_files(wheels)
    result = {"wheels": [f.name for f in files], "wheel_bytes": sum(f.stat().st_size for f in files),
              "tree_bytes": tree_bytes(), "problems": []}
    result["carried_bytes"] = result["wheel_bytes"] + result["tree_bytes"]
    if not files:
        result["problems"].append(f"no wheels in {wheels}: run `make gpu-wheels`")
        return result
    if result["carried_bytes"] > CARRY_LIMIT:
        result["problems"].append(f"tree + wheels = {result['carried_bytes'] / 2**20:.1f} MiB > 64 MiB")
    names = [parse_wheel_filename(f.name)[0] for f in files]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        result["problems"].append(f"more than one wheel of {dupes}: pip would refuse the install")
    with tempfile.TemporaryDirectory() as tmp:
        p = _pip("install", "--dry-run", "--no-index", "--no-deps", "--ignore-installed", *_target_args(),
                 "--target", tmp, *map(str, files), check=False)
    if p.returncode:
        result["problems"].append("pip refuses them for cp312 manylinux x86-64: " + p.stderr.strip()[-600:])
    carried, reqs = all_requirements(wheels)
    result["problems"] += unmet(reqs, {**image_packages(), **carried})
    return result


def install(wheels: Path, target: Path) -> dict:
    carried, reqs = all_requirements(wheels)
    wanted: dict[str, list[Requirement]] = {}
    for _, req in reqs:
        wanted.setdefault(canonicalize_name(req.name), []).append(req)
    chosen, kept = [], {}
    for path in wheel_files(wheels):
        name = canonicalize_name(parse_wheel_filename(path.name)[0])
        try:
            have = _version_or_none(md.version(name))
        except md.PackageNotFoundError:
            have = None
        # The image's own copy stays when every requirement accepts it: a carried copy
        # would shadow it for torch and everything else that imports it.
        if have is not None and all(r.specifier.contains(have, prereleases=True) for r in wanted.get(name, [])):
            kept[name] = str(have)
        else:
            chosen.append(path)
    result = {"installed": [p.name for p in chosen], "kept_from_image": kept, "target": str(target), "problems": []}
    if chosen:
        p = _pip("install", "--quiet", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade",
                 "--target", str(target), *map(str, chosen), check=False)
        if p.returncode:
            result["problems"].append("pip install failed: " + (p.stdout + p.stderr).strip()[-1500:])
    # What is importable now, the target first (as PYTHONPATH will put it).
    available = {}
    for dist in md.distributions(path=[str(target), *sys.path]):
        name = canonicalize_name(dist.metadata["Name"] or "")
        if name and name not in available:
            available[name] = _version_or_none(dist.version)
    result["problems"] += unmet(reqs, available)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["build", "check", "install"])
    p.add_argument("--wheels", type=Path, default=WHEELS)
    p.add_argument("--target", type=Path, help="install: the folder to install into (then on PYTHONPATH)")
    a = p.parse_args(argv)
    if a.command == "install":
        if a.target is None:
            p.error("install needs --target")
        result = install(a.wheels, a.target)
    else:
        result = build(a.wheels) if a.command == "build" else check(a.wheels)
    print(json.dumps(result))
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(main())
