"""The shipped models load by name offline, their hashes verify, and each one segments its shipped
sample crop (a held-out validation image, never trained on) far better than an untrained network."""

from importlib.resources import files

import numpy as np
import pytest
from skimage.io import imread

import napari_segdiff as ns
from napari_segdiff.models import REGISTRY_FILE, WEIGHTS_DIR, SegDiffModel, sha256_of
from napari_segdiff.training.metrics import dice, iou

CASES = {
    # model: (sample image, sample mask, crop, metric, bound)
    "nuclei-he": ("nuclei_he.png", "nuclei_he_mask.png", (slice(0, 256), slice(0, 256)), dice, 0.70),
    # crop 091 is one of the harder validation crops (the 20-crop mean IoU is 0.66 at 3x2)
    "buildings-aerial": ("buildings_aerial.png", "buildings_aerial_mask.png", (slice(None), slice(None)), iou, 0.30),
}


def _sample(name):
    return np.asarray(imread(str(files("napari_segdiff.sample_data") / name)))


def test_both_models_registered_and_hashes_verify():
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
