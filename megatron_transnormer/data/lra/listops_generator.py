"""The ListOps generator of the Long-Range Arena (Tay et al., 2021; `lra_benchmarks/data/listops.py`).

An expression is a tree: with probability 1 - VALUE_P a node is a digit, otherwise an
operator over 2..max_args sub-trees (at max_depth, always a digit). The operators are
MAX, MIN, MED (the median, truncated to an int: `int(np.median(args))`, so [MED 2 3]
is 2) and SM (the sum mod 10). A sample is kept when its length, counted in symbols
(digits, operators and closing brackets; not parentheses), lies strictly between
min_length and max_length, and when it was not drawn before.

The random calls are those of LRA's script, in its order, made on a `random.Random(seed)`
instead of the global generator. LRA collects the trees in a set and
splits `list(set)`, an order that depends on string hashing; here they are kept in the
order drawn, so the output is a function of the seed alone.

Written in LRA's TSV form (`Source\\tTarget` header, every operation in parentheses:
`( ( ( [MAX 2 ) 9 ) ] )`), so generated files go through the same reader as the
official ones.
"""
from __future__ import annotations

import os
import random

MIN, MAX, MED, SUM_MOD, END = "[MIN", "[MAX", "[MED", "[SM", "]"
OPERATORS = [MIN, MAX, MED, SUM_MOD]  # LRA's order: random.choice indexes into it
VALUES = range(10)
VALUE_P = 0.25

# LRA's defaults: 96,000 / 2,000 / 2,000 samples, depth 10, 10 arguments, 500 < length < 2000.
MAX_DEPTH, MAX_ARGS, MIN_LENGTH, MAX_LENGTH = 10, 10, 500, 2000


def generate_tree(rng: random.Random, depth: int, max_depth: int, max_args: int):
    """(tree, length): a digit, or ((((op, a0), a1), ...), END) nested as LRA nests it."""
    r = rng.random() if depth < max_depth else 1
    if r > VALUE_P:
        return rng.choice(VALUES), 1
    length = 2
    values = []
    for _ in range(rng.randint(2, max_args)):
        sub, sub_length = generate_tree(rng, depth + 1, max_depth, max_args)
        values.append(sub)
        length += sub_length
    tree = (rng.choice(OPERATORS), values[0])
    for value in values[1:]:
        tree = (tree, value)
    return (tree, END), length


def to_string(tree) -> str:
    if isinstance(tree, str):
        return tree
    if isinstance(tree, int):
        return str(tree)
    return "( " + to_string(tree[0]) + " " + to_string(tree[1]) + " )"


def _apply(op: str, args: list[int]) -> int:
    if op == MIN:
        return min(args)
    if op == MAX:
        return max(args)
    if op == MED:
        s = sorted(args)
        mid = len(s) // 2
        # int(np.median): the mean of the two middle values for an even count, truncated
        return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) // 2
    if op == SUM_MOD:
        return sum(args) % 10
    raise ValueError(f"unknown operator {op!r}")


def to_value(tree) -> int:
    """The value of a tree, walked the way it is nested (LRA's `to_value`)."""
    if not isinstance(tree, tuple):
        return tree
    left, right = tree
    if right == END:
        op, args = _partial(left)
        return _apply(op, args)
    raise ValueError(f"not a closed expression: {to_string(tree)}")


def _partial(tree) -> tuple[str, list[int]]:
    """(operator, argument values) of an unclosed application ((op, a0), a1), ..."""
    args = []
    while isinstance(tree, tuple) and not isinstance(tree[0], str):
        tree, arg = tree
        args.append(to_value(arg))
    op, first = tree
    args.append(to_value(first))
    return op, args[::-1]


def generate(n: int, seed: int, max_depth: int = MAX_DEPTH, max_args: int = MAX_ARGS,
             min_length: int = MIN_LENGTH, max_length: int = MAX_LENGTH, max_draws: int = 0) -> list[tuple[str, int]]:
    """`n` distinct (source, value) samples; `max_draws` (0: 10,000 per sample) bounds the
    trees drawn, so impossible length limits fail instead of running forever."""
    if n < 1:
        raise ValueError(f"ListOps generator: need at least 1 sample, got {n}")
    if not 0 <= min_length < max_length - 1:
        raise ValueError(f"ListOps generator: no length lies strictly between min_length={min_length} and "
                         f"max_length={max_length}")
    rng = random.Random(seed)
    seen: dict[str, int] = {}
    limit = max_draws or 10_000 * n
    draws = 0
    while len(seen) < n:
        draws += 1
        if draws > limit:
            raise ValueError(f"ListOps generator: {draws - 1} trees drawn gave only {len(seen)} of {n} samples "
                             f"with {min_length} < length < {max_length} (max_depth {max_depth}, max_args "
                             f"{max_args}); widen the limits")
        tree, length = generate_tree(rng, 1, max_depth, max_args)
        if min_length < length < max_length:
            source = to_string(tree)
            if source not in seen:
                seen[source] = int(to_value(tree))
    return list(seen.items())


def split_counts(n_train: int) -> tuple[int, int, int]:
    """Train / validation / test sizes: LRA's 96,000 / 2,000 / 2,000 proportion, at least one each."""
    held_out = max(1, -(-n_train // 48))
    return n_train, held_out, held_out


def write_tsv(path: str, samples: list[tuple[str, int]]) -> None:
    """LRA's file layout: a `Source\\tTarget` header, then one expression and its value per line."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write("Source\tTarget\n")
        for source, value in samples:
            f.write(f"{source}\t{value}\n")
    os.replace(tmp, path)


def write_generated(directory: str, n_train: int, seed: int, **limits) -> dict[str, str]:
    """basic_{train,val,test}.tsv in `directory` (the files of LRA's `listops-1000`)."""
    counts = split_counts(n_train)
    samples = generate(sum(counts), seed, **limits)
    os.makedirs(directory, exist_ok=True)
    paths, start = {}, 0
    for name, count in zip(("train", "val", "test"), counts):
        paths[name] = os.path.join(directory, f"basic_{name}.tsv")
        write_tsv(paths[name], samples[start:start + count])
        start += count
    return paths
