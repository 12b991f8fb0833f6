"""The paper's result tables with this project's evaluations beside the published numbers.

    runs = [read_run(d) for d in run_dirs]     # each run's latest eval_<split>_step<N>.json
    print(paper_tables(runs))                  # markdown

An evaluation is the JSON `tools/evaluate.py` writes into a run directory. A table is a
list of paper rows, each with the settings a run must have to stand on it and the
published numbers; `table_rows` places every run on the rows its settings match (a row
no run matches still shows the published numbers), and `markdown_table` prints any
header and rows. A further table (LRA accuracy) is one more `PaperTable`.

Published numbers (Qin et al., "The Devil in Linear Transformer", WikiText-103): the
autoregressive LM's perplexity, valid / test, and the bidirectional (masked) LM's
masked-token perplexity with the ablations of its token mixers, DiagAttention block size
and channel mixer. The paper gives no T1 row for the autoregressive LM.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

EVAL_FILE = re.compile(r"^eval_(.+)_step(\d+)\.json$")  # tools/evaluate.py's default output name


class TableError(ValueError):
    """A run directory without evaluations, or an evaluation file that is not one; names the path."""


def eval_filename(split: str, step: int) -> str:
    return f"eval_{split}_step{step}.json"


@dataclass
class RunResults:
    """A run's evaluations at its latest evaluated step."""
    run_dir: Path
    step: int
    config: dict  # the resolved config of the evaluated checkpoint
    dataset: str  # the manifest's source (shakespeare, wikitext-103, input)
    tokenizer: str  # the manifest's tokenizer type (word, sentencepiece, gpt2-bpe)
    splits: dict = field(default_factory=dict)  # split name -> evaluation record


def read_run(run_dir: str | Path) -> RunResults:
    """The evaluations of run_dir at the latest step that has any (TableError if none)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise TableError(f"{run_dir}: no such run directory")
    found = {}
    for path in run_dir.iterdir():
        match = EVAL_FILE.match(path.name)
        if not match or not path.is_file():
            continue
        try:
            record = json.loads(path.read_text())
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            missing = [k for k in ("step", "split", "loss", "ppl", "config") if k not in record]
            if missing or "model" not in record["config"]:
                raise ValueError(f"it has no {(missing or ['config.model'])[0]}")
        except (OSError, ValueError, TypeError) as e:
            raise TableError(f"{path}: not an evaluation written by tools/evaluate.py ({e})") from None
        found[(int(record["step"]), str(record["split"]))] = record
    if not found:
        raise TableError(f"{run_dir}: no evaluations (eval_<split>_step<N>.json) there; evaluate the run first: "
                         f"python tools/evaluate.py --checkpoint {run_dir} --split valid")
    step = max(s for s, _ in found)
    splits = {split: record for (s, split), record in found.items() if s == step}
    first = next(iter(splits.values()))
    dataset = first.get("dataset", {})
    return RunResults(run_dir=run_dir, step=step, config=first["config"], dataset=str(dataset.get("source", "?")),
                      tokenizer=str(dataset.get("tokenizer", "?")), splits=splits)


def _mixers(layers: list[str]) -> str:
    """'diag', 'norm' (every layer alike), 'diag+norm' (the first half one, the rest the
    other), or the layers joined by commas."""
    half = len(layers) // 2
    if len(set(layers)) == 1:
        return layers[0]
    if len(layers) % 2 == 0 and len(set(layers[:half])) == 1 and len(set(layers[half:])) == 1:
        return f"{layers[0]}+{layers[-1]}"
    return ",".join(layers)


def settings(run: RunResults) -> dict:
    """The settings paper rows are matched on."""
    m = run.config["model"]
    return {"head": m["head"], "arch": m["arch"], "variant": m["variant"], "decay": m.get("decay", False),
            "mixers": _mixers(list(m["layers"])), "block_size": m["block_size"],
            "mlp": "glu" if m["mlp"] == "glu" else "ffn"}


@dataclass
class PaperRow:
    label: str
    match: dict  # settings a run must have to stand on this row
    published: tuple  # the paper's numbers, one per column of the table's `published` header


@dataclass
class PaperTable:
    title: str
    head: str  # model.head of the runs that belong in it
    label: str  # the header of the row label
    published: tuple[str, ...]  # headers of the published columns
    rows: tuple[PaperRow, ...]
    note: str = ""


_BLM = dict(arch="transnormer", mixers="diag+norm", block_size=64, mlp="glu")  # the paper's masked LM

TABLES = (
    PaperTable("Autoregressive LM, WikiText-103: perplexity", "lm", "model", ("paper valid", "paper test"), (
        PaperRow("Vanilla (softmax)", dict(arch="vanilla"), (29.63, 31.01)),
        PaperRow("1+elu", dict(arch="linear_1elu"), (32.63, 34.25)),
        PaperRow("TransNormer T1", dict(arch="transnormer", variant="t1", decay=False), (None, None)),
        PaperRow("TransNormer T2", dict(arch="transnormer", variant="t2", decay=False), (29.57, 31.01)),
    ), note="ppl: per token with the word-level vocabulary (one token per word and per line end, as the paper "
            "counts), per word with any other tokenizer."),
    PaperTable("Bidirectional LM, WikiText-103: token mixers", "masked_lm", "layers", ("paper ppl",), (
        PaperRow("Diag then Norm (6 + 6)", _BLM, (3.82,)),
        PaperRow("all Norm", {**_BLM, "mixers": "norm"}, (4.23,)),
        PaperRow("all Diag", {**_BLM, "mixers": "diag"}, (4.75,)),
    ), note="ppl: masked-token perplexity."),
    PaperTable("Bidirectional LM, WikiText-103: DiagAttention block size", "masked_lm", "block",
               ("paper ppl",), tuple(PaperRow(str(b), {**_BLM, "block_size": b}, (ppl,))
                                     for b, ppl in ((32, 3.92), (64, 3.82), (128, 3.72))),
               note="ppl: masked-token perplexity."),
    PaperTable("Bidirectional LM, WikiText-103: channel mixer", "masked_lm", "mixer", ("paper ppl",), (
        PaperRow("GLU", _BLM, (3.82,)),
        PaperRow("FFN", {**_BLM, "mlp": "ffn"}, (3.93,)),
    ), note="ppl: masked-token perplexity."),
)


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A markdown table; None is shown as an em dash, floats with two decimals."""
    def cell(value) -> str:
        if value is None:
            return "—"
        return f"{value:.2f}" if isinstance(value, float) else str(value)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def comparable_ppl(record: dict, tokenizer: str) -> float:
    """The number a record compares with the paper by: the masked LM's masked-token
    perplexity; a causal LM's per-token perplexity with the word-level vocabulary (the
    paper's counting), its per-word perplexity with any other tokenizer."""
    if "word_ppl" in record and tokenizer != "word":
        return record["word_ppl"]
    return record["ppl"]


def _scored(run: RunResults, split: str) -> str | None:
    record = run.splits.get(split)
    if record is None:
        return None
    return f"{comparable_ppl(record, run.tokenizer):.2f}" + ("" if record.get("whole_split", True) else "*")


def _run_row(label: str, run: RunResults, published) -> list:
    return [label, str(run.run_dir), run.step, f"{run.dataset} ({run.tokenizer})", _scored(run, "valid"),
            _scored(run, "test"), *published]


def table_rows(table: PaperTable, runs: list[RunResults]) -> tuple[list[list], set[int]]:
    """The table's rows (label, run, step, data, valid ppl, test ppl, *published): one per
    run a paper row matches, or the published numbers alone; and the indices of the runs
    placed."""
    rows, placed = [], set()
    for paper in table.rows:
        matching = [i for i, run in enumerate(runs) if run.config["model"]["head"] == table.head
                    and all(settings(run)[k] == v for k, v in paper.match.items())]
        placed.update(matching)
        rows += ([_run_row(paper.label, runs[i], paper.published) for i in matching]
                 or [[paper.label, None, None, None, None, None, *paper.published]])
    return rows, placed


def paper_tables(runs: list[RunResults]) -> str:
    """Every table that holds at least one of the runs, in markdown. A run that no paper row
    matches is listed, with its settings, under the first table of its kind."""
    built = [(table, *table_rows(table, runs)) for table in TABLES]
    placed = set().union(*(here for _, _, here in built))
    out, kinds = [], set()
    for table, rows, here in built:
        if table.head not in kinds:
            kinds.add(table.head)
            others = [i for i, run in enumerate(runs) if i not in placed and run.config["model"]["head"] == table.head]
            for i in others:
                s = settings(runs[i])
                label = f"{s['arch']} {s['variant']}: {s['mixers']}, block {s['block_size']}, {s['mlp']}"
                rows.append(_run_row(label, runs[i], [None] * len(table.published)))
            here = here | set(others)
        if not here:
            continue
        header = [table.label, "run", "step", "data", "valid ppl", "test ppl", *table.published]
        partial = any(not r.get("whole_split", True) for i in here for r in runs[i].splits.values())
        out.append(f"### {table.title}\n\n{markdown_table(header, rows)}\n\n{table.note}"
                   + (" *: part of the split (--batches)." if partial else ""))
    unknown = sorted({run.config["model"]["head"] for run in runs} - kinds)
    if unknown:
        out.append(f"(no paper table for model.head={', '.join(unknown)} yet)")
    return "\n\n".join(out)


# ---------------------------------------------------------------- Long-Range Arena
# The classifiers' runs (configs/lra/) leave test_result.json in their run directory
# (training/loop.py): the test accuracy of the best-validation checkpoint.
LRA_RESULT = "test_result.json"
LRA_TASKS = (("listops", "ListOps"), ("text", "Text"), ("retrieval", "Retrieval"), ("image", "Image"),
             ("pathfinder", "Pathfinder"), ("pathx", "Path-X"))
# Published TransNormer accuracies (%, the paper's LRA table); its average is over the five
# tasks it reports (no Path-X score).
LRA_PUBLISHED = {"t1": {"listops": 41.03, "text": 66.90, "retrieval": 83.11, "image": 51.60, "pathfinder": 75.92},
                 "t2": {"listops": 41.60, "text": 72.20, "retrieval": 83.82, "image": 49.60, "pathfinder": 76.80}}
LRA_PUBLISHED_AVERAGE = {"t1": 63.71, "t2": 64.80}


@dataclass
class LRARun:
    run_dir: Path
    task: str
    variant: str
    step: int  # of the best-validation checkpoint
    val_accuracy: float
    test_accuracy: float


def read_lra_run(run_dir: str | Path) -> LRARun:
    """The test result of an LRA run (TableError when it has none or it is malformed)."""
    run_dir = Path(run_dir)
    path = run_dir / LRA_RESULT
    if not run_dir.is_dir():
        raise TableError(f"{run_dir}: no such run directory")
    if not path.is_file():
        raise TableError(f"{path}: missing; the run has not finished (its end scores the best-validation "
                         f"checkpoint on the test split): train it to train.steps, e.g. "
                         f"python pretrain.py --config lra/<task>_<variant> train.run_dir={run_dir}")
    try:
        record = json.loads(path.read_text())
        task, variant = record["task"], record["config"]["model"]["variant"]
        if task not in dict(LRA_TASKS):
            raise ValueError(f"task {task!r} is not an LRA task")
        return LRARun(run_dir, task, variant, int(record["step"]), float(record["val_accuracy"]),
                      float(record["test_accuracy"]))
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise TableError(f"{path}: not a test result written by pretrain.py ({type(e).__name__}: {e})") from None


def _average(scores: dict) -> float | None:
    """The paper's average: over its five tasks, when every one of them has a score."""
    five = [scores.get(task) for task in LRA_PUBLISHED["t2"]]
    return None if None in five else sum(five) / len(five)


def lra_table(runs: list[LRARun]) -> str:
    """The paper's LRA table (test accuracy per task and the average) with this project's T1
    and T2 rows beside the published ones, then the runs it was drawn from. Where several
    runs share a task and variant, the one with the best validation accuracy stands in the
    table (chosen by validation, as each run chose its checkpoint)."""
    chosen: dict[tuple[str, str], LRARun] = {}
    for run in runs:
        key = (run.variant, run.task)
        if key not in chosen or run.val_accuracy > chosen[key].val_accuracy:
            chosen[key] = run
    header = ["model", *(name for _, name in LRA_TASKS), "average"]
    rows = []
    for variant in ("t1", "t2"):
        ours = {task: chosen[(variant, task)].test_accuracy for task, _ in LRA_TASKS if (variant, task) in chosen}
        rows.append([f"TransNormer {variant.upper()} (these runs)", *(ours.get(t) for t, _ in LRA_TASKS),
                     _average(ours)])
        paper = LRA_PUBLISHED[variant]
        rows.append([f"TransNormer {variant.upper()} (paper)", *(paper.get(t) for t, _ in LRA_TASKS),
                     LRA_PUBLISHED_AVERAGE[variant]])
    runs_rows = [[str(r.run_dir), dict(LRA_TASKS)[r.task], r.variant.upper(), r.step, r.val_accuracy,
                  r.test_accuracy, "yes" if chosen[(r.variant, r.task)] is r else ""]
                 for r in sorted(runs, key=lambda r: (r.variant, [t for t, _ in LRA_TASKS].index(r.task), str(r.run_dir)))]
    return ("### Long-Range Arena: test accuracy (%)\n\n" + markdown_table(header, rows)
            + "\n\nTest accuracy of each run's best-validation checkpoint. The average is the paper's: over "
              "ListOps, Text, Retrieval, Image and Pathfinder, shown once all five have a run (the paper "
              "reports no Path-X score).\n\n### Runs\n\n"
            + markdown_table(["run", "task", "variant", "best step", "valid acc", "test acc", "in table"],
                             runs_rows))
