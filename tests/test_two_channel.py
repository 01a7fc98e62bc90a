"""Two-channel models: the mask and the interior of its objects diffused together, trained from instance
maps where the data has them, and the interior channel seeding the instance split."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers import disc_image, tiny_model, tiny_train_config

from napari_segdiff import segment
from napari_segdiff._errors import SegDiffError
from napari_segdiff.config import NetworkConfig, get_preset
from napari_segdiff.diffusion import Diffusion
from napari_segdiff.instances import label_instances, object_interior
from napari_segdiff.models import SegDiffModel, save_model
from napari_segdiff.network import SegDiffNet, widen_mask_channels
from napari_segdiff.tiling import StreamingBlender, taper_weights, window_grid
from napari_segdiff.training.datasets import Sample
from napari_segdiff.training.metrics import instance_metrics
from napari_segdiff.training.trainer import (
    INTERIOR_BIT,
    KNOWN_BIT,
    MASK_BIT,
    Trainer,
    export,
    pack_targets,
    single_object_parts,
    unpack_targets,
)


def _touching_discs():
    yy, xx = np.mgrid[:40, :60]
    a = (yy - 20) ** 2 + (xx - 20) ** 2 <= 100
    b = ((yy - 20) ** 2 + (xx - 37) ** 2 <= 100) & ~a
    labels = a.astype(np.int32) + 2 * b.astype(np.int32)
    return labels


def test_config_refuses_other_channel_counts():
    assert NetworkConfig().mask_channels == 1  # files written before the setting load as 1-channel
    with pytest.raises(ValueError, match="mask_channels must be 1 or 2"):
        get_preset("tiny", mask_channels=3)


def test_object_interior_separates_touching_objects():
    labels = _touching_discs()
    assert label_instances(labels > 0, method="components").max() == 1  # the union is one blob
    inner = object_interior(labels, width=2)
    assert inner.any() and not (inner & (labels == 0)).any()
    # each disc keeps a core of its own, and the cores do not touch
    from skimage.measure import label

    cores = label(inner, connectivity=1)
    assert cores.max() == 2
    assert len(set(labels[cores == 1])) == 1 and len(set(labels[cores == 2])) == 1
    # width peels that many pixels: a 5x5 square keeps 3x3 at width 1... and 1x1 at width 2
    sq = np.zeros((9, 9), np.int32)
    sq[2:7, 2:7] = 1
    assert object_interior(sq, 1).sum() == 9 and object_interior(sq, 2).sum() == 1
    with pytest.raises(SegDiffError, match="2-D"):
        object_interior(np.zeros((2, 3, 3), np.int32))


def test_interior_split_seeds_one_object_per_core():
    labels = _touching_discs()
    mask = labels > 0
    interior = object_interior(labels, 2).astype(np.float32)
    lab = label_instances(mask, method="interior", interior=interior)
    assert lab.max() == 2 and ((lab > 0) == mask).all()
    assert lab[20, 12] != lab[20, 45]
    # a lower interior (below the seed threshold) leaves the pixels to the watershed: one object
    assert label_instances(mask, method="interior", interior=interior * 0.4).max() == 1
    assert label_instances(mask, method="interior", interior=interior * 0.4, seed_threshold=0.3).max() == 2
    with pytest.raises(SegDiffError, match="needs the interior map"):
        label_instances(mask, method="interior")
    with pytest.raises(SegDiffError, match="differ in shape"):
        label_instances(mask, method="interior", interior=interior[:10])


def test_interior_peaks_split_a_soft_interior_that_one_threshold_cannot():
    labels = _touching_discs()
    mask = labels > 0
    # a soft interior, as one sampling step gives (a posterior mean): a peak at each centre, and the blob
    # between them stays above every threshold the plain method could use without losing the objects
    from scipy import ndimage as ndi

    peaks = ndi.distance_transform_edt(labels == 1) + ndi.distance_transform_edt(labels == 2)
    soft = (0.6 + 0.4 * peaks / peaks.max()).astype(np.float32) * mask
    assert label_instances(mask, method="interior", interior=soft, seed_threshold=0.5).max() == 1
    lab = label_instances(mask, method="interior_peaks", interior=soft, h=0.1, seed_threshold=0.3)
    assert lab.max() == 2 and ((lab > 0) == mask).all() and lab[20, 12] != lab[20, 45]
    # a bump lower than h is not a second object
    assert label_instances(mask, method="interior_peaks", interior=soft, h=0.5, seed_threshold=0.3).max() == 1
    # nothing above seed_threshold: no seeds, and the object keeps one label (no pixel is lost)
    lab = label_instances(mask, method="interior_peaks", interior=soft * 0.2, h=0.01, seed_threshold=0.3)
    assert lab.max() == 1 and ((lab > 0) == mask).all()
    with pytest.raises(SegDiffError, match="needs the interior map"):
        label_instances(mask, method="interior_peaks")


def test_widened_network_starts_where_the_one_channel_network_was():
    torch.manual_seed(0)
    one = tiny_model(seed=3).net.eval()
    two = SegDiffNet(get_preset("tiny", mask_channels=2)).eval()
    two.load_state_dict(widen_mask_channels(one.state_dict(), 2))
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    x1 = torch.randn(2, 1, 32, 32)
    x2 = torch.cat([x1, torch.randn(2, 1, 32, 32)], 1)  # whatever the new channel holds
    t = torch.tensor([1, one.config.diffusion_steps - 1])
    with torch.no_grad():
        ref, out = one(x1, t, image=img), two(x2, t, image=img)
    assert out.shape == (2, 2, 32, 32)
    torch.testing.assert_close(out[:, :1], ref)
    torch.testing.assert_close(out[:, 1:], ref)  # the new channel starts as a copy of the mask's
    with pytest.raises(ValueError, match="only"):
        widen_mask_channels(two.state_dict(), 3)


def test_weighted_loss_ignores_what_the_weights_hide():
    d = Diffusion(T=10, parameterization="x0")
    x0 = torch.rand(2, 2, 8, 8) * 2 - 1

    def model_fn(x, t):  # perfect on channel 0, wrong by 1 on channel 1
        return torch.cat([x0[:, :1], x0[:, 1:] + 1.0], 1)

    g = torch.Generator().manual_seed(0)
    assert float(d.training_loss(model_fn, x0, generator=g)) == pytest.approx(0.5)
    w = torch.ones_like(x0)
    w[:, 1] = 0
    assert float(d.training_loss(model_fn, x0, generator=g, weight=w)) == pytest.approx(0.0)
    w[0, 1] = 1  # one image's channel 1 known: 64 wrong pixels of 128 + 64 weighted ones
    assert float(d.training_loss(model_fn, x0, generator=g, weight=w)) == pytest.approx(64 / 192)


def test_targets_pack_the_interior_where_instances_are_known():
    labels = _touching_discs()
    img = np.zeros(labels.shape + (3,), np.uint8)
    with_inst = pack_targets(Sample("a", img, labels > 0, labels))
    without = pack_targets(Sample("b", img, labels > 0))
    assert ((with_inst & MASK_BIT) > 0).sum() == (labels > 0).sum()
    assert ((with_inst & KNOWN_BIT) > 0).all() and not (without & KNOWN_BIT).any()
    np.testing.assert_array_equal((with_inst & INTERIOR_BIT) > 0, object_interior(labels, 2))
    # without an instance map the stand-in is the union eroded: one core, never scored
    x0, w = unpack_targets(without)
    assert x0.shape == (2, 40, 60) and set(np.unique(x0)) == {-1.0, 1.0}
    assert (w[0] == 1).all() and (w[1] == 0).all()
    x0, w = unpack_targets(with_inst)
    assert (w == 1).all() and (x0[1] <= x0[0]).all()  # the interior lies within the mask
    # at half scale the codes are packed on the network's grid
    assert pack_targets(Sample("a", img, labels > 0, labels), 0.5).shape == (20, 30)


def test_targets_from_masks_know_the_background_and_single_objects():
    labels = _touching_discs()  # two touching discs: one part of the mask that is not convex
    yy, xx = np.mgrid[:40, :60]
    lone = (yy - 20) ** 2 + (xx - 54) ** 2 <= 25  # a separate disc, 1 px from the pair
    mask = (labels > 0) | lone
    img = np.zeros(mask.shape + (3,), np.uint8)
    parts = single_object_parts(mask)
    assert parts.max() > 0 and set(np.unique(parts[lone])) == {parts.max()} and not parts[labels > 0].any()
    code = pack_targets(Sample("b", img, mask), from_masks=True)
    known = (code & KNOWN_BIT) > 0
    np.testing.assert_array_equal(known, ~mask | lone)  # the pair's interior is not known, the rest is
    np.testing.assert_array_equal((code & INTERIOR_BIT)[lone] > 0, object_interior(lone.astype(np.int32), 2)[lone])
    assert not (code & INTERIOR_BIT)[~mask].any()
    x0, w = unpack_targets(code)
    assert (w[0] == 1).all() and w[1][lone].all() and not w[1][labels > 0].any()
    # an image with an instance map keeps it; without from_masks nothing of the interior is known
    np.testing.assert_array_equal(
        pack_targets(Sample("a", img, mask, labels + 3 * lone), from_masks=True),
        pack_targets(Sample("a", img, mask, labels + 3 * lone)),
    )
    assert not (pack_targets(Sample("b", img, mask)) & KNOWN_BIT).any()


def _disc_samples(n=3, instances=True):
    from skimage.measure import label

    out = []
    for i in range(n):
        img, mask = disc_image(48, seed=i, n_discs=4, radius=(4, 9))
        out.append(Sample(f"img{i}", img, mask, label(mask).astype(np.int32) if instances and i != 1 else None))
    return out


def _cfg(out, **kw):
    base = dict(
        net={"mask_channels": 2},
        batch_size=2,
        warmup_steps=2,
        augment="monuseg",
        val="img2",
        val_samples=1,
        val_steps=2,
        max_steps=3,
    )
    return tiny_train_config(out, **{**base, **kw})


def test_two_channel_training_exports_a_model_whose_labels_come_from_its_interior(tmp_path):
    samples = _disc_samples()
    tr = Trainer(_cfg(tmp_path / "run"), samples=samples)
    img, x0, w = tr.make_batch()
    assert x0.shape == (2, 2, 32, 32) and w.shape == x0.shape
    assert ((w[:, 1] == 0) | (w[:, 1] == 1)).all() and (w[:, 0] == 1).all()
    tr.fit(progress=False)
    out = tmp_path / "two.pt"
    export(tmp_path / "run", out, "two", sampling={"samples": 2, "steps": 2})
    r = segment(samples[2].image, str(out), tile=32, instances=True, seed=0)
    assert r.interior is not None and r.interior.shape == r.probability.shape
    assert r.interior.min() >= 0 and r.interior.max() <= 1
    assert r.info["instances"]["method"] == "interior"
    ref = label_instances(r.mask, method="interior", interior=r.interior)
    np.testing.assert_array_equal(r.labels, ref)
    # streamed to zarr, the interior is read from the store (by blocks when large): the same labels
    z = segment(samples[2].image, str(out), tile=32, instances=True, seed=0, out=str(tmp_path / "o.zarr"))
    assert not isinstance(z.interior, np.ndarray)
    np.testing.assert_array_equal(np.asarray(z.labels[:]), r.labels)
    blocks = label_instances(r.mask, method="interior", interior=z.interior, block=16)  # ids numbered per block
    scores = instance_metrics(ref, blocks)
    assert scores["n_pred"] == scores["n_true"] == ref.max() > 1 and scores["aji"] > 0.99
    # a one-channel model has no interior
    assert segment(samples[2].image, tiny_model(), tile=32, samples=1, steps=1).interior is None


def test_two_channel_training_needs_instance_maps(tmp_path):
    with pytest.raises(SegDiffError, match="instances/.*interior_from_masks"):
        Trainer(_cfg(tmp_path / "run"), samples=_disc_samples(instances=False))
    # or learns the interior from the masks' single objects
    tr = Trainer(_cfg(tmp_path / "r2", interior_from_masks=True), samples=_disc_samples(instances=False))
    _, _, w = tr.make_batch()
    assert (w[:, 0] == 1).all() and w[:, 1].any()


def test_warm_start_widens_a_one_channel_model_and_refuses_the_reverse(tmp_path):
    one = tiny_model(seed=1)
    p1 = tmp_path / "one.pt"
    save_model(one.net, p1, half=False, meta={"name": "one"})
    tr = Trainer(
        _cfg(tmp_path / "run", preset="cpu-small", net={"mask_channels": 2}, init=str(p1)), samples=_disc_samples()
    )
    assert tr.net_cfg.mask_channels == 2 and tr.net_cfg.base_channels == one.config.base_channels
    torch.testing.assert_close(tr.net.state_dict()["F.weight"][:, :1], one.net.state_dict()["F.weight"])
    two = SegDiffModel.from_config(get_preset("tiny", mask_channels=2), name="two")
    p2 = tmp_path / "two.pt"
    save_model(two.net, p2, meta={"name": "two"})
    # fine-tuning a 2-channel model on masks without instance maps keeps its interior channel as it is
    ft = Trainer(_cfg(tmp_path / "ft", net={}, init=str(p2)), samples=_disc_samples(instances=False))
    assert ft.net_cfg.mask_channels == 2
    _, _, w = ft.make_batch()
    assert (w[:, 1] == 0).all() and (w[:, 0] == 1).all()
    with pytest.raises(SegDiffError, match="only a 1-channel model can be widened"):
        Trainer(_cfg(tmp_path / "r2", net={"mask_channels": 1}, init=str(p2)), samples=_disc_samples())


def test_blender_with_channels_matches_one_blender_per_channel():
    rng = np.random.default_rng(0)
    H, W, tile, stride = 50, 70, 32, 24
    weights = taper_weights(tile, tile - stride)
    wins = window_grid((H, W), tile, stride)
    tiles = [
        (rng.random((tile, tile, 2)).astype(np.float32), rng.random((tile, tile, 2)).astype(np.float32)) for _ in wins
    ]
    outs = {k: (np.zeros((H, W, 2), np.float32), np.zeros((H, W, 2), np.float32)) for k in ("both", 0, 1)}

    def emitter(key, c=None):
        def emit(y0, y1, m, v):
            if c is None:
                outs[key][0][y0:y1], outs[key][1][y0:y1] = m, v
            else:
                outs[key][0][y0:y1, :, c], outs[key][1][y0:y1, :, c] = m, v

        return emit

    both = StreamingBlender((H, W), tile, weights, emitter("both"), channels=2)
    per = [StreamingBlender((H, W), tile, weights, emitter(c, c)) for c in (0, 1)]
    for win, (m, s2) in zip(wins, tiles):
        both.add(win, m, s2)
        for c in (0, 1):
            per[c].add(win, m[..., c], s2[..., c])
    both.finish()
    for b in per:
        b.finish()
    for c in (0, 1):
        np.testing.assert_allclose(outs["both"][0][..., c], outs[c][0][..., c], rtol=1e-6)
        np.testing.assert_allclose(outs["both"][1][..., c], outs[c][1][..., c], rtol=1e-6, atol=1e-7)


def test_export_flag_takes_the_interior_method():
    from napari_segdiff.training.cli import parse_instances

    assert parse_instances("interior,seed_threshold=0.4,min_area=10") == {
        "method": "interior",
        "seed_threshold": 0.4,
        "min_area": 10.0,
    }
    with pytest.raises(SegDiffError, match="key of"):
        parse_instances("interior,threshold=0.4")
