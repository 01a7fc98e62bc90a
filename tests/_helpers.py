"""Shared helpers for the core-library tests (tiny models, stand-in samplers, synthetic data)."""

from __future__ import annotations

import numpy as np
import torch

from napari_segdiff.config import get_preset
from napari_segdiff.models import SegDiffModel


def tiny_model(seed: int = 0, perturb: float = 0.3, **overrides) -> SegDiffModel:
    """The 'tiny' preset with its zero-initialised layers (output conv, second conv of each residual
    block, attention projections) filled with seeded random weights, so that its outputs depend on
    the image, on x_t and therefore on the sampling noise."""
    cfg = get_preset("tiny", **overrides)
    model = SegDiffModel.from_config(cfg, name="tiny-test", seed=seed)
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for p in model.net.parameters():
            if p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * perturb)
    return model.to("cpu")


def disc_image(size: int = 32, seed: int = 0, n_discs: int = 3, radius: tuple[float, float] = (4, 8)):
    """A dark RGB uint8 image with bright discs and the disc mask (an obvious function of the image)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    mask = np.zeros((size, size), bool)
    for _ in range(n_discs):
        r = rng.uniform(*radius)
        cy, cx = rng.uniform(r, size - r, 2)
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    img = np.repeat(np.where(mask[..., None], 220, 30), 3, axis=-1).astype(np.float64)
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), mask


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def disc_folder(root, n: int = 3, size: int = 48, prefix: str = "img", mask_value: int = 255, **disc_kw):
    """A training/eval folder (root/images, root/masks) of ``n`` disc images named PREFIX0.png, PREFIX1.png, ...;
    ``mask_value`` 255 for 0/255 masks, another value for label-like masks."""
    from pathlib import Path

    from PIL import Image

    root = Path(root)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        img, mask = disc_image(size, seed=i, **disc_kw)
        Image.fromarray(img).save(root / "images" / f"{prefix}{i}.png")
        Image.fromarray(mask.astype(np.uint8) * mask_value).save(root / "masks" / f"{prefix}{i}.png")
    return root


def tiny_train_config(out, **kw):
    """A TrainConfig for the 'tiny' preset on 32-px crops, one thread, no validation or checkpoints unless
    ``kw`` asks for them."""
    from napari_segdiff.training.trainer import TrainConfig

    base = dict(
        preset="tiny",
        crop=32,
        batch_size=4,
        lr=2e-3,
        warmup_steps=10,
        augment="none",
        val="",
        val_every=10_000,
        val_samples=2,
        val_steps=5,
        val_tile=32,
        ckpt_every=10_000,
        device="cpu",
        threads=1,
        out=str(out),
        seed=0,
    )
    base.update(kw)
    return TrainConfig(**base)
