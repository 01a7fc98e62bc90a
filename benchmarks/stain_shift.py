"""How do models hold up on H&E from other labs and scanners? Scores each model on the held-out images as they
are and shifted the two ways that differ most between sites:

- ``restained``: each image given another held-out image's colours (the next one in ``--names``, cyclically:
  another organ, another tissue source site), by Reinhard colour transfer in Lab
  (:func:`napari_segdiff.transforms.match_colours_uint8`), all the way;
- ``scanner``: a softer optic and a harder compression, a Gaussian blur (sigma 1 px) then JPEG at quality 40.

    python benchmarks/stain_shift.py [--models nuclei-he,runs/x/model.pt] [--conditions as-is,restained,scanner]
        [--data ../shared/data/monuseg/train] [--names training/nuclei-he/val.txt] [--seed 0] [--json OUT]

Each model at its defaults (``eval``'s code): Dice and IoU over the images, AJI and PQ over those with instance
maps. The shifts are fixed (no randomness), so every model sees the same images.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
from scipy import ndimage

from napari_segdiff.models import load_model
from napari_segdiff.training.augment import jpeg_roundtrip
from napari_segdiff.training.datasets import load_dataset, read_names
from napari_segdiff.training.evaluate import evaluate_items
from napari_segdiff.transforms import lab_stats, match_colours_uint8

ROOT = Path(__file__).resolve().parents[1]


def restained(images: list[np.ndarray]) -> list[np.ndarray]:
    """Each uint8 RGB image with the Lab statistics of the next one (cyclically)."""
    if len(images) < 2:
        raise SystemExit("restained needs at least two images: each takes the next one's colours")
    stats = [lab_stats(im / 255.0) for im in images]
    with warnings.catch_warnings():  # Lab colours outside sRGB are clipped, as skimage warns
        warnings.simplefilter("ignore", UserWarning)
        return [match_colours_uint8(im, stats[(k + 1) % len(images)]) for k, im in enumerate(images)]


def scanner(image: np.ndarray, sigma: float = 1.0, quality: int = 40) -> np.ndarray:
    """A uint8 RGB image blurred (Gaussian, ``sigma`` px) and JPEG-compressed at ``quality``."""
    soft = ndimage.gaussian_filter(image.astype(np.float32), (sigma, sigma, 0))
    return jpeg_roundtrip(soft, quality).astype(np.uint8)


def shifted(items, condition: str):
    if condition == "as-is":
        return items
    if condition == "restained":
        images = restained([s.image for s in items])
    elif condition == "scanner":
        images = [scanner(s.image) for s in items]
    else:
        raise SystemExit(f"unknown condition {condition!r}: as-is, restained or scanner")
    return [dataclasses.replace(s, image=im) for s, im in zip(items, images)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="nuclei-he", help="comma-separated names or files")
    ap.add_argument("--conditions", default="as-is,restained,scanner")
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/monuseg/train"))
    ap.add_argument("--names", default=str(ROOT / "training/nuclei-he/val.txt"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    held = read_names(args.names)
    by_name = {s.name: s for s in load_dataset(args.data)}
    items = [by_name[n] for n in held]
    sets = {c: shifted(items, c) for c in args.conditions.split(",")}
    rows = []
    for spec in args.models.split(","):
        model = load_model(spec)
        for condition, scored in sets.items():
            m = evaluate_items(model, scored, seed=args.seed, verbose=False)["mean"]
            row = {"model": spec, "condition": condition, **{k: m[k] for k in ("dice", "iou", "aji", "pq") if k in m}}
            rows.append(row)
            objects = f" AJI {row['aji']:.4f} PQ {row['pq']:.4f}" if "aji" in row else ""
            print(f"{spec} {condition}: Dice {row['dice']:.4f} IoU {row['iou']:.4f}{objects}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
