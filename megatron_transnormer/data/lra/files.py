"""Finding the official files under the folder the user names, and reading them with
errors that name the file (and line)."""
from __future__ import annotations

import os
from typing import Iterator

from megatron_transnormer.data.manifest import DataError


def find_base(input_dir: str, subdirs: list[str], marker: str, what: str) -> str:
    """The first of input_dir/sub (sub = "" for input_dir itself) that holds `marker`, so
    that the user may name the release folder or the task's own folder."""
    if not input_dir:
        raise DataError(f"{what}: --input DIR is required")
    if not os.path.isdir(input_dir):
        raise DataError(f"{what}: --input {input_dir}: no such folder")
    tried = []
    for sub in subdirs:
        base = os.path.join(input_dir, sub) if sub else input_dir
        if os.path.exists(os.path.join(base, marker)):
            return base
        tried.append(os.path.join(base, marker))
    raise DataError(f"{what}: {tried[0]} is missing (also looked for {', '.join(tried[1:])})" if len(tried) > 1
                    else f"{what}: {tried[0]} is missing")


def require_files(paths: list[str], what: str) -> None:
    """Fail before writing anything when one of the inputs is missing."""
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(f"{what}: {path} is missing")


def text_lines(path: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its line end) of a UTF-8 file, read as it goes.
    Lines end at "\n" only (a "\r" before it is dropped): a lone "\r" is document text."""
    try:
        with open(path, encoding="utf-8", newline="\n") as f:
            for number, line in enumerate(f, 1):
                yield number, line.rstrip("\n").rstrip("\r")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from None


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from None
