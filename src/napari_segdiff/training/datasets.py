"""Training data layouts: a folder of images/ + masks/, the original MoNuSeg release (tif + XML
polygons) and the Vaihingen building layout. All load into memory as (RGB uint8, bool mask) pairs."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._errors import SegDiffError
from ..io import read_image

IMAGE_EXT = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


@dataclass
class Sample:
    name: str
    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) bool
    instances: np.ndarray | None = None  # (H, W) int32 object ids (0 = background) where the data has them


def _rgb_uint8(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    img = img[..., :3]
    if img.dtype != np.uint8:
        img = img.astype(np.float64)
        hi = img.max() if img.max() > 1.0 else 1.0
        img = np.clip(img / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return img


def _binary(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim == 3:
        mask = mask[..., 0]
    return mask > 0  # 0/255, 0/1 and label images alike: any non-zero is foreground


def _stems(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_EXT}


def read_names(path: str | Path) -> list[str]:
    """The image names of a names file (``val.txt``): one per line, blank lines and ``#`` comments skipped."""
    return [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def load_folder(root: str | Path) -> list[Sample]:
    """``root/images/NAME.ext`` with ``root/masks/NAME.ext`` (masks 0/255 or 0/1 or labels)."""
    root = Path(root)
    if not (root / "images").is_dir() or not (root / "masks").is_dir():
        raise SegDiffError(f"{root} must contain images/ and masks/ folders with matching file names")
    imgs, masks = _stems(root / "images"), _stems(root / "masks")
    missing = sorted(set(imgs) - set(masks))
    if missing:
        raise SegDiffError(
            f"{len(missing)} images in {root / 'images'} have no mask in {root / 'masks'}, e.g. {missing[:3]}"
        )
    if not imgs:
        raise SegDiffError(f"no images found in {root / 'images'} ({', '.join(IMAGE_EXT)})")
    insts = _stems(root / "instances") if (root / "instances").is_dir() else {}
    out = []
    for name, p in imgs.items():
        img, m = _rgb_uint8(read_image(p)), _binary(read_image(masks[name]))
        if img.shape[:2] != m.shape:
            raise SegDiffError(f"image {p.name} is {img.shape[:2]} but its mask is {m.shape}")
        inst = None
        if name in insts:  # optional: root/instances/NAME.* with one id per object (for the object metrics)
            inst = np.asarray(read_image(insts[name])).astype(np.int32)
            if inst.shape != m.shape:
                raise SegDiffError(f"instance map {insts[name].name} is {inst.shape} but the mask is {m.shape}")
        out.append(Sample(name, img, m, inst))
    return out


def rasterise_monuseg_xml(xml_path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """Union of the nucleus polygons of a MoNuSeg XML annotation (Regions/Region/Vertices/Vertex X,Y)."""
    from skimage.draw import polygon

    mask = np.zeros(shape, bool)
    tree = ET.parse(str(xml_path))
    for region in tree.iter("Region"):
        pts = [(float(v.get("Y")), float(v.get("X"))) for v in region.iter("Vertex")]
        if len(pts) < 3:
            continue
        r, c = np.array(pts).T
        rr, cc = polygon(r, c, shape)
        mask[rr, cc] = True
    return mask


def load_monuseg(root: str | Path, size: int | None = 512) -> list[Sample]:
    """The original MoNuSeg release: ``Tissue Images/*.tif`` and ``Annotations/*.xml`` (or the two
    files side by side). Resized to ``size`` (area for images, nearest for masks) as in the paper."""
    from skimage.transform import resize

    root = Path(root)
    tifs = sorted(list(root.rglob("*.tif")) + list(root.rglob("*.tiff")))
    xmls = {p.stem: p for p in root.rglob("*.xml")}
    out = []
    for t in tifs:
        if t.stem not in xmls:
            continue
        img = _rgb_uint8(read_image(t))
        mask = rasterise_monuseg_xml(xmls[t.stem], img.shape[:2])
        if size and img.shape[0] != size:
            img = (resize(img, (size, size), anti_aliasing=True, preserve_range=True) + 0.5).astype(np.uint8)
            mask = resize(mask, (size, size), order=0, anti_aliasing=False) > 0.5
        out.append(Sample(t.stem, img, mask))
    if not out:
        raise SegDiffError(f"no MoNuSeg image/XML pairs (NAME.tif + NAME.xml) found under {root}")
    return out


_VAI = re.compile(r"building_(\d+)\.tif{1,2}$", re.I)


def load_vaihingen(root: str | Path, split: str = "train") -> list[Sample]:
    """``building_XXX.tif`` with ``building_mask_XXX.tif``; 001-100 train, 101-168 test."""
    root = Path(root)
    lo, hi = (1, 100) if split == "train" else (101, 168)
    out = []
    for p in sorted(root.rglob("building_*.tif*")):
        m = _VAI.search(p.name)
        if not m or not lo <= int(m.group(1)) <= hi:
            continue
        mp = p.with_name(f"building_mask_{m.group(1)}{p.suffix}")
        if not mp.exists():
            raise SegDiffError(f"{p.name} has no mask {mp.name} beside it")
        out.append(Sample(p.stem, _rgb_uint8(read_image(p)), _binary(read_image(mp))))
    if not out:
        raise SegDiffError(f"no Vaihingen {split} files (building_XXX.tif + building_mask_XXX.tif) under {root}")
    return out


def load_dataset(root: str | Path, fmt: str = "folder") -> list[Sample]:
    if fmt == "folder":
        return load_folder(root)
    if fmt == "monuseg":
        return load_monuseg(root)
    if fmt == "vaihingen":
        return load_vaihingen(root)
    raise SegDiffError(f"unknown dataset format {fmt!r}; use folder, monuseg or vaihingen")


def split_samples(
    samples: list[Sample], val: str | float | list[str], seed: int = 0
) -> tuple[list[Sample], list[Sample]]:
    """Hold out a validation split: a list of names (or a file listing them) or a fraction chosen
    reproducibly from ``seed``."""
    names = [s.name for s in samples]
    if isinstance(val, str) and val.strip().lower() in ("", "none"):
        if not samples:
            raise SegDiffError("no training images")
        return list(samples), []
    if isinstance(val, str) and Path(val).is_file():
        val = read_names(val)
    elif isinstance(val, str):
        try:  # "0.2" (TrainConfig's default, and what the CLI passes) is a fraction, not a name
            val = float(val) if val.strip() not in names else [val.strip()]
        except ValueError:
            val = [v for v in val.split(",") if v]
    if isinstance(val, (list, tuple)):
        unknown = sorted(set(val) - set(names))
        if unknown:
            raise SegDiffError(f"validation names not in the data: {unknown[:5]}")
        vset = set(val)
    else:
        frac = float(val)
        if not 0 < frac < 1:
            raise SegDiffError(f"validation fraction must be in (0, 1), got {frac}")
        rng = np.random.default_rng(seed)
        k = max(1, int(round(frac * len(samples))))
        vset = {names[i] for i in rng.choice(len(samples), k, replace=False)}
    train = [s for s in samples if s.name not in vset]
    valid = [s for s in samples if s.name in vset]
    if not train:
        raise SegDiffError("the validation split leaves no training images")
    return train, valid
