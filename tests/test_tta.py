"""Test-time augmentation: sample j of a tile sees the tile under the j-th flip/rotation and is mapped back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers import tiny_model
from torch import nn

from napari_segdiff.engine import DIHEDRAL, dihedral, segment

KW = dict(device="cpu", tile=32, overlap=0.25, seed=0)


@pytest.mark.parametrize("shape", [(6, 5, 7, 7), (8, 5, 6, 9)])
@pytest.mark.parametrize("n", [1, 3, 8, 10])
def test_dihedral_maps_back_and_uses_distinct_elements(shape, n):
    x = torch.randn(2 * n, *shape[1:])  # two tiles of n samples each
    y = dihedral(x, n)
    assert y.shape == x.shape
    assert torch.equal(dihedral(y, n, inverse=True), x)
    square = shape[-1] == shape[-2]
    # sample j of each tile under element j (mod the group used): distinct transforms for the first 4 (or 8)
    m = 8 if square else 4
    outs = [y[j] for j in range(min(n, m))]
    for i in range(len(outs)):
        for j in range(i):
            assert not torch.equal(outs[i], outs[j])
    assert torch.equal(y[0], x[0])  # element 0 is the identity
    assert len(set(DIHEDRAL)) == 8


class _ImageAsMask(nn.Module):
    """A stand-in network whose x0 prediction is the image's first channel: any orientation error shows."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.w = nn.Parameter(torch.ones(()))

    def encode_image(self, image):
        return image * self.w

    def forward(self, x, t, image=None, features=None):
        return features[:, :1].clone()


@pytest.mark.parametrize("shape, samples", [((64, 64), 8), ((40, 72), 5)])
def test_each_sample_comes_back_in_the_tiles_own_orientation(shape, samples):
    m = tiny_model(seed=0)
    m.net = _ImageAsMask(m.net.config)
    m.diffusion.parameterization = "x0"
    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (*shape, 3)).astype(np.uint8)
    kw = dict(KW, tile=32 if shape[0] == 64 else 40, samples=samples, steps=2)
    plain = segment(img, m, tta=False, **kw)
    tta = segment(img, m, tta=True, **kw)
    assert tta.info["tta"] and not plain.info["tta"]
    np.testing.assert_allclose(tta.probability, plain.probability, atol=1e-5)
    assert float(np.max(tta.variance)) < 1e-6  # every sample, mapped back, is the same map
    assert float(np.ptp(plain.probability)) > 0.5  # the map is the (asymmetric) image: the check has teeth


def test_one_sample_with_tta_is_the_plain_run_and_more_samples_differ():
    m = tiny_model(seed=0, perturb=0.05)
    img = (np.random.default_rng(2).random((48, 48, 3)) * 255).astype(np.uint8)
    a = segment(img, m, samples=1, steps=2, tta=True, **KW)
    b = segment(img, m, samples=1, steps=2, tta=False, **KW)
    assert np.array_equal(a.probability, b.probability)
    c = segment(img, m, samples=4, steps=2, tta=True, **KW)
    d = segment(img, m, samples=4, steps=2, tta=False, **KW)
    assert not np.allclose(c.probability, d.probability)
    assert c.info["network_evaluations"] == d.info["network_evaluations"]  # same number of U-Net forwards
    assert c.info["encoder_evaluations"] == 4 * d.info["encoder_evaluations"]  # G(I) once per sample


def test_tta_flag_in_the_cli_and_the_config():
    from napari_segdiff.cli import build_parser
    from napari_segdiff.config import SamplingConfig

    assert SamplingConfig().tta is False
    args = build_parser().parse_args(["segment", "x.tif", "-o", "y.tif", "--tta"])
    assert args.tta is True
    assert build_parser().parse_args(["segment", "x.tif", "-o", "y.tif"]).tta is None
