"""`napari-segdiff-train eval`: the scores are those of the images segmented as users get them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _helpers import disc_folder, tiny_model
from skimage.io import imread, imsave

from napari_segdiff import segment
from napari_segdiff.models import load_model, save_model
from napari_segdiff.training.cli import main
from napari_segdiff.training.metrics import all_metrics, error_auroc


@pytest.fixture(scope="module")
def folder_and_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    disc_folder(root / "data", 3, 64, n_discs=4)
    path = root / "tiny.pt"
    save_model(tiny_model(seed=0), path, meta={"tiling": {"tile": 32}})  # the tiny net is for 32-px tiles
    return root, path


def test_eval_cli_scores_each_named_image_as_segment_does(folder_and_model, capsys):
    root, path = folder_and_model
    out = root / "report.json"
    rc = main(
        [
            "eval",
            "--model",
            str(path),
            "--data",
            str(root / "data"),
            "--names",
            "img0,img2",
            "--samples",
            "2",
            "--steps",
            "2",
            "--precision",
            "fp32",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    assert [r["image"] for r in report["images"]] == ["img0", "img2"]  # only the named ones
    s = report["settings"]
    assert (s["samples"], s["steps"], s["precision"], s["seed"], s["tile"]) == (2, 2, "fp32", 0, 32)
    # the mean is the mean of the per-image rows
    for k in ("dice", "iou", "calibration"):
        assert report["mean"][k] == pytest.approx(np.mean([r[k] for r in report["images"]]))
    # each row is segment() with the same settings, scored against that image's mask
    mdl = load_model(path)
    for row in report["images"]:
        img = imread(root / "data" / "images" / f"{row['image']}.png")
        mask = imread(root / "data" / "masks" / f"{row['image']}.png") > 0
        r = segment(img, mdl, samples=2, steps=2, seed=0, precision="fp32")
        ref = all_metrics(r.probability, mask)
        assert row["dice"] == pytest.approx(ref["dice"]) and row["iou"] == pytest.approx(ref["iou"])
        assert row["error_auroc"] == pytest.approx(error_auroc(r.variance, r.mask, mask), nan_ok=True)
    assert "mean (2 images)" in capsys.readouterr().out


def test_eval_cli_tta_is_segments_tta(folder_and_model, tmp_path):
    root, path = folder_and_model
    reports = {}
    for flag in ("--tta", "--no-tta"):
        out = tmp_path / f"{flag}.json"
        args = ["eval", "--model", str(path), "--data", str(root / "data"), "--names", "img1", "--samples", "3"]
        assert main([*args, "--steps", "2", "--precision", "fp32", flag, "--json", str(out)]) == 0
        reports[flag] = json.loads(out.read_text())
    assert reports["--tta"]["settings"]["tta"] is True and reports["--no-tta"]["settings"]["tta"] is False
    img = imread(root / "data" / "images" / "img1.png")
    mask = imread(root / "data" / "masks" / "img1.png") > 0
    r = segment(img, load_model(path), samples=3, steps=2, seed=0, precision="fp32", tta=True)
    assert reports["--tta"]["images"][0]["dice"] == pytest.approx(all_metrics(r.probability, mask)["dice"])
    assert reports["--tta"]["images"][0]["calibration"] != reports["--no-tta"]["images"][0]["calibration"]


def test_eval_cli_refuses_an_unknown_precision(folder_and_model, capsys):
    root, path = folder_and_model
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", str(path), "--data", str(root / "data"), "--precision", "fp16"])
    assert e.value.code == 2
    assert "fp16" in capsys.readouterr().err


def test_eval_cli_names_an_unknown_image(folder_and_model, capsys):
    root, path = folder_and_model
    rc = main(["eval", "--model", str(path), "--data", str(root / "data"), "--names", "img9"])
    assert rc == 2
    assert "img9" in capsys.readouterr().err


def test_eval_adds_object_metrics_where_instance_maps_exist(folder_and_model, tmp_path):
    """An instances/ folder (one id per object) adds AJI, PQ, F1 and count error, per image and as the mean
    over the images that have one, computed on segment()'s own instance labels."""
    import shutil

    from skimage.measure import label

    from napari_segdiff.training.metrics import instance_metrics

    root, path = folder_and_model
    data = tmp_path / "data"
    shutil.copytree(root / "data", data)
    (data / "instances").mkdir()
    mask = imread(data / "masks" / "img1.png") > 0
    imsave(data / "instances" / "img1.png", label(mask).astype(np.uint16), check_contrast=False)
    out = tmp_path / "r.json"
    args = ["eval", "--model", str(path), "--data", str(data), "--samples", "2", "--steps", "2", "--json", str(out)]
    assert main([*args, "--precision", "fp32"]) == 0
    report = json.loads(out.read_text())
    rows = {r["image"]: r for r in report["images"]}
    assert "aji" not in rows["img0"] and "aji" in rows["img1"]  # only where an instance map exists
    assert report["mean"]["images_with_instances"] == 1 and report["mean"]["aji"] == rows["img1"]["aji"]
    r = segment(
        imread(data / "images" / "img1.png"),
        load_model(path),
        samples=2,
        steps=2,
        seed=0,
        precision="fp32",
        instances=True,
    )
    want = instance_metrics(label(mask), r.labels)
    assert rows["img1"]["aji"] == pytest.approx(want["aji"]) and rows["img1"]["pq"] == pytest.approx(want["pq"])


def test_eval_scores_the_mask_at_the_models_recommended_threshold(folder_and_model, tmp_path):
    """A model file that recommends a threshold is scored on the mask users get with it, not at 0.5."""
    root, _ = folder_and_model
    path = tmp_path / "low.pt"
    save_model(tiny_model(seed=0), path, meta={"tiling": {"tile": 32}, "sampling": {"threshold": 0.2}})
    out = tmp_path / "r.json"
    args = ["eval", "--model", str(path), "--data", str(root / "data"), "--names", "img1"]
    assert main([*args, "--samples", "2", "--steps", "2", "--precision", "fp32", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["settings"]["threshold"] == 0.2
    img = imread(root / "data" / "images" / "img1.png")
    mask = imread(root / "data" / "masks" / "img1.png") > 0
    r = segment(img, load_model(path), samples=2, steps=2, seed=0, precision="fp32")
    assert report["images"][0]["dice"] == pytest.approx(all_metrics(r.probability, mask, threshold=0.2)["dice"])
    assert (r.probability > 0.2).sum() != (r.probability > 0.5).sum()  # the two thresholds give other masks


def test_eval_cli_threshold_sets_the_mask_it_scores(folder_and_model, tmp_path):
    root, path = folder_and_model
    out = tmp_path / "t.json"
    args = ["eval", "--model", str(path), "--data", str(root / "data"), "--names", "img1", "--samples", "2"]
    assert main([*args, "--steps", "2", "--precision", "fp32", "--threshold", "0.3", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["settings"]["threshold"] == 0.3
    img = imread(root / "data" / "images" / "img1.png")
    mask = imread(root / "data" / "masks" / "img1.png") > 0
    r = segment(img, load_model(path), samples=2, steps=2, seed=0, precision="fp32", threshold=0.3)
    row = report["images"][0]
    assert row["dice"] == pytest.approx(all_metrics(r.probability, mask, threshold=0.3)["dice"])
    assert row["error_auroc"] == pytest.approx(error_auroc(r.variance, r.probability > 0.3, mask), nan_ok=True)


def test_eval_cli_tile_sets_the_window_it_scores(folder_and_model, tmp_path):
    """--tile: the images are cut into windows of that size (here one 64-px window instead of four of 32)."""
    root, path = folder_and_model
    args = ["eval", "--model", str(path), "--data", str(root / "data"), "--names", "img1", "--samples", "2"]
    reports = {}
    for tile in ("32", "64"):
        out = tmp_path / f"{tile}.json"
        assert main([*args, "--steps", "2", "--precision", "fp32", "--tile", tile, "--json", str(out)]) == 0
        reports[tile] = json.loads(out.read_text())
    assert reports["64"]["settings"]["tile"] == 64 and reports["32"]["settings"]["tile"] == 32
    img = imread(root / "data" / "images" / "img1.png")
    mask = imread(root / "data" / "masks" / "img1.png") > 0
    r = segment(img, load_model(path), samples=2, steps=2, seed=0, precision="fp32", tile=64)
    assert reports["64"]["images"][0]["dice"] == pytest.approx(all_metrics(r.probability, mask)["dice"])
    assert reports["64"]["images"][0]["calibration"] != reports["32"]["images"][0]["calibration"]
