"""The shipped models load by name offline, their hashes verify, and each one segments its shipped
sample crop (a held-out validation image, never trained on) far better than an untrained network."""

from importlib.resources import files

import numpy as np
import pytest
from skimage.io import imread

import napari_segdiff as ns
from napari_segdiff.models import REGISTRY_FILE, WEIGHTS_DIR, SegDiffModel, sha256_of
from napari_segdiff.training.metrics import dice, iou

BOUND_ALL = 0.70  # measured 0.82 at the model's threshold (the scene overlaps training tiles); untrained: 0.0
CASES = {
    # model: (sample image, sample mask, crop, metric, bound)
    "nuclei-he": ("nuclei_he.png", "nuclei_he_mask.png", (slice(0, 256), slice(0, 256)), dice, 0.70),
    # crop 091 is one of the harder validation crops (the 20-crop mean IoU is 0.66 at 3x2)
    "buildings-aerial": ("buildings_aerial.png", "buildings_aerial_mask.png", (slice(None), slice(None)), iou, 0.30),
    # every building of a 512x512 part of the aerial scene (a place it was trained in, not a held-out score)
    "buildings-all": (
        "buildings_scene.jpg",
        "buildings_scene_mask.png",
        (slice(768, 1280), slice(768, 1280)),
        iou,
        BOUND_ALL,
    ),
}


def _sample(name):
    return np.asarray(imread(str(files("napari_segdiff.sample_data") / name)))


def test_shipped_models_registered_and_hashes_verify():
    import json

    reg = json.loads(REGISTRY_FILE.read_text())
    assert set(CASES) <= set(reg), f"shipped models missing from {REGISTRY_FILE}"
    for name in CASES:
        path = WEIGHTS_DIR / reg[name]["file"]
        assert sha256_of(path) == reg[name]["sha256"]
        assert path.stat().st_size < 20e6  # small enough to ship
    assert ns.DEFAULT_MODEL in reg


@pytest.mark.parametrize("name", sorted(CASES))
def test_shipped_model_beats_untrained_on_sample(name):
    img_file, mask_file, crop, metric, bound = CASES[name]
    img, gt = _sample(img_file)[crop][..., :3], _sample(mask_file)[crop] > 0
    model = ns.load_model(name)
    assert model.sha256 is not None  # loaded through the registry, checksum verified
    r = ns.segment(img, model, samples=2, steps=2, overlap=0.0, seed=0)
    score = metric(r.mask, gt)
    untrained = SegDiffModel.from_config(model.config, name="untrained")
    u = ns.segment(img, untrained, samples=2, steps=2, overlap=0.0, seed=0)
    assert metric(u.mask, gt) < bound  # the bound means something: an untrained network fails it
    assert score >= bound, f"{name}: {metric.__name__} {score:.3f} < {bound}"


def test_buildings_all_at_two_pixel_sizes_agree_on_one_grid():
    """The same scene at its own 0.1485 m/px and downsampled 2x (0.297 m/px): told the pixel size, the model
    resamples to its own scale, and the two masks agree once brought to one grid."""
    from skimage.transform import resize

    img = _sample("buildings_scene.jpg")[768:1280, 768:1280, :3]
    half = (resize(img, (256, 256), order=1, anti_aliasing=True, preserve_range=True)).astype(np.uint8)
    model = ns.load_model("buildings-all")
    full = ns.segment(img, model, pixel_size=0.1485, seed=0)
    coarse = ns.segment(half, model, pixel_size=0.297, seed=0)
    assert coarse.mask.shape == (256, 256) and coarse.info["scale_factor"] == pytest.approx(2.0, rel=0.01)
    up = resize(coarse.probability, (512, 512), order=1) > coarse.info["threshold"]  # the model's threshold
    assert full.mask.mean() > 0.05  # there are buildings to agree on
    assert iou(up, full.mask) >= 0.9


def test_nuclei_he_at_40x_resolution_gives_the_same_nuclei():
    """nuclei-he declares its native scale (MoNuSeg's 40x tiles, 1000 px at about 0.25 um/px, resized to 512 px:
    0.488 um/px). The sample brought back to the 40x grid (0.25 um/px) and segmented with that pixel size gives
    the same mask, once on one grid, and about the same nuclei, as the 512-px version."""
    from skimage.transform import resize

    model = ns.load_model("nuclei-he")
    native = model.meta["pixel_size"]
    img = _sample("nuclei_he.png")[:256, :256, :3]
    side = int(round(256 * native / 0.25))  # 500 px
    x40 = resize(img, (side, side), order=1, preserve_range=True).astype(np.uint8)
    ref = ns.segment(img, model, seed=0, instances=True)
    big = ns.segment(x40, model, pixel_size=0.25, pixel_unit="um", seed=0, instances=True)
    assert big.mask.shape == (side, side) and big.info["scale_factor"] == pytest.approx(0.25 / native, rel=0.01)
    back = resize(big.probability, (256, 256), order=1) > 0.5
    assert ref.mask.mean() > 0.05  # there are nuclei to agree on
    assert dice(back, ref.mask) >= 0.9
    n_ref, n_big = len(np.unique(ref.labels)) - 1, len(np.unique(big.labels)) - 1
    assert abs(n_big - n_ref) <= 0.15 * n_ref, (n_ref, n_big)
    # told nothing, the 40x image is taken to be at the model's scale: nuclei twice the size it knows
    wrong = ns.segment(x40, model, seed=0)
    assert dice(resize(wrong.probability, (256, 256), order=1) > 0.5, ref.mask) < dice(back, ref.mask)
