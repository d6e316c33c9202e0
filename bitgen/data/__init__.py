"""Data: text sources, packing rules, on-disk row caches and grain bit-batch pipelines (spec §1).

Typical use::

    packed = build_corpus_rows(cfg.data, cfg.model.seq_tokens)
    ds = make_batch_dataset(packed.train_rows, packed.codec, global_batch=cfg.data.batch_size,
                            seed=cfg.data.seed, process_index=jax.process_index(),
                            process_count=jax.process_count())
    it = make_batch_iterator(ds)   # checkpoint with grain.checkpoint.CheckpointSave(it)
"""

from bitgen.data.corpus import (
    DatasetStats,
    PackedRows,
    build_corpus_rows,
    codec_for,
    dataset_stats,
    split_sizes,
    stats_dict,
)
from bitgen.data.packing import StreamPacker, pack
from bitgen.data.pipeline import make_batch_dataset, make_batch_iterator
from bitgen.data.sources import DataError, TextSource, normalize_document, open_source

__all__ = [
    "DataError",
    "DatasetStats",
    "PackedRows",
    "StreamPacker",
    "TextSource",
    "build_corpus_rows",
    "codec_for",
    "dataset_stats",
    "make_batch_dataset",
    "make_batch_iterator",
    "normalize_document",
    "open_source",
    "pack",
    "split_sizes",
    "stats_dict",
]
