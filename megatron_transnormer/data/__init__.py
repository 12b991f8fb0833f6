"""The streaming token data path: shards of token ids, their manifest, and a resumable loader."""
from megatron_transnormer.data.manifest import DataError, DatasetInfo, load_dataset_info

__all__ = ["DataError", "DatasetInfo", "TokenBatch", "TokenStream", "load_dataset_info", "split_stream"]


def split_stream(data_cfg, info: DatasetInfo, **kwargs):
    """This rank's batches of a split: the LRA reader's (`data.lra.stream.LRAStream`) for a
    classification dataset (a manifest with a `classification` section), else the token
    stream's; training batches of a blend (data.blend) from `data.blend.BlendStream`. kwargs:
    split, dp_rank, dp_size, micro_batch_size, seed, shuffle, infinite."""
    if getattr(data_cfg, "blend", None):
        from megatron_transnormer.data.blend import BlendStream
        return BlendStream(data_cfg, **kwargs)
    if "classification" in info.manifest:
        from megatron_transnormer.data.lra.stream import LRAStream
        return LRAStream(data_cfg, **kwargs)
    from megatron_transnormer.data.stream import TokenStream
    return TokenStream(data_cfg, **kwargs)


def __getattr__(name):
    # torch is imported only by the loader, so that tokenizer processes start fast
    if name in ("TokenBatch", "TokenStream"):
        from megatron_transnormer.data import stream
        return getattr(stream, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
