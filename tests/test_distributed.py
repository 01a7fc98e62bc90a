"""Tiles spread over a dask.distributed LocalCluster give the single-process result for the same seed."""

import numpy as np
import pytest
from _helpers import tiny_model

import napari_segdiff as ns

distributed = pytest.importorskip("distributed")


def test_local_cluster_matches_single_process():
    m = tiny_model(seed=1, perturb=0.05)
    img = np.random.default_rng(0).random((90, 110, 3)).astype(np.float32)
    img[:60, :60] = 0.0  # nodata: its 4 tiles are skipped on both roads
    kw = dict(samples=2, steps=3, tile=32, overlap=0.25, seed=3)
    single = ns.segment(img, m, **kw)
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        distributed.Client(cluster) as client,
    ):
        spread = ns.segment(img, m, client=client, **kw)
        # both workers really got work
        assert len(client.scheduler_info()["workers"]) == 2
    assert single.variance.max() > 1e-4  # the comparison is not between two constant maps
    assert single.info["skipped_tiles"] == spread.info["skipped_tiles"] == 4
    np.testing.assert_allclose(spread.probability, single.probability, atol=1e-5)
    np.testing.assert_allclose(spread.variance, single.variance, atol=1e-5)
    assert (spread.mask == single.mask).mean() > 0.999
