"""Spread the tiles of one image over a dask.distributed cluster.

The client reads and scales the windows (streaming, in raster order) and submits batches; every worker
process builds its :class:`TileSampler` once (model weights are scattered once, cached per worker by
their sha256) and uses its own device (``auto``: its GPU when it has one). Tile noise is seeded per
tile, so the result equals a single-process run with the same seed.
"""

from __future__ import annotations

import hashlib
from collections import deque

import numpy as np

from .transforms import to_chw

_WORKER_CACHE: dict[str, object] = {}


def _run_batch(
    key: str,
    model_data: bytes,
    sampling,
    device: str,
    images: np.ndarray,
    indices: list[int],
    seed: int,
    precision: str = "auto",
    scale: float | None = None,
    runtime: str = "auto",
):
    from .engine import TileSampler, resolve_device
    from .models import from_bytes

    key = f"{key}:{device}:{precision}:{scale}:{runtime}"
    runner = _WORKER_CACHE.get(key)
    if runner is None:  # once per worker process
        dev = resolve_device(device)
        runner = _WORKER_CACHE[key] = TileSampler(
            from_bytes(model_data, dev), sampling, dev, precision=precision, scale=scale, runtime=runtime
        )
    runner.sampling = sampling
    return runner(images, indices, seed)


def distributed_tiles(
    client,
    items,
    tiling,
    mdl,
    sampling,
    seed,
    device: str = "auto",
    max_in_flight: int | None = None,
    precision: str = "auto",
    input_scale: float | None = None,
    runtime: str = "auto",
):
    """items: (window, tile scaled to [-1, 1]) in raster order; yields (window, mean, second moment) in order."""
    from .models import to_bytes

    data = to_bytes(mdl)
    key = hashlib.sha256(data).hexdigest()
    model_future = client.scatter(data, broadcast=True, hash=False)
    n_workers = max(1, len(client.scheduler_info().get("workers", {})))
    limit = max_in_flight or 2 * n_workers
    pending: deque = deque()

    def submit(batch):
        imgs = np.stack([to_chw(b) for _, b in batch])
        fut = client.submit(
            _run_batch,
            key,
            model_future,
            sampling,
            device,
            imgs,
            [w.index for w, _ in batch],
            seed,
            precision,
            input_scale,
            runtime,
            pure=False,
        )
        pending.append(([w for w, _ in batch], fut))

    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == tiling.batch_size:
            submit(batch)
            batch = []
            while len(pending) >= limit:
                yield from _collect(pending.popleft())
    if batch:
        submit(batch)
    while pending:
        yield from _collect(pending.popleft())


def _collect(entry):
    wins, fut = entry
    means, second_moments = fut.result()
    yield from zip(wins, means, second_moments)
