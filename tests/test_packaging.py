"""The project as an installable package: a wheel built from the source tree requires what
requirements.txt lists, carries the bundled configs and the kernels under their installed
names (megatron_transnormer/configs, transnormer_kernels) and nothing else at top level,
declares the console commands, and runs from where it is installed, away from the checkout.
The editable install's console commands answer --help."""
from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
# console command -> its module in megatron_transnormer.commands
COMMANDS = {"transnormer-train": "train", "transnormer-prepare": "prepare", "transnormer-prepare-lra": "prepare_lra",
            "transnormer-evaluate": "evaluate", "transnormer-generate": "generate", "transnormer-convert": "convert",
            "transnormer-export-hf": "export_hf", "transnormer-plan": "plan", "transnormer-lra-table": "lra_table"}
EXTRAS = {"test", "export", "parquet", "wandb"}


def _copy_sources(dest: Path) -> None:
    """The files git sees (tracked, or new and not ignored): a build in the checkout itself would
    reuse whatever an earlier build left in build/, and write into a tree others work in."""
    names = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    for name in names:
        if name and (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("packaging")
    _copy_sources(root / "src")
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                        "--no-index", "--disable-pip-version-check", str(root / "src"), "-w", str(root / "dist")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (path,) = (root / "dist").glob("megatron_transnormer-*.whl")
    return path


def _read(wheel: Path, suffix: str) -> str:
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.endswith(f".dist-info/{suffix}")]
        return z.read(name).decode()


def _key(req: Requirement) -> tuple:
    return canonicalize_name(req.name), str(req.specifier), str(req.marker or "")


def test_metadata_requires_every_requirement_and_offers_the_extras(wheel):
    meta = Parser().parsestr(_read(wheel, "METADATA"))
    required = [Requirement(r) for r in meta.get_all("Requires-Dist")]
    core = {_key(r) for r in required if "extra" not in str(r.marker or "")}
    lines = [line.split("#", 1)[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    wanted = {_key(Requirement(line)) for line in lines if line}
    assert wanted and wanted <= core, sorted(wanted - core)
    assert EXTRAS <= set(meta.get_all("Provides-Extra")), meta.get_all("Provides-Extra")


def test_wheel_holds_the_package_configs_and_kernels_only(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    top = {n.split("/")[0] for n in names if ".dist-info/" not in n}
    assert top == {"megatron_transnormer", "transnormer_kernels"}, top  # no kernels/, tools/, tests/, pretrain.py
    configs = {f"megatron_transnormer/configs/{p.relative_to(REPO / 'configs').as_posix()}"
               for p in (REPO / "configs").rglob("*.yaml")}
    assert "megatron_transnormer/configs/alm/tiny_cpu.yaml" in configs and configs <= names, sorted(configs - names)
    kernels = {f"transnormer_kernels/{p.name}" for p in (REPO / "kernels").glob("*.py")}
    assert "transnormer_kernels/__init__.py" in kernels and kernels <= names, sorted(kernels - names)
    # pyproject.toml lists the packages by hand: a package folder left off that list is missing here.
    package = {p.relative_to(REPO).as_posix() for p in (REPO / "megatron_transnormer").rglob("*.py")
               if "__pycache__" not in p.parts}
    assert package <= names, sorted(package - names)


def test_entry_points_name_the_commands(wheel):
    entry_points = configparser.ConfigParser(delimiters=("=",))
    entry_points.optionxform = str  # names are case-sensitive
    entry_points.read_string(_read(wheel, "entry_points.txt"))
    assert dict(entry_points["console_scripts"]) == {
        name: f"megatron_transnormer.commands.{module}:main" for name, module in COMMANDS.items()}


# Run by a fresh interpreter without site (-S: no .pth, so no editable install of the project) and
# outside the checkout; PYTHONPATH holds the installed wheel, then the dependencies.
INSTALLED = r"""
import importlib.metadata, json, os, sys
assert sys.argv[1] not in sys.path and os.getcwd() != sys.argv[1], sys.path  # the checkout is not importable
import megatron_transnormer, transnormer_kernels
from megatron_transnormer.config import load_config, resolve_config_path
load_config("alm/tiny_cpu", [])
commands = {ep.name: ep.load() and sys.modules[ep.module].__file__
            for ep in importlib.metadata.entry_points(group="console_scripts") if ep.name.startswith("transnormer-")}
print(json.dumps({"package": megatron_transnormer.__file__, "kernels": transnormer_kernels.__file__,
                  "config": str(resolve_config_path("alm/tiny_cpu")), "commands": commands}))
"""


def test_installed_wheel_runs_away_from_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                        "--disable-pip-version-check", "--target", str(site), str(wheel)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert not (site / "kernels").exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": f"{site}:{sysconfig.get_paths()['purelib']}"}
    p = subprocess.run([sys.executable, "-S", "-c", INSTALLED, str(REPO)], cwd=elsewhere, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    found = json.loads(p.stdout.strip().splitlines()[-1])
    assert Path(found["package"]) == site / "megatron_transnormer" / "__init__.py"
    assert Path(found["kernels"]) == site / "transnormer_kernels" / "__init__.py"
    assert Path(found["config"]) == site / "megatron_transnormer" / "configs" / "alm" / "tiny_cpu.yaml"
    assert found["commands"] == {name: str(site / "megatron_transnormer" / "commands" / f"{module}.py")
                                 for name, module in COMMANDS.items()}


def _command(name: str, *args: str) -> subprocess.CompletedProcess:
    path = Path(sys.executable).parent / name
    assert path.is_file(), f"{path} missing: the editable install predates [project.scripts] (make install)"
    return subprocess.run([str(path), *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_editable_install_has_the_console_commands():
    train = _command("transnormer-train", "--help")
    assert train.returncode == 0, train.stderr[-3000:]
    assert "bundled configs (--config NAME):" in train.stdout and "settings (key=value words" in train.stdout
    assert "train.steps" in train.stdout and "model.hidden_size" in train.stdout
    prepare = _command("transnormer-prepare", "--help")
    assert prepare.returncode == 0, prepare.stderr[-3000:]
    assert prepare.stdout.startswith("usage: transnormer-prepare") and "--output" in prepare.stdout
