"""The adaptation curve: a model that never saw a place (or organ), fine-tuned on k of its images for a few
minutes, scored on the place's other images. The k images are chosen by highest mean variance of the base
model's run (the review list) or at random.

    python benchmarks/adaptation.py --base runs/lopo-kampala/model.pt --place Kampala --minutes 2,5,10,20 --k 4
    python benchmarks/adaptation.py --base runs/lopo-breast/model.pt --organ Breast --minutes 2,5,10 --k 4

One fine-tuning run per choice, as long as the longest budget: at each shorter budget the run's state is
taken as a run with that budget would have ended (the best validated state so far, after the validation a
run that runs out of time makes), so the rows are what ``napari-segdiff-train finetune --minutes M`` gives,
without paying 2 + 5 + 10 + 20 minutes. Prints one row per (choice, minutes) against the base model and,
with ``--reference``, against a model trained with the place. ``--blends 1,0.5`` also scores each fine-tuned
state blended with the base (``blend * fine-tuned + (1 - blend) * base``, what ``finetune --blend`` writes),
and ``--also NAME,...`` scores every model on those images too (e.g. the other organs' held-out images: what
fine-tuning costs where it was not aimed). The fine-tuning runs keep the base model's mask threshold, as
``finetune`` does by default (``--threshold auto`` passes its other choice); each row also scores the threshold
chosen by pooled IoU on the k training images themselves (which ``finetune`` never does: it misled).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from buildings_eval import DATA, evaluate, pooled_iou_at, tiles

from napari_segdiff.models import load_model, save_model
from napari_segdiff.training.datasets import load_folder
from napari_segdiff.training.finetune import (
    CARRIED_META,
    MIN_VAL_IMAGES,
    THRESHOLD_CANDIDATES,
    best_threshold,
    choose_threshold,
    finetune,
)
from napari_segdiff.training.trainer import blend_states, export

ROOT = Path(__file__).resolve().parents[1]
MONUSEG = ROOT.parent / "shared/data/monuseg/train"


def nuclei_rows(model, names, data: Path = MONUSEG, seed: int = 0):
    """Per-image pixel counts and instance metrics of a nuclei model on MoNuSeg training images."""
    import napari_segdiff as ns
    from napari_segdiff.io import read_image
    from napari_segdiff.training.metrics import instance_metrics

    rows = []
    for n in names:
        img = read_image(data / "images" / f"{n}.png")[..., :3]
        gt = read_image(data / "masks" / f"{n}.png") > 0
        r = ns.segment(img, model, seed=seed, instances=True)
        m = np.asarray(r.mask)
        inst = data / "instances" / f"{n}.png"
        im = instance_metrics(read_image(inst).astype(np.int64), r.labels) if inst.exists() else {}
        rows.append(
            {
                "name": n,
                "place": "all",
                "inter": int((m & gt).sum()),
                "union": int((m | gt).sum()),
                "dice": float(2 * (m & gt).sum() / max(1, m.sum() + gt.sum())),
                "iou": float((m & gt).sum() / max(1, (m | gt).sum())),
                **{k: v for k, v in im.items() if k in ("aji", "f1_50")},
                "mean_variance": float(np.mean(r.variance)),
            }
        )
    return rows


def scores(rows) -> dict[str, float]:
    inter, union = sum(r["inter"] for r in rows), sum(r["union"] for r in rows)
    out = {"pooled_iou": inter / max(1, union), "pooled_dice": 2 * inter / max(1, inter + union)}
    for k in ("aji", "f1_50"):
        vals = [r[k] for r in rows if k in r]
        if vals:
            out[k] = float(np.mean(vals))
    if rows and "sweep" in rows[0]:  # buildings: pooled IoU at other mask thresholds, from the same run
        out["pooled_iou_at"] = {t: round(v, 4) for t, v in pooled_iou_at(rows).items()}
    return out


def organ_names(organ: str) -> list[str]:
    """The training images of one organ (MoNuSeg's manifest.csv)."""
    with open(MONUSEG.parent / "manifest.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "train"]
    return sorted(r["id"] for r in rows if r["organ"].lower() == organ.lower())


def quarter_images(names, dst: Path) -> list[str]:
    """Cut each MoNuSeg image (and its mask) into four 256x256 quarters under dst/images, dst/masks."""
    from PIL import Image

    from napari_segdiff.io import read_image

    def write_png(path, a):
        Image.fromarray(np.ascontiguousarray(a)).save(path)

    for sub in ("images", "masks", "instances"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
    out = []
    for n in names:
        img = read_image(MONUSEG / "images" / f"{n}.png")
        mask = read_image(MONUSEG / "masks" / f"{n}.png")
        h, w = mask.shape[:2]
        for i, (y, x) in enumerate([(0, 0), (0, w // 2), (h // 2, 0), (h // 2, w // 2)]):
            q = f"{n}-q{i}"
            write_png(dst / "images" / f"{q}.png", img[y : y + h // 2, x : x + w // 2])
            write_png(dst / "masks" / f"{q}.png", mask[y : y + h // 2, x : x + w // 2])
            out.append(q)
    return out


def blended(path: Path, base, blend: float) -> Path:
    """The model file at ``path`` with ``blend * its weights + (1 - blend) * base's`` (base: a loaded model)."""
    if blend == 1.0:
        return path
    ft = load_model(str(path))
    ft.net.load_state_dict(blend_states(ft.net.state_dict(), base.net.state_dict(), blend))
    out = path.with_name(f"{path.stem}-blend{blend:g}.pt")
    save_model(ft, out, meta={**ft.meta, "name": out.stem})
    return out


def with_threshold(path: Path, threshold: float, m=None) -> Path:
    """A copy of the model file at ``path`` (``m``: it, loaded) whose recommended mask threshold is ``threshold``."""
    m = m if m is not None else load_model(str(path))
    out = path.with_name(f"{path.stem}-t{threshold:g}.pt")
    sampling = {**m.meta.get("sampling", {}), "threshold": threshold}
    save_model(m, out, meta={**m.meta, "name": out.stem, "sampling": sampling})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--place")
    g.add_argument("--organ")
    ap.add_argument("--minutes", default="2,5,10")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--choices", default="variance,random")
    ap.add_argument("--reference", help="a model trained with the place/organ, scored on the same images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--min-val-images",
        type=int,
        default=MIN_VAL_IMAGES,
        help=f"fine-tuning holds back a validation image from this many images on (default {MIN_VAL_IMAGES})",
    )
    ap.add_argument("--blends", default="1", help="comma-separated shares of the fine-tuned weights to score")
    ap.add_argument("--also", default="", help="comma-separated image (or tile) names every model is scored on too")
    ap.add_argument(
        "--recipe",
        default="{}",
        help="JSON object of training settings laid over finetune's recipe, e.g. '{\"lr\": 2e-5}' (default: none)",
    )
    ap.add_argument(
        "--threshold",
        default="keep",
        help="finetune's threshold (default keep; auto chooses one on the held-back images, from 8 images on: "
        "the longest budget's row then also scores the base model's threshold, 'kept_threshold')",
    )
    ap.add_argument(
        "--no-finetune",
        action="store_true",
        help="only the base model's rows (and, for places, its threshold chosen on the k tiles)",
    )
    ap.add_argument("--json")
    a = ap.parse_args()
    recipe = json.loads(a.recipe)
    blends = [float(b) for b in a.blends.split(",")]
    also = [n for n in a.also.split(",") if n]
    tmp_data = None
    if a.place:
        data = DATA
        pool = sorted(n for n, r in tiles(DATA).items() if r["place"] == a.place)
        fixed_test = None

        def rows_of(model, names):
            return evaluate(model, names)
    else:
        # an organ: its last two images (by name) are scored whole; the other images, cut in quarters of
        # 256x256, are the tiles a user would correct, and the ones the reference model was trained with
        names = organ_names(a.organ)
        if len(names) < 3:
            raise SystemExit(f"{a.organ} has {len(names)} training images; at least 3 are needed")
        fixed_test, whole = names[-2:], names[:-2]
        tmp_data = Path(tempfile.mkdtemp())
        data = tmp_data
        pool = quarter_images(whole, tmp_data)
        for n in fixed_test:
            for sub in ("images", "masks"):
                shutil.copy(MONUSEG / sub / f"{n}.png", tmp_data / sub)
            if (MONUSEG / "instances" / f"{n}.png").exists():
                shutil.copy(MONUSEG / "instances" / f"{n}.png", tmp_data / "instances")

        def rows_of(model, names):
            return nuclei_rows(model, names, data=tmp_data)

    if len(pool) <= a.k and fixed_test is None:
        raise SystemExit(f"{a.place} has {len(pool)} images; --k {a.k} leaves none to score")
    base_rows = rows_of(a.base, pool + (fixed_test or []))
    ref_rows = rows_of(a.reference, fixed_test or pool) if a.reference else []
    pool_rows = [r for r in base_rows if r["name"] in pool]
    by_var = [r["name"] for r in sorted(pool_rows, key=lambda r: -r["mean_variance"])]
    rng = np.random.default_rng(a.seed)
    picks = {"variance": sorted(by_var[: a.k]), "random": sorted(rng.choice(pool, a.k, replace=False).tolist())}
    marks = sorted(float(m) for m in a.minutes.split(","))
    base_model = load_model(a.base)
    base_meta = base_model.meta  # the snapshots run as the fine-tuned file would (sampling, instances)
    inherited = float((base_meta.get("sampling") or {}).get("threshold", 0.5))

    def also_rows(model):  # images of other organs or places, from the full training folder
        return evaluate(model, also) if a.place else nuclei_rows(model, also)

    also_base = scores(also_rows(a.base)) if also else {}
    if also:
        print(f"base on {also}: {also_base}", flush=True)
    out = []
    for choice in a.choices.split(","):
        train = picks[choice]
        test = fixed_test or [n for n in pool if n not in train]
        base = scores([r for r in base_rows if r["name"] in test])
        ref = scores([r for r in ref_rows if r["name"] in test]) if ref_rows else {}
        print(f"{choice}: fine-tune on {train}, score on {test}; base {base}; reference {ref}", flush=True)
        if "pooled_iou_at" in base:  # the base model with its threshold chosen on the k tiles, no training
            on_k = pooled_iou_at([r for r in base_rows if r["name"] in train])
            cand = {t: on_k[f"{t:g}"] for t in THRESHOLD_CANDIDATES}
            t_k = best_threshold(cand, inherited)
            print(
                f"  base, threshold chosen on the {a.k} tiles: {t_k:g} (pooled IoU there {cand[t_k]:.4f}); on the "
                f"scored tiles {base['pooled_iou_at'][f'{t_k:g}']:.4f} (at its own threshold {base['pooled_iou']:.4f})",
                flush=True,
            )
        if a.no_finetune:
            continue
        tmp = Path(tempfile.mkdtemp())
        try:
            (tmp / "data" / "images").mkdir(parents=True)
            (tmp / "data" / "masks").mkdir()
            for n in train:
                shutil.copy(data / "images" / f"{n}.png", tmp / "data" / "images")
                shutil.copy(data / "masks" / f"{n}.png", tmp / "data" / "masks")
            snaps: dict[float, tuple[Path, int]] = {}
            pending = list(marks[:-1])

            def on_step(t, info, pending=pending, snaps=snaps, tmp=tmp):
                # a run with budget m would stop here, validate once more and keep its best state
                if pending and info["elapsed"] >= pending[0] * 60:
                    m = pending.pop(0)
                    run = Path(t.cfg.out)
                    if t.val_set:
                        s = t.score(t.validate(), None)
                        if s > t.best:
                            t.best = s
                            t.save_checkpoint("best.pt")
                        ck = "best.pt"
                    else:
                        t.save_checkpoint(f"snap-{m}.pt")
                        ck = f"snap-{m}.pt"
                    export(
                        run,
                        tmp / f"ft-{m}.pt",
                        f"ft-{m}",
                        checkpoint=ck,
                        sampling=base_meta.get("sampling"),
                        extra_meta={k: base_meta[k] for k in CARRIED_META if k in base_meta},
                    )
                    snaps[m] = (tmp / f"ft-{m}.pt", t.step)

            t0 = time.time()
            res = finetune(
                a.base,
                tmp / "data",
                tmp / "ft.pt",
                minutes=marks[-1],
                progress=False,
                seed=a.seed,
                on_step=on_step,
                min_val_images=a.min_val_images,
                recipe=recipe or None,
                blend=1,  # the fine-tuned state itself; --blends mixes it with the base afterwards
                threshold=a.threshold,  # keep: the base's threshold; each row also scores the in-sample choice
            )
            train_samples = load_folder(tmp / "data")
            print(f"  fine-tuning ran {(time.time() - t0) / 60:.1f} min, kept {res.kept}", flush=True)
            snaps[marks[-1]] = (tmp / "ft.pt", res.steps)
            for m in marks:
                tuned, steps = snaps[m]
                for blend in blends:
                    path = blended(tuned, base_model, blend)
                    s = scores(rows_of(str(path), test))
                    closed = {
                        k: (s[k] - base[k]) / (ref[k] - base[k])
                        for k in s
                        if k in ref and not isinstance(s[k], dict) and abs(ref[k] - base[k]) > 1e-9
                    }
                    elsewhere = scores(also_rows(str(path))) if also else {}
                    tuned_model = load_model(str(path))
                    kept = {}
                    if m == marks[-1] and res.threshold is not None and res.threshold != inherited:
                        kept = scores(rows_of(str(with_threshold(path, inherited, tuned_model)), test))
                        print(f"  finetune chose threshold {res.threshold_note}; at {inherited:g}: {kept}", flush=True)
                    # the threshold chosen on the k training images themselves (in-sample)
                    own = float(tuned_model.meta.get("sampling", {}).get("threshold", 0.5))
                    chosen, _ = choose_threshold(tuned_model, train_samples, seed=a.seed, prefer=inherited)
                    in_sample = (
                        scores(rows_of(str(with_threshold(path, chosen, tuned_model)), test)) if chosen != own else s
                    )
                    row = {
                        "target": a.place or a.organ,
                        "choice": choice,
                        "minutes": m,
                        "steps": steps,
                        "recipe": recipe,
                        "blend": blend,
                        "train": train,
                        "test": test,
                        "base": base,
                        "reference": ref,
                        "adapted": s,
                        "gap_closed": closed,
                        "in_sample_threshold": chosen,
                        "adapted_in_sample_threshold": in_sample,
                        "finetune_threshold": res.threshold if m == marks[-1] else None,
                        "kept_threshold": kept,
                        "also": also,
                        "also_base": also_base,
                        "also_adapted": elsewhere,
                    }
                    out.append(row)
                    print(
                        f"  {m:g} min ({steps} steps), blend {blend:g}: "
                        + ", ".join(
                            f"{k} {v:.4f} (base {base[k]:.4f}, ref {ref.get(k, np.nan):.4f})"
                            for k, v in s.items()
                            if not isinstance(v, dict)
                        )
                        + (f"; pooled IoU by threshold {s['pooled_iou_at']}" if "pooled_iou_at" in s else "")
                        + (f"; gap closed {closed}" if closed else "")
                        + f"; threshold {chosen:g} (chosen on the training tiles) instead of {inherited:g}: "
                        + ", ".join(f"{k} {v:.4f}" for k, v in in_sample.items() if not isinstance(v, dict))
                        + (f"; elsewhere {elsewhere}" if elsewhere else ""),
                        flush=True,
                    )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if tmp_data is not None:
        shutil.rmtree(tmp_data, ignore_errors=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
