"""Tiny stand-ins for the official LRA files, written the way the releases lay them out,
for the tests of tools/prepare_lra.py (this module holds the writers and checks them)."""
from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "tools", "prepare_lra.py")


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TOOL, "--quiet", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120)


def write_lines(path: str, lines: list[str]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("".join(line + "\n" for line in lines))
    return path


def write_listops(root: str, rows: dict[str, list[tuple[str, int]]]) -> str:
    """root/listops-1000/basic_{train,val,test}.tsv from split -> [(source, value)]."""
    base = os.path.join(root, "listops-1000")
    for split, items in rows.items():
        write_lines(os.path.join(base, f"basic_{split}.tsv"), ["Source\tTarget"] + [f"{s}\t{v}" for s, v in items])
    return base


def write_imdb(root: str, reviews: dict[str, dict[str, list[str]]]) -> str:
    """root/aclImdb/{split}/{neg,pos}/<i>_<rating>.txt."""
    base = os.path.join(root, "aclImdb")
    for split, by_label in reviews.items():
        for label, texts in by_label.items():
            folder = os.path.join(base, split, label)
            os.makedirs(folder, exist_ok=True)
            for i, text in enumerate(texts):
                with open(os.path.join(folder, f"{i}_{7 if label == 'pos' else 2}.txt"), "w", encoding="utf-8",
                          newline="") as f:
                    f.write(text)
    return base


def write_aan(root: str, rows: dict[str, list[tuple[str, str, str]]]) -> str:
    """root/tsv_data/new_aan_pairs.{train,eval,test}.tsv from split -> [(label, text1, text2)]."""
    base = os.path.join(root, "tsv_data")
    for split, items in rows.items():
        write_lines(os.path.join(base, f"new_aan_pairs.{split}.tsv"),
                    [f"{label}\tdoc{i}a\tdoc{i}b\t{t1}\t{t2}" for i, (label, t1, t2) in enumerate(items)])
    return base


def cifar_record(k: int, label: int) -> bytes:
    """Record k: pixel 0 pure red, pixel 1 gray level k (identifies the record), pixel 2 pure
    green, pixel 3 (10, 200, 30); the rest a pattern of k."""
    rgb = np.zeros((3, 1024), dtype=np.uint8)
    rgb[:, 4:] = (np.arange(1020) * 3 + k) % 256
    rgb[:, 0] = (255, 0, 0)
    rgb[:, 1] = (k, k, k)
    rgb[:, 2] = (0, 255, 0)
    rgb[:, 3] = (10, 200, 30)
    return bytes([label]) + rgb.tobytes()


def write_cifar(root: str, per_batch: int = 4, test: int = 3) -> str:
    """root/cifar-10-batches-bin: training record k (k = 0, 1, ... over the 5 files) has label
    k % 10; test record j has gray level 100 + j and label (j + 3) % 10."""
    base = os.path.join(root, "cifar-10-batches-bin")
    os.makedirs(base, exist_ok=True)
    k = 0
    for b in range(1, 6):
        with open(os.path.join(base, f"data_batch_{b}.bin"), "wb") as f:
            for _ in range(per_batch):
                f.write(cifar_record(k, k % 10))
                k += 1
    with open(os.path.join(base, "test_batch.bin"), "wb") as f:
        for j in range(test):
            f.write(cifar_record(100 + j, (j + 3) % 10))
    return base


def pathfinder_pixels(i: int, side: int) -> np.ndarray:
    """Image i: first pixel i, then a pattern."""
    pixels = ((np.arange(side * side) * 5 + i * 11) % 256).astype(np.uint8)
    pixels[0] = i
    return pixels.reshape(side, side)


def write_pathfinder(root: str, n: int, side: int, release_dir: str = "pathfinder32",
                     files: tuple[int, ...] = (2, 10)) -> str:
    """root/<release_dir>/curv_contour_length_14: images imgs/<i // 5>/sample_<i>.png
    (`pathfinder_pixels`, label i % 2), indexed by metadata files named by `files`, in order
    (file files[f] lists the f-th consecutive block of images)."""
    from PIL import Image
    base = os.path.join(root, release_dir, "curv_contour_length_14")
    per_file = math.ceil(n / len(files))
    for f, number in enumerate(files):
        lines = []
        for i in range(f * per_file, min(n, (f + 1) * per_file)):
            folder = os.path.join(base, "imgs", str(i // 5))
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(pathfinder_pixels(i, side)).save(os.path.join(folder, f"sample_{i}.png"))
            lines.append(f"imgs/{i // 5} sample_{i}.png {i} {i % 2} 2 1.5 14")
        write_lines(os.path.join(base, "metadata", f"{number}.npy"), lines)
    return base


def evaluate_listops(source: str) -> int:
    """An evaluator written apart from the generator: a stack over LRA's tokens (parentheses
    dropped); MED is the median rounded down, SM the sum mod 10."""
    stack: list[tuple[str, list[int]]] = []
    result = None
    ops = {"[MAX": max, "[MIN": min, "[MED": lambda a: math.floor(statistics.median(a)),
           "[SM": lambda a: sum(a) % 10}
    for token in source.replace("(", " ").replace(")", " ").split():
        if token in ops:
            stack.append((token, []))
        elif token == "]":
            op, args = stack.pop()
            value = ops[op](args)
            if stack:
                stack[-1][1].append(value)
            else:
                result = value
        else:
            digit = int(token)
            if stack:
                stack[-1][1].append(digit)
            else:
                result = digit
    assert not stack, f"unclosed expression: {source[:80]}"
    return result


def test_evaluator_on_hand_checked_expressions():
    assert evaluate_listops("( ( ( [MAX 2 ) ( ( ( [MIN 7 ) 3 ) ] ) ) ] )") == 3
    assert evaluate_listops("( ( ( ( ( [MED 2 ) 3 ) 8 ) 1 ) ] )") == 2  # median 2.5, rounded down
    assert evaluate_listops("( ( ( ( [MED 4 ) 9 ) 7 ) ] )") == 7
    assert evaluate_listops("( ( ( [SM 9 ) 8 ) ] )") == 7


def test_cifar_record_layout(tmp_path):
    base = write_cifar(str(tmp_path), per_batch=2, test=1)
    raw = np.fromfile(os.path.join(base, "data_batch_2.bin"), dtype=np.uint8).reshape(-1, 3073)
    assert raw.shape == (2, 3073) and list(raw[:, 0]) == [2, 3]
    assert list(raw[1, 1 + np.array([1, 1025, 2049])]) == [3, 3, 3]  # R, G, B of pixel 1 of record 3
