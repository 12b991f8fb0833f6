"""Long-Range Arena classification data: the official files prepared once into token
shards with a label array beside each (`prepare.py`, run by tools/prepare_lra.py), and
a reader of batches for one data-parallel rank (`reader.py`).

One module per job: a task's files (`listops`, `text`, `retrieval`, `image`,
`pathfinder`), ids (`vocab`), seeded splits (`splits`), writing (`writer`), the
manifest's classification section (`info`), the ListOps generator
(`listops_generator`).
"""
from megatron_transnormer.data.lra.info import TASKS, LRAInfo, load_lra_info

__all__ = ["IGNORE_LABEL", "TASKS", "LRABatch", "LRAInfo", "LRASplit", "lra_batches", "load_lra_info"]


def __getattr__(name):
    # torch is imported only by the reader, so that preparing the text tasks starts fast
    if name in ("LRABatch", "LRASplit", "lra_batches", "IGNORE_LABEL"):
        from megatron_transnormer.data.lra import reader
        return getattr(reader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
