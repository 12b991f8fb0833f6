"""A prepared LRA dataset as its reader sees it: the token manifest plus its
`classification` section (see `writer.py` for the layout), checked once."""
from __future__ import annotations

from dataclasses import dataclass

from megatron_transnormer.data.manifest import DataError, DatasetInfo, check_relative_name, load_dataset_info

TASKS = ("listops", "text", "retrieval", "image", "pathfinder", "pathx")


@dataclass
class LRAInfo:
    dataset: DatasetInfo

    @property
    def path(self) -> str:
        return self.dataset.path

    @property
    def section(self) -> dict:
        return self.dataset.manifest["classification"]

    @property
    def task(self) -> str:
        return self.section["task"]

    @property
    def num_classes(self) -> int:
        return self.section["num_classes"]

    @property
    def max_length(self) -> int:
        """Ids per input sequence (a Retrieval row holds `inputs` = 2 of them)."""
        return self.section["max_length"]

    @property
    def inputs(self) -> int:
        return self.section["inputs"]

    @property
    def pad_id(self) -> int:
        """-1 for the pixel tasks, whose rows are never padded."""
        return self.dataset.pad_id

    @property
    def vocab_size(self) -> int:
        return self.dataset.vocab_size

    @property
    def vocab(self) -> list[str] | None:
        return self.dataset.manifest["tokenizer"].get("vocab")

    def resolve_split(self, name: str) -> str:
        """Text has no validation split of its own: `valid` is the test split (`same_as`)."""
        entry = self.dataset.split(name)
        return entry.get("same_as", name)


def _int(d: dict, key: str, where: str, low: int) -> int:
    value = d.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise DataError(f"{where}: key {key!r} must be an integer >= {low}, got {value!r}")
    return value


def load_lra_info(path: str) -> LRAInfo:
    """The manifest of a dataset written by tools/prepare_lra.py (a folder or its manifest.json)."""
    info = load_dataset_info(path)
    m, where = info.manifest, info.path
    section = m.get("classification")
    if not isinstance(section, dict):
        raise DataError(f"{where}: no 'classification' section; not an LRA dataset (prepare one with "
                        f"tools/prepare_lra.py)")
    w = f"{where}: classification"
    if section.get("task") not in TASKS:
        raise DataError(f"{w}: task {section.get('task')!r} is not one of {', '.join(TASKS)}")
    _int(section, "num_classes", w, 2)
    max_length = _int(section, "max_length", w, 1)
    inputs = _int(section, "inputs", w, 1)
    if inputs > 2:
        raise DataError(f"{w}: inputs {inputs} is not 1 or 2")
    if m["sample_len"] != inputs * max_length:
        raise DataError(f"{where}: sample_len {m['sample_len']} is not inputs x max_length = {inputs} x {max_length}")
    if section.get("label_dtype") != "uint16":
        raise DataError(f"{w}: label_dtype {section.get('label_dtype')!r} is not 'uint16'")
    for name, split in m["splits"].items():
        target = split.get("same_as", name)
        if target not in m["splits"] or "same_as" in m["splits"][target]:
            raise DataError(f"{where}: splits.{name}: same_as {target!r} names no split holding its own shards")
        for shard in split["shards"]:
            labels = shard.get("labels")
            if not isinstance(labels, dict) or not isinstance(labels.get("sha256"), str):
                raise DataError(f"{where}: splits.{name}: shard {shard['name']!r} has no labels entry "
                                f"{{name, sha256}}")
            check_relative_name(labels.get("name"), f"{where}: splits.{name}: label file")
    return LRAInfo(info)
