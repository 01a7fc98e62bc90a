"""Colour normalisation (Reinhard transfer in Lab): the pure functions, segment() for a model that records
training colour statistics, and the trainer that records them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers import disc_folder, disc_image, tiny_model, tiny_train_config

from napari_segdiff import segment
from napari_segdiff._errors import SegDiffError
from napari_segdiff.models import load_model, save_model
from napari_segdiff.training.datasets import Sample
from napari_segdiff.training.trainer import Trainer, export
from napari_segdiff.transforms import colour_transfer, lab_stats


def _tinted(seed: int = 0, size: int = 64, tint=(1.0, 0.8, 0.6)) -> tuple[np.ndarray, np.ndarray]:
    img, mask = disc_image(size, seed=seed)
    return np.clip(img * np.asarray(tint), 0, 255).astype(np.uint8), mask


def test_colour_transfer_moves_an_image_to_the_target_statistics_pixel_by_pixel():
    img = _tinted()[0] / 255.0
    src = lab_stats(img)
    assert np.abs(colour_transfer(img, src, src) - img).max() < 1e-5  # its own statistics: unchanged
    target = lab_stats(_tinted(seed=1, tint=(0.5, 0.7, 0.9))[0] / 255.0)
    out = colour_transfer(img, src, target)
    assert np.abs(lab_stats(out) - target).max() < 2.0  # Lab units; gamut clipping costs a little
    assert np.abs(lab_stats(out) - src).max() > 5.0
    # a per-pixel map: two halves transformed apart are the whole transformed (no seams between tiles)
    halves = np.concatenate([colour_transfer(img[:32], src, target), colour_transfer(img[32:], src, target)])
    np.testing.assert_array_equal(halves, out)
    # strength: none of the way is the image, all of it the full transfer
    assert np.abs(colour_transfer(img, src, target, strength=0.0) - img).max() < 1e-5
    np.testing.assert_array_equal(colour_transfer(img, src, target, strength=1.0), out)
    with pytest.raises(SegDiffError, match="no valid pixels"):
        lab_stats(img, valid=np.zeros(img.shape[:2], bool))


def test_a_model_with_colour_statistics_sees_a_recoloured_image_as_the_original():
    torch.manual_seed(0)
    img, _ = _tinted(size=64)
    lab = lab_stats(img / 255.0)
    # the same scene under another light: every Lab channel shifted and stretched
    recoloured = (
        colour_transfer(img / 255.0, lab, lab * [[0.9, 1.0, 1.0], [1.2, 0.8, 0.8]] + [[8, 3, -4], [0, 0, 0]]) * 255
        + 0.5
    ).astype(np.uint8)
    plain = tiny_model(seed=2)
    norm = tiny_model(seed=2)
    norm.meta["colour_norm"] = lab.tolist()  # trained on images coloured like the original
    kw = dict(samples=2, steps=2, tile=32, overlap=0.0, seed=0, runtime="torch", precision="fp32")
    a, b = segment(img, norm, **kw), segment(recoloured, norm, **kw)
    p, q = segment(img, plain, **kw), segment(recoloured, plain, **kw)
    assert "colour_norm" in a.info and "colour_norm" not in p.info
    diff_norm = np.abs(np.asarray(a.probability) - np.asarray(b.probability)).mean()
    diff_plain = np.abs(np.asarray(p.probability) - np.asarray(q.probability)).mean()
    assert diff_norm < 0.4 * diff_plain, (diff_norm, diff_plain)  # equal without the normalisation
    # the original already has the model's statistics: the same result as without normalisation
    np.testing.assert_allclose(np.asarray(a.probability), np.asarray(p.probability), atol=1e-4)
    # switched off, the recoloured image is taken as it is (as by the plain model)
    off = segment(recoloured, norm, colour_match=False, **kw)
    assert "colour_norm" not in off.info
    np.testing.assert_array_equal(np.asarray(off.probability), np.asarray(q.probability))
    # half way (meta['colour_strength']): between the two
    norm.meta["colour_strength"] = 0.5
    half = segment(recoloured, norm, **kw)
    assert half.info["colour_norm"]["strength"] == 0.5
    diff_half = np.abs(np.asarray(a.probability) - np.asarray(half.probability)).mean()
    assert diff_norm < diff_half < diff_plain, (diff_norm, diff_half, diff_plain)


def test_training_with_colour_norm_records_the_statistics_and_warm_starts_keep_them(tmp_path):
    samples = [Sample(f"img{i}", *_tinted(seed=i, size=48, tint=(1.0, 0.7 + 0.1 * i, 0.6))) for i in range(3)]
    cfg = tiny_train_config(tmp_path / "run", colour_norm=True, max_steps=2, val="img2", val_every=2, val_steps=2)
    tr = Trainer(cfg, samples=samples)
    target = np.asarray(tr.colour_norm)
    assert target.shape == (2, 3)
    expected = np.mean([lab_stats(s.image / 255.0) for s in samples[:2]], axis=0)
    np.testing.assert_allclose(target, expected, atol=1e-3)
    # the training images were moved there (the validation image is left to segment())
    for s in tr.train_set:
        assert np.abs(lab_stats(s.image / 255.0) - target).max() < 2.5
    tr.fit(progress=False)
    path, _, _ = export(tmp_path / "run", tmp_path / "m.pt", "m")
    np.testing.assert_allclose(np.asarray(load_model(str(path)).meta["colour_norm"]), target)
    # a warm start from that file keeps its statistics, whatever its own images look like, and moves its
    # images as far as segment() will (meta['colour_strength'])
    other = [Sample("x", *_tinted(seed=5, size=48, tint=(0.4, 0.9, 1.0)))]
    warm = Trainer(tiny_train_config(tmp_path / "warm", init=str(path), max_steps=1), samples=other)
    np.testing.assert_allclose(np.asarray(warm.colour_norm), target)
    assert warm.colour_strength == 1.0
    half = load_model(str(path))
    half.meta["colour_strength"] = 0.5
    save_model(half, tmp_path / "half.pt", meta=half.meta)
    warm = Trainer(tiny_train_config(tmp_path / "warm2", init=str(tmp_path / "half.pt"), max_steps=1), samples=other)
    raw, moved = other[0].image / 255.0, warm.train_set[0].image / 255.0
    expected = colour_transfer(raw, lab_stats(raw), target, 0.5)
    assert np.abs(moved - expected).max() < 1.5 / 255 and warm.colour_strength == 0.5
    # without the switch and without a warm start that records them: nothing changes
    assert Trainer(tiny_train_config(tmp_path / "off", max_steps=1), samples=other).colour_norm is None


def test_export_colour_match_records_the_training_images_colours_and_refuses_twice(tmp_path):
    from napari_segdiff.training.cli import main

    data = tmp_path / "data"
    disc_folder(data, n=3, size=48)
    run = tmp_path / "run"
    tr = Trainer(tiny_train_config(run, data=str(data), val="img2", max_steps=1), samples=None)
    tr.fit(progress=False)
    out = tmp_path / "m.pt"
    assert main(["export", str(run), "--name", "m", "-o", str(out), "--colour-match", "0.5"]) == 0
    meta = load_model(str(out)).meta
    from napari_segdiff.io import read_image

    # the two training images' mean statistics; the validation image img2 is left out
    train = [read_image(data / "images" / f"img{i}.png")[..., :3] / 255.0 for i in (0, 1)]
    expected = np.mean([lab_stats(im) for im in train], axis=0)
    np.testing.assert_allclose(np.asarray(meta["colour_norm"]), expected, atol=1e-3)
    assert meta["colour_strength"] == 0.5
    with_val = np.mean([lab_stats(read_image(data / "images" / f"img{i}.png")[..., :3] / 255.0) for i in range(3)], 0)
    assert np.abs(with_val - expected).max() > 1e-2  # the test can tell the two apart
    # without the switch nothing is recorded; a share outside (0, 1] is refused
    main(["export", str(run), "--name", "m", "-o", str(tmp_path / "plain.pt")])
    assert "colour_norm" not in load_model(str(tmp_path / "plain.pt")).meta
    with pytest.raises(SegDiffError, match="share of the way"):
        export(run, tmp_path / "bad.pt", "m", colour_match=1.5)
    # a warm start from the colour-matched model records its colours already: a second match is refused
    warm = Trainer(tiny_train_config(tmp_path / "warm", data=str(data), init=str(out), max_steps=1), samples=None)
    warm.fit(progress=False)
    with pytest.raises(SegDiffError, match="records them already"):
        export(tmp_path / "warm", tmp_path / "again.pt", "m", colour_match=0.5)
    assert not (tmp_path / "again.pt").exists() and not (tmp_path / "bad.pt").exists()
