"""Paired augmentations keep image and mask aligned."""

from __future__ import annotations

import numpy as np
import pytest

from napari_segdiff._errors import SegDiffError
from napari_segdiff.training.augment import (
    AUGMENT_PRESETS,
    AugmentConfig,
    augment_pair,
    colour_jitter,
    get_augment,
    random_affine_crop,
    stain_jitter,
)


def _blob_image(H=96, W=120, seed=0):
    """Smooth blobs in the red channel (other channels unrelated); mask = red > 128."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:H, :W].astype(np.float64)
    red = np.zeros((H, W))
    for _ in range(8):
        cy, cx = rng.uniform(0, H), rng.uniform(0, W)
        s = rng.uniform(5, 12)
        red += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    red = 255 * np.clip(red, 0, 1)
    green = 127 + 120 * np.sin(xx / 9.0)
    blue = 127 + 120 * np.cos(yy / 7.0)
    img = np.stack([red, green, blue], -1).astype(np.uint8)
    return img, img[..., 0] > 128


def _disagreement(img_out, mask_out, level=128.0):
    """Fraction of pixels where the warped mask disagrees with the warped image thresholded, ignoring
    pixels whose warped value is within a band around the level (bilinear vs nearest at edges)."""
    red = img_out[..., 0]
    clear = np.abs(red - level) > 25
    return float(((red > level) != mask_out)[clear].mean()), float(clear.mean())


@pytest.mark.parametrize("preset", ["monuseg", "vaihingen", "cityscapes", "none"])
def test_random_affine_crop_keeps_alignment(preset):
    img, mask = _blob_image()
    aug = get_augment(preset)
    for seed in range(25):
        rng = np.random.default_rng(seed)
        out_img, out_mask = random_affine_crop(img, mask, 48, aug, rng)
        assert out_img.shape == (48, 48, 3) and out_mask.shape == (48, 48) and out_mask.dtype == bool
        bad, clear = _disagreement(out_img, out_mask)
        assert clear > 0.5
        assert bad <= 0.002, (preset, seed, bad)


def test_misalignment_would_be_detected():
    """The check above is sensitive: a mask shifted by 2 px against its image fails it."""
    img, mask = _blob_image()
    out_img, out_mask = random_affine_crop(img, mask, 48, get_augment("none"), np.random.default_rng(0))
    assert _disagreement(out_img, out_mask)[0] <= 0.002
    assert _disagreement(out_img, np.roll(out_mask, 2, axis=1))[0] > 0.002
    assert _disagreement(out_img, np.roll(out_mask, 3, axis=0))[0] > 0.002


def test_identity_crop_is_a_translated_window():
    img, mask = _blob_image()
    for seed in range(5):
        out_img, out_mask = random_affine_crop(img, mask, 32, get_augment("none"), np.random.default_rng(seed))
        # no rotation, scale 1, no flips: the mask is an exact window of the input and the image the
        # same window up to sub-pixel (bilinear) interpolation
        found = [
            (y, x)
            for y in range(img.shape[0] - 31)
            for x in range(img.shape[1] - 31)
            if np.array_equal(mask[y : y + 32, x : x + 32], out_mask)
            and np.abs(img[y : y + 32, x : x + 32].astype(float) - out_img).max() <= 24
        ]
        assert found, seed


def test_flips_are_applied_to_both():
    img, mask = _blob_image()
    aug = AugmentConfig((0, 0), (1, 1), hflip=True, vflip=True)
    flipped = 0
    for seed in range(12):
        out_img, out_mask = random_affine_crop(img, mask, 40, aug, np.random.default_rng(seed))
        assert _disagreement(out_img, out_mask)[0] <= 0.002
        flipped += 1
    assert flipped == 12


def test_augment_pair_with_colour_jitter_keeps_alignment():
    """Colour jitter changes the image only: on a grey image (where jitter is monotone per crop)
    some threshold still separates the mask from the background."""
    rng0 = np.random.default_rng(0)
    H, W = 80, 80
    yy, xx = np.mgrid[:H, :W]
    mask = np.zeros((H, W), bool)
    for _ in range(5):
        cy, cx, r = rng0.uniform(10, 70), rng0.uniform(10, 70), rng0.uniform(6, 12)
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    grey = np.where(mask, 220, 40).astype(np.uint8)
    img = np.repeat(grey[..., None], 3, axis=-1)
    for seed in range(20):
        out_img, out_mask = augment_pair(img, mask, 40, get_augment("vaihingen"), np.random.default_rng(seed))
        assert out_img.shape == (40, 40, 3) and out_img.min() >= 0 and out_img.max() <= 255
        if out_mask.all() or not out_mask.any():
            continue
        g = out_img.mean(-1)
        best = min(((g > t) != out_mask).mean() for t in np.unique(g))
        assert best <= 0.06, (seed, best)  # bilinear edge pixels only


def test_colour_jitter_is_seeded_and_bounded():
    img = np.random.default_rng(0).uniform(0, 255, (16, 16, 3))
    aug = get_augment("vaihingen")
    a = colour_jitter(img, aug, np.random.default_rng(3))
    b = colour_jitter(img, aug, np.random.default_rng(3))
    c = colour_jitter(img, aug, np.random.default_rng(4))
    assert np.array_equal(a, b) and not np.allclose(a, c)
    assert a.min() >= 0 and a.max() <= 255
    np.testing.assert_array_equal(
        colour_jitter(img, get_augment("none"), np.random.default_rng(0)), np.clip(img / 255.0, 0, 1) * 255.0
    )


def _he_image(seed=0, size=48):
    """A synthetic H&E crop: haematoxylin blobs on eosin, mixed in optical density (Ruifrok & Johnston)."""
    from skimage.color import hed2rgb

    rng = np.random.default_rng(seed)
    hed = np.zeros((size, size, 3))
    hed[..., 0] = 0.05 * (rng.random((size, size)) > 0.6)
    hed[..., 1] = 0.02 + 0.01 * rng.random((size, size))
    return hed2rgb(hed) * 255.0, hed


def test_stain_jitter_moves_each_stain_apart():
    from skimage.color import rgb2hed

    img, hed = _he_image()
    aug = get_augment("he-shift")
    a = stain_jitter(img, aug, np.random.default_rng(3))
    assert np.array_equal(a, stain_jitter(img, aug, np.random.default_rng(3)))
    assert a.min() >= 0 and a.max() <= 255 and not np.allclose(a, img, atol=1)
    np.testing.assert_allclose(
        stain_jitter(img, get_augment("he-shift,stain=0"), np.random.default_rng(3)), img, atol=1e-6
    )
    # each stain's density is an affine map of its own: a scale within 1 +- s (the shift is constant per stain)
    gains = []
    for seed in range(8):
        out = rgb2hed(stain_jitter(img, aug, np.random.default_rng(seed)) / 255.0)
        fit = [np.polyfit(hed[..., c].ravel(), out[..., c].ravel(), 1) for c in (0, 1)]
        for (slope, _), c in zip(fit, (0, 1)):
            assert 1 - aug.stain - 1e-3 <= slope <= 1 + aug.stain + 1e-3
            assert np.allclose(out[..., c], np.polyval(fit[c], hed[..., c]), atol=2e-3)
        gains.append(fit[0][0] / fit[1][0])
    assert np.ptp(gains) > 0.1  # haematoxylin and eosin did not move together


def test_he_shift_keeps_masks_and_monuseg_draws_unchanged():
    image, mask = _blob_image()
    img, msk = augment_pair(image, mask, 64, get_augment("he-shift"), np.random.default_rng(1))
    ref_img, ref_msk = augment_pair(image, mask, 64, get_augment("monuseg"), np.random.default_rng(1))
    assert np.array_equal(msk, ref_msk) and not np.allclose(img, ref_img)  # same geometry, other colours
    # without a stain shift the random draws are those of before (a recipe reproduces its crops)
    again = augment_pair(image, mask, 64, get_augment("monuseg,stain=0"), np.random.default_rng(1))
    assert np.array_equal(again[0], ref_img)


def test_presets_and_unknown_name():
    assert set(AUGMENT_PRESETS) >= {"monuseg", "vaihingen", "cityscapes", "none"}
    assert get_augment("vaihingen").rotation == (0, 360)
    with pytest.raises(SegDiffError, match="monuseg"):
        get_augment("heavy")


def test_a_preset_can_have_fields_overridden_for_an_ablation():
    base = get_augment("aerial-shift")
    off = get_augment("aerial-shift, jpeg=0,noise=0, scale=1:1.5,vflip=0")
    assert (off.jpeg, off.noise, off.scale, off.vflip) == (0.0, 0.0, (1.0, 1.5), False)
    assert (off.gamma, off.blur, off.rotation, off.brightness) == (
        base.gamma,
        base.blur,
        base.rotation,
        base.brightness,
    )
    assert get_augment("aerial-shift") == base  # the preset itself is untouched
    for bad, word in [
        ("aerial-shift,jpg=0", "KEY=VALUE"),
        ("aerial-shift,jpeg", "KEY=VALUE"),
        ("aerial-shift,jpeg=-1", ">= 0"),
        ("aerial-shift,scale=2:1", "LOW:HIGH"),
        ("aerial-shift,vflip=maybe", "0 or 1"),
        ("heavy,jpeg=0", "unknown augmentation preset 'heavy'"),
    ]:
        with pytest.raises(SegDiffError, match=word):
            get_augment(bad)
