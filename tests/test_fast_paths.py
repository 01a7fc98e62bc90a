"""The engine's fast paths (G(I) once per tile, samples batched, inference_mode, bf16 autocast) against the
straightforward Algorithm 1 (G(I) in every call, one sample after another)."""

import numpy as np
import pytest
import torch
from _helpers import tiny_model
from reference_sampler import reference_tile_sample

import napari_segdiff as ns
from napari_segdiff.config import SamplingConfig
from napari_segdiff.engine import TileSampler


@pytest.fixture
def model(tiny_model):
    return tiny_model


@pytest.mark.parametrize("steps", [1, 3, None])
def test_cached_and_batched_equals_straightforward(model, steps):
    img = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    N = 3
    runner = TileSampler(model, SamplingConfig(samples=N, steps=steps, seed=0), torch.device("cpu"))
    mean, second = runner(img.numpy(), [0], seed=0)
    with torch.inference_mode():
        ref_mean, ref_second = reference_tile_sample(model, img, N, steps, seed=0)
    assert ref_second.mean() - ref_mean.mean() ** 2 > 1e-4 or ref_mean.std() > 1e-3  # not a constant map
    # equal up to float rounding (batched convolutions sum in another order; T steps compound it)
    np.testing.assert_allclose(mean[0], ref_mean, atol=5e-4)
    np.testing.assert_allclose(second[0], ref_second, atol=5e-4)
    # the engine made one encoder evaluation and T' batched network calls; the reference N*T' calls
    T = steps or model.diffusion.T
    assert runner.encoder_evaluations == 1 and runner.network_evaluations == T


def test_two_channel_model_equals_straightforward():
    model = tiny_model(mask_channels=2)
    img = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    runner = TileSampler(model, SamplingConfig(samples=3, steps=2, seed=0), torch.device("cpu"))
    mean, second = runner(img.numpy(), [0], seed=0)
    with torch.inference_mode():
        ref_mean, ref_second = reference_tile_sample(model, img, 3, 2, seed=0)
    assert mean[0].shape == ref_mean.shape == (32, 32, 2)
    assert np.abs(ref_mean[..., 0] - ref_mean[..., 1]).max() > 1e-3  # the channels differ
    np.testing.assert_allclose(mean[0], ref_mean, atol=5e-4)
    np.testing.assert_allclose(second[0], ref_second, atol=5e-4)


def test_bf16_autocast_mask_agreement(model):
    img = np.random.default_rng(0).random((64, 64, 3)).astype(np.float32)
    a = ns.segment(img, model, samples=3, steps=3, tile=32, seed=0, precision="fp32")
    b = ns.segment(img, model, samples=3, steps=3, tile=32, seed=0, precision="bf16")
    assert (a.info["precision"], b.info["precision"]) == ("fp32", "bf16")
    assert 0.02 < a.mask.mean() < 0.98  # a mask with both classes, so agreement is informative
    assert (a.mask == b.mask).mean() > 0.95
    assert np.abs(a.probability - b.probability).mean() < 0.05


def test_channels_last_matches_contiguous(model):
    """The CPU default (channels-last convolutions) gives the contiguous layout's result to float rounding,
    on the sampler's own copy: the caller's model keeps its values and its layout."""
    img = np.random.default_rng(1).random((64, 64, 3)).astype(np.float32)
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    kw = dict(samples=3, steps=3, tile=32, seed=0, precision="fp32")
    a = ns.segment(img, model, channels_last=False, **kw)
    b = ns.segment(img, model, channels_last=True, **kw)
    runner = TileSampler(model, SamplingConfig(samples=1), torch.device("cpu"), channels_last=True)
    conv_w = next(p for p in runner.net.parameters() if p.dim() == 4)
    assert conv_w.is_contiguous(memory_format=torch.channels_last)  # the fast layout is what runs
    assert next(p for p in model.net.parameters() if p.dim() == 4).is_contiguous()  # the caller's is untouched
    assert 0.02 < a.mask.mean() < 0.98
    np.testing.assert_allclose(a.probability, b.probability, atol=1e-4)
    np.testing.assert_allclose(a.variance, b.variance, atol=1e-4)
    for k, v in model.net.state_dict().items():
        assert torch.equal(v, before[k]), k
