"""Does segmenting at another scale than the model's help? Each named image is segmented at the model's
defaults with ``pixel_size=P`` (in the model's unit) for each P given, so that ``segment()`` resamples it by
P / (the model's pixel size) before sampling and back after: P above the model's enlarges the image, below it
shrinks it. Printed per P: mean Dice over the images and, over those with an instance map (``DATA/instances/``),
mean AJI and each image's AJI.

    python benchmarks/test_time_scale.py --model nuclei-he --data ../shared/data/monuseg/train \
        --names training/nuclei-he/val.txt --pixel-sizes 0.488,0.44,0.54,0.6
"""

from __future__ import annotations

import argparse

import numpy as np

import napari_segdiff as ns
from napari_segdiff.models import load_model
from napari_segdiff.training.datasets import load_dataset, split_samples
from napari_segdiff.training.metrics import all_metrics, instance_metrics


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="nuclei-he")
    ap.add_argument("--data", required=True)
    ap.add_argument("--names", required=True, help="file of image names")
    ap.add_argument("--pixel-sizes", required=True, help="comma-separated, in the model's unit")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    _, items = split_samples(load_dataset(a.data), a.names)
    model = load_model(a.model, device="cpu")
    unit = model.meta.get("pixel_unit")
    for p in (float(v) for v in a.pixel_sizes.split(",")):
        dice, aji = [], []
        for s in items:
            has_instances = s.instances is not None
            r = ns.segment(s.image, model, instances=has_instances, seed=a.seed, pixel_size=p, pixel_unit=unit)
            dice.append(all_metrics(r.probability, s.mask, threshold=r.info["threshold"])["dice"])
            if has_instances:
                aji.append(instance_metrics(s.instances, np.asarray(r.labels))["aji"])
        per = " ".join(f"{v:.3f}" for v in aji)
        print(f"pixel size {p:g} {unit}: Dice {np.mean(dice):.4f}, AJI {np.mean(aji):.3f} ({per})", flush=True)


if __name__ == "__main__":
    main()
