"""Deterministic, per-process-sharded grain pipelines of bit batches.

Global batch k is a pure function of (seed, k): the row indices are shuffled with ``seed`` (a
fresh permutation every epoch), repeated forever and cut into batches of ``global_batch``.
Process p of n reads only rows ``[p*B/n, (p+1)*B/n)`` of each global batch, so resuming at
batch k on any process count sees the same global batches. Elements are numpy dicts ready for
``jax.make_array_from_process_local_data``:
``{"bits": uint8 [B_local, T*P], "ids": int32 [B_local, T]}``, plus ``"cond_mask"`` bool
[B_local, T*P] (True on the bits of the first ``prompt_tokens`` tokens) when the rows begin with a
given prompt (conditional training, e.g. Sudoku).
"""

from __future__ import annotations

import grain
import numpy as np

from bitgen.codecs import BitCodec
from bitgen.data.sources import DataError


class _LocalBatch:
    """Global batch of row indices -> this process's slice as ids and bits (picklable for workers)."""

    def __init__(self, rows: np.ndarray, codec: BitCodec, start: int, stop: int, prompt_tokens: int):
        self.rows, self.codec, self.start, self.stop = rows, codec, start, stop
        self.prompt_tokens = prompt_tokens

    def __call__(self, global_indices: np.ndarray) -> dict[str, np.ndarray]:
        ids = np.asarray(self.rows[global_indices[self.start:self.stop]]).astype(self.codec.id_dtype)
        batch = {"bits": self.codec.ids_to_bits(ids), "ids": ids}
        if self.prompt_tokens:
            known = np.zeros(batch["bits"].shape, bool)
            known[:, :self.prompt_tokens * self.codec.width] = True
            batch["cond_mask"] = known
        return batch


def make_batch_dataset(
    rows: np.ndarray,
    codec: BitCodec,
    *,
    global_batch: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    prompt_tokens: int = 0,
) -> grain.MapDataset:
    """Infinite MapDataset; element k = this process's slice of global batch k.

    rows: ``[N, T]`` token ids (e.g. ``PackedRows.train_rows``). prompt_tokens: leading tokens of
    every row that are given (``PackedRows.prompt_tokens``; 0 = no ``cond_mask``). Raises DataError
    when the batch does not divide over the processes, the split holds fewer rows than one global
    batch, or prompt_tokens is outside [0, T).
    """
    if global_batch < 1:
        raise DataError(f"global batch must be >= 1, got {global_batch}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} is not in [0, process_count={process_count})")
    if global_batch % process_count:
        raise DataError(
            f"global batch {global_batch} does not divide over {process_count} processes; set "
            f"data.batch_size to a multiple of {process_count}"
        )
    if len(rows) < global_batch:
        raise DataError(
            f"the split has {len(rows)} rows, fewer than one global batch of {global_batch}; lower "
            "data.batch_size or model.seq_tokens, lower data.val_fraction, or use a larger corpus"
        )
    if seed < 0:
        raise DataError(f"data seed must be >= 0, got {seed}")
    if not 0 <= prompt_tokens < rows.shape[-1]:
        raise DataError(f"prompt_tokens={prompt_tokens} must be in [0, {rows.shape[-1]}): a row "
                        "needs at least one token to generate")
    local = global_batch // process_count
    return (
        grain.MapDataset.range(len(rows))
        .shuffle(seed=seed)
        .repeat()
        .batch(global_batch, drop_remainder=True)
        .map(_LocalBatch(rows, codec, process_index * local, (process_index + 1) * local,
                         prompt_tokens))
    )


def make_batch_iterator(
    dataset: grain.MapDataset,
    *,
    start_batch: int = 0,
    read_threads: int = 2,
    prefetch: int = 4,
) -> grain.DatasetIterator:
    """A checkpointable iterator over ``dataset`` starting at global batch ``start_batch``.

    ``get_state()/set_state()`` give ``{"next_index": k}``; the iterator also works with
    ``grain.checkpoint.CheckpointSave/CheckpointRestore`` inside an orbax checkpoint.
    """
    options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
    iterator = iter(dataset.to_iter_dataset(options))
    if start_batch:
        iterator.set_state({"next_index": int(start_batch)})
    return iterator
