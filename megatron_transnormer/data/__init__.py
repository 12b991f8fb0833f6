"""The streaming token data path: shards of token ids, their manifest, and a resumable loader."""
from megatron_transnormer.data.manifest import DataError, DatasetInfo, load_dataset_info

__all__ = ["DataError", "DatasetInfo", "TokenBatch", "TokenStream", "load_dataset_info"]


def __getattr__(name):
    # torch is imported only by the loader, so that tokenizer processes start fast
    if name in ("TokenBatch", "TokenStream"):
        from megatron_transnormer.data import stream
        return getattr(stream, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
