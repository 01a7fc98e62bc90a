"""Fine-tuning: a trained model adapted to a user's own images in minutes, with the trainer's own loop.

It starts from the model's weights (the EMA that was shipped), keeps the model's network and input scale,
trains on random crops of the user's images with a learning rate suited to fine-tuning, holds back a
validation share when there are at least eight images (scored before the first step too, so a run that does
not help returns the base model's weights), and writes a model file that records where it came from.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import SegDiffError
from ..io import _within, check_writable
from ..models import SegDiffModel, _registry, _user_registry, load_model, register_user_model, save_model, sha256_of
from .datasets import load_folder, read_names
from .trainer import COLOUR_META, TrainConfig, Trainer, export

#: fine-tuning recipe (the model's network and input scale are kept)
LR = 5e-5
BATCH = 4
VAL_EVERY = 25
#: the recipe settings a fine-tuned model file records
RECIPE_KEYS = ("lr", "batch_size", "crop", "augment", "ema_decay", "freeze_encoder", "focus_steps", "amp")
#: a model's own recommended ``blend`` for fine-tunes of it (its metadata or the registry's; carried over)
BLEND_META = "finetune_blend"
#: what a fine-tuned model file carries over from its base model's metadata
CARRIED_META = ("pixel_size", "pixel_unit", "instances", "tiling", "augment", BLEND_META, *COLOUR_META)
#: the default share of the fine-tuned weights in the written model. Against the unblended weights, 0.75 scored
#: on the adapted organ/place Dice +0.014 / +0.022 and IoU -0.007 in three 10-minute float32 fine-tunes of about
#: 120-140 steps (AVX2 CPU), and IoU +0.027, -0.114 and -0.030 in three of 414-457 steps (native bf16:
#: leave-one-place-out buildings models on Kampala and the Philippines), better elsewhere in every case
#: measured (model cards). A fine-tune is for the user's own images, so the default keeps the fine-tuned weights,
#: unless the base model recommends another share (:data:`BLEND_META`: nuclei-he 0.5, see recommended_blend).
DEFAULT_BLEND = 1.0
#: what ``blend`` means, for the CLI's help and the widget's tooltip
BLEND_HELP = (
    "share of the fine-tuned weights in the written model, the rest the base model's (default: the base model's "
    f"recommendation, nuclei-he 0.5, else {DEFAULT_BLEND}; 1 = as fine-tuned, most gain in object counts on your "
    "images; lower keeps more of what the base model does elsewhere)"
)


def recommended_blend(meta: dict | None) -> float:
    """The blend a model recommends for fine-tunes of it (``meta['finetune_blend']``), else
    :data:`DEFAULT_BLEND`. nuclei-he recommends 0.5: in three leave-breast-out fine-tunes of 10 minutes on 4
    quarters (AVX2 float32, 127 steps; Zen 4 bf16, 420-427 steps, variance-chosen and random quarters) the
    unblended weights moved the organ's Dice from the base's 0.752 to 0.765, and 0.785 to 0.741 and 0.785, while
    half way back to the base reached 0.780, 0.796 and 0.811 (the models trained with the organ: 0.756, 0.799)
    and kept AJI above those references; buildings-all keeps 1 (its card)."""
    value = (meta or {}).get(BLEND_META)
    return float(value) if _is_blend(value) else DEFAULT_BLEND


def _is_blend(value) -> bool:
    """A share of the fine-tuned weights: a number in (0, 1] (not a bool, not NaN)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1


#: the mask thresholds a fine-tune chooses among (``threshold="auto"``), by pooled IoU on its held-back
#: validation images. Not on the images it trained on: leave-one-place-out buildings models fine-tuned 10
#: minutes on 4 Kampala tiles and scored on the place's 3 others gained 0.083 pooled IoU that way (threshold
#: 0.4 instead of 0.2, on the 4 highest-variance tiles) and lost 0.214 (0.5, on 4 random ones): the
#: threshold the tuned tiles want follows their building density, not the new tiles' (buildings-all card).
#: Not the default either: chosen on 2 held-back quarters of breast images (a leave-breast-out nuclei model,
#: 8 quarters, 10 minutes) it gave Dice +0.003 and AJI -0.056 on the 2 scored images (nuclei-he card)
THRESHOLD_CANDIDATES = (0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6)
#: the validation images segmented to choose it: at most this many
#: pixels in all (at least one image), each cut to its central THRESHOLD_MAX_SIDE square where larger; about
#: half a minute at nuclei-he's defaults on 2 CPU cores with native bf16
THRESHOLD_MAX_PIXELS = 4 * 2**20
THRESHOLD_MAX_SIDE = 2048
MIN_VAL_IMAGES = 8  # below this every image trains and the last state is kept (one held-out image of 4 chose
# worse states: leave-one-place-out Kampala, 4 tiles, 10 min: pooled IoU 0.303 with it, 0.419 without)
THRESHOLD_HELP = (
    "mask threshold of the written model: 'keep' (default) keeps the base model's; 'auto' chooses it by pooled "
    f"IoU on the held-back validation images (from {MIN_VAL_IMAGES} images on; with fewer it keeps the base "
    "model's); or a number in (0, 1)"
)


def choose_threshold(
    model, samples, candidates=THRESHOLD_CANDIDATES, seed: int = 0, prefer: float | None = None
) -> tuple[float, dict[float, float]]:
    """The mask threshold at which ``model`` (at its recommended sampling) scores the best pooled IoU over
    ``samples`` (each segmented once); ties go to the candidate nearest ``prefer``. Returns (threshold,
    {candidate: pooled IoU})."""
    from ..engine import segment

    inter = np.zeros(len(candidates))
    union = np.zeros(len(candidates))
    for s in samples:
        prob = np.asarray(segment(s.image, model, seed=seed).probability)
        for i, t in enumerate(candidates):
            m = prob > t
            inter[i] += np.count_nonzero(m & s.mask)
            union[i] += np.count_nonzero(m | s.mask)
    iou = {float(t): float(a / max(1.0, b)) for t, a, b in zip(candidates, inter, union)}
    return best_threshold(iou, prefer), iou


def best_threshold(iou: dict[float, float], prefer: float | None = None) -> float:
    """The threshold with the highest score in ``iou`` ({threshold: score}); ties go to the one nearest
    ``prefer`` (0.5 when None)."""
    best = max(iou.values())
    ties = [t for t, v in iou.items() if v >= best - 1e-9]
    return min(ties, key=lambda t: abs(t - (0.5 if prefer is None else prefer)))


def _judges(samples) -> list:
    """The images that choose the threshold: central crops of at most THRESHOLD_MAX_SIDE, THRESHOLD_MAX_PIXELS
    in all."""
    out, total = [], 0
    for s in samples:
        if out and total >= THRESHOLD_MAX_PIXELS:
            break
        h, w = s.mask.shape
        y, x = max(0, (h - THRESHOLD_MAX_SIDE) // 2), max(0, (w - THRESHOLD_MAX_SIDE) // 2)
        win = (slice(y, y + THRESHOLD_MAX_SIDE), slice(x, x + THRESHOLD_MAX_SIDE))
        out.append(replace(s, image=s.image[win], mask=s.mask[win], instances=None))
        total += out[-1].mask.size
    return out


def _threshold_mode(threshold) -> str | float:
    if threshold in ("auto", "keep"):
        return threshold
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        t = float("nan")
    if isinstance(threshold, bool) or not 0 < t < 1:
        raise SegDiffError(f"threshold: 'auto', 'keep' or a number in (0, 1), got {threshold!r}")
    return t


@dataclass
class FinetuneResult:
    path: Path
    sha256: str
    steps: int
    minutes: float
    base_score: float | None  # validation score of the base model (None: no validation share)
    best_score: float | None
    kept: str  # "best" (a fine-tuned state), "base" (fine-tuning did not beat the base model) or "last"
    cancelled: bool
    train_images: list[str]
    val_images: list[str]
    name: str | None = None
    threshold: float | None = None  # the written model's mask threshold
    threshold_note: str = ""  # how it was chosen
    blend: float = DEFAULT_BLEND  # the share of the fine-tuned weights in the written model


def _augment_for(meta: dict[str, Any]) -> str:
    if meta.get("augment"):
        return str(meta["augment"])
    return "aerial-shift" if meta.get("pixel_unit") in ("m", "cm") else "monuseg"


def _val_tile(base) -> int:
    """The tile the model is meant to run at: its recommended one, else its training crop in image pixels."""
    tile = (base.meta.get("tiling") or {}).get("tile")
    if tile:
        return int(tile)
    f = base.config.downsample_factor
    side = base.config.image_size / base.config.input_scale
    return max(f, int(round(side / f)) * f)


def _names(names) -> list[str] | None:
    if names is None:
        return None
    p = Path(str(names))
    if p.is_file():
        return read_names(p)
    return [n for n in str(names).split(",") if n]


def finetune(
    model,
    data: str | Path,
    out: str | Path,
    *,
    minutes: float | None = None,
    steps: int | None = None,
    names=None,
    name: str | None = None,
    overwrite: bool = False,
    seed: int = 0,
    threads: int = 0,
    select_metric: str | None = None,
    on_step: Callable[[Trainer, dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    progress: bool = True,
    samples=None,
    min_val_images: int = MIN_VAL_IMAGES,
    recipe: dict[str, Any] | None = None,
    blend: float | None = None,
    threshold: str | float = "keep",
) -> FinetuneResult:
    """Fine-tune ``model`` (shipped name or file) on ``data`` (``images/`` + ``masks/``) for ``minutes`` or
    ``steps``; write the model file ``out`` and, with ``name``, register it as a user model. ``samples``:
    already-loaded :class:`Sample` pairs instead of ``data`` (the napari widget passes its layers so).
    ``blend`` < 1 writes ``blend * fine-tuned + (1 - blend) * base`` weights (None: the base model's
    :func:`recommended_blend`): a model that keeps more of what the base knew about other places (measured in
    the buildings-all card: at 0.5, 83% of the gain on the adapted place and 0.015 pooled IoU lost elsewhere,
    against 0.107 lost at 1). ``threshold``: the written
    model's mask threshold: "keep" (default) keeps the base model's; "auto" chooses it among
    :data:`THRESHOLD_CANDIDATES` by pooled IoU on the held-back validation images and, with none held back,
    keeps the base model's (why neither is the default: :data:`THRESHOLD_CANDIDATES`); a number sets it."""
    if (minutes is None) == (steps is None):
        raise SegDiffError("give a budget: either minutes or steps (one of them)")
    if blend is not None and not _is_blend(blend):
        raise SegDiffError(
            f"blend is the share of the fine-tuned weights in the written model, in (0, 1] (1 = as fine-tuned, "
            f"0.5 = halfway back to the base model); got {blend!r}"
        )
    threshold = _threshold_mode(threshold)
    if minutes is not None and not (isinstance(minutes, (int, float)) and np.isfinite(minutes) and minutes > 0):
        raise SegDiffError(f"minutes must be > 0, got {minutes!r}")
    if steps is not None and not (isinstance(steps, (int, np.integer)) and not isinstance(steps, bool) and steps > 0):
        raise SegDiffError(f"steps must be an integer > 0, got {steps!r}")
    out = Path(out)
    if out.suffix.lower() != ".pt":
        raise SegDiffError(f"the fine-tuned model is a .pt file; got {str(out)!r}")
    if out.exists() and not overwrite:
        raise SegDiffError(f"output {str(out)!r} already exists; choose another path or pass --overwrite")
    check_writable(out)  # a directory, a parent that is a file, no permission: refused before any work
    if data and _within(out, Path(data)):
        raise SegDiffError(f"output {str(out)!r} lies inside the training data {str(data)!r}; write it elsewhere")
    if name is not None:
        if name in _registry():
            raise SegDiffError(f"{name!r} is a shipped model's name; choose another --name")
        if name in _user_registry() and not overwrite:
            raise SegDiffError(f"a user model named {name!r} exists already; choose another --name or pass --overwrite")
    base = load_model(model)
    if blend is None:
        blend = recommended_blend(base.meta)
    if samples is None:
        samples = load_folder(data)
    wanted = _names(names)
    if wanted is not None:
        have = {s.name for s in samples}
        missing = sorted(set(wanted) - have)
        if missing:
            raise SegDiffError(f"--names lists images that are not in {data}/images: {missing[:5]}")
        samples = [s for s in samples if s.name in set(wanted)]
    if not samples:
        raise SegDiffError("no image/mask pairs to fine-tune on")
    if not any(s.mask.any() for s in samples):
        raise SegDiffError("every mask is empty: mark the objects (mask > 0) in at least one image")
    rng = np.random.default_rng(seed)
    val_names: list[str] = []
    if len(samples) >= min_val_images:
        k = max(1, int(round(0.25 * len(samples))))
        val_names = sorted(samples[i].name for i in rng.choice(len(samples), k, replace=False))
    metric = select_metric or ("iou" if base.meta.get("pixel_unit") in ("m", "cm") else "dice")
    run = Path(tempfile.mkdtemp(prefix=f".{out.stem}.finetune.", dir=out.parent if out.parent.exists() else None))
    try:
        init = str(model)
        if isinstance(model, SegDiffModel):  # an in-memory model (the napari widget): through a file
            init = str(run / "base.pt")
            save_model(model, init, half=False, meta=model.meta)
        cfg = TrainConfig(
            data=str(data or ""),
            init=init,
            val=",".join(val_names) or "none",
            augment=_augment_for(base.meta),
            crop=base.config.image_size,
            batch_size=BATCH,
            lr=LR,
            warmup_steps=10,
            max_steps=int(steps) if steps else 10**7,
            max_minutes=float(minutes) if minutes else 0.0,
            ema_decay=0.99,
            val_every=VAL_EVERY if val_names else 10**7,
            val_samples=1,
            val_steps=2,
            val_tile=_val_tile(base),
            select_metric=metric,
            ckpt_every=10**7,
            seed=seed,
            threads=threads,
            out=str(run),
        )
        if recipe:  # overrides of the fine-tuning recipe (TrainConfig fields), for measuring one against another
            cfg = TrainConfig.from_dict({**cfg.to_dict(), **recipe})
        tr = Trainer(cfg, samples=samples)
        base_score = None
        if val_names:  # the base model's own score: fine-tuning must beat it to be kept
            base_score = tr.score(tr.validate(), None)
            tr.best = base_score
            tr.save_checkpoint("best.pt")
        t0 = time.time()
        cancelled = False

        def _step(t: Trainer) -> None:
            nonlocal cancelled
            if on_step is not None:
                on_step(t, {"step": t.step, "elapsed": time.time() - t0, "best": t.best})
            if should_stop is not None and should_stop():
                cancelled = True
                t._stop = True

        tr.fit(progress=progress, on_step=_step)
        took = (time.time() - t0) / 60
        ck = "best.pt" if val_names and (run / "best.pt").exists() else "last.pt"
        kept = "last" if ck == "last.pt" else ("base" if base_score is not None and tr.best <= base_score else "best")
        applied_blend = 1.0 if kept == "base" else float(blend)  # the base state blended with itself is the base
        meta = {
            "base_model": {"name": base.name, "sha256": base.sha256},
            "finetune": {
                "steps": tr.step,
                "minutes": round(took, 2),
                "train_images": [s.name for s in tr.train_set],
                "val_images": val_names,
                "data": str(data or "napari layers"),
                "kept": kept,
                "base_score": base_score,
                "best_score": tr.best if val_names else None,
                "select_metric": metric,
                "recipe": {k: getattr(cfg, k) for k in RECIPE_KEYS},
                "blend": applied_blend,
            },
        }
        for k in CARRIED_META:
            if k in base.meta:
                meta[k] = base.meta[k]
        sampling = dict(base.meta.get("sampling") or {})
        inherited = float(sampling.get("threshold", 0.5))
        written = {
            "name": name or out.stem,
            "checkpoint": ck,
            "blend": applied_blend,
            "base_state": base.net.state_dict(),
        }
        note = f"kept the base model's {inherited:g}"
        if threshold == "auto" and not val_names:
            note += f" (choosing it needs held-back images: from {min_val_images} images on)"
        elif threshold == "auto":
            cand, _sha, _half = export(run, run / "candidate.pt", sampling=sampling, extra_meta=meta, **written)
            judge = _judges(tr.val_set)
            chosen, ious = choose_threshold(load_model(str(cand)), judge, seed=seed, prefer=inherited)
            note = (
                f"{chosen:g} (pooled IoU {ious[chosen]:.3f} on the {len(judge)} validation images; base model's "
                f"{inherited:g})"
            )
            meta["finetune"]["threshold"] = {
                "chosen": chosen,
                "inherited": inherited,
                "on": "validation",
                "images": [s.name for s in judge],
                "pooled_iou": {f"{t:g}": round(v, 4) for t, v in ious.items()},
            }
            sampling["threshold"] = chosen
        elif threshold != "keep":
            sampling["threshold"] = float(threshold)
            note = f"{float(threshold):g} as given"
        path, sha, _half = export(
            run,
            out,
            sampling=sampling,
            extra_meta={**meta, "description": f"fine-tuned from {base.name}"},
            **written,
        )
        if name is not None:
            register_user_model(name, path, sha256_of(path), f"fine-tuned from {base.name}", overwrite=overwrite)
        return FinetuneResult(
            path,
            sha,
            tr.step,
            took,
            base_score,
            tr.best if val_names else None,
            kept,
            cancelled,
            [s.name for s in tr.train_set],
            val_names,
            name,
            sampling.get("threshold"),
            note,
            applied_blend,
        )
    finally:
        shutil.rmtree(run, ignore_errors=True)
