"""Batched extraction of logits and embeddings from image bytes, the way the service serves:
images decoded on the serving path (:func:`~models.preprocess.decode_and_crop`: the very crops
``/predict`` would make of them), one single-threaded onnxruntime session per worker thread, each
thread decoding its own batch and running it, ``CPU_RUN_SLICE`` images per onnxruntime call as
the service's inference workers run theirs. On a CPU that layout beats one session with a
thread per core (decoding and inference overlap, and small batches lose nothing; measured in
``bench/predict_bench.py``).

Retrain jobs embed new labelled images with it, and ``bench/retrain_bench.py`` measures them
against it (the in-process limit).
"""

from __future__ import annotations

import itertools
import os
import queue
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

from .onnx_io import CPU_RUN_SLICE, cpu_session, run_in_batches
from .preprocess import decode_and_crop, normalise_crops
from .spec import PreprocessConfig

T = TypeVar("T")


def extract(
    onnx_path: str | os.PathLike[str],
    items: Sequence[T],
    read: Callable[[T], bytes],
    config: PreprocessConfig,
    *,
    workers: int,
    batch_size: int = 16,
) -> Iterator[tuple[list[T], np.ndarray, np.ndarray]]:
    """Decode, preprocess and run ``items`` (whose bytes ``read`` returns) in batches of
    ``batch_size`` on ``workers`` threads, each with a single-threaded session of the graph at
    ``onnx_path``. Yields ``(batch items, logits, embeddings)`` batch by batch, in order, as they
    finish. Exceptions from ``read`` or decoding propagate (the caller decides what is fatal)."""
    if workers < 1 or batch_size < 1:
        raise ValueError(f"workers and batch_size must be >= 1, got {workers} and {batch_size}")
    batches = [list(items[start : start + batch_size]) for start in range(0, len(items), batch_size)]
    if not batches:
        return
    workers = min(workers, len(batches))
    sessions: queue.SimpleQueue[object] = queue.SimpleQueue()
    for _ in range(workers):
        sessions.put(cpu_session(onnx_path, intra_op_threads=1))

    def run(batch: list[T]) -> tuple[list[T], np.ndarray, np.ndarray]:
        crops = np.stack([decode_and_crop(read(item), config) for item in batch])
        inputs = normalise_crops(crops, config)
        session = sessions.get()
        try:
            logits, embeddings = run_in_batches(session, inputs, batch_size=CPU_RUN_SLICE)
        finally:
            sessions.put(session)
        return batch, logits, embeddings

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="extract") as pool:
        # a bounded window of batches in flight: memory stays flat however many items there are
        upcoming = iter(batches)
        pending = deque(pool.submit(run, batch) for batch in itertools.islice(upcoming, 2 * workers))
        while pending:
            result = pending.popleft().result()
            for batch in itertools.islice(upcoming, 1):
                pending.append(pool.submit(run, batch))
            yield result
