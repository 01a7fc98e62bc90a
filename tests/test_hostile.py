"""The hostile trial's cases: nothing is lost, nothing is silently wrong, every failure is one clear line.

Each test is one case of the trial (docs/bad-input.md lists them with their behaviour)."""

from __future__ import annotations

import os
import stat

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr
from _helpers import disc_folder, tiny_model
from PIL import Image

import napari_segdiff as ns
from napari_segdiff._errors import ModelFileError, SegDiffError
from napari_segdiff.cli import main as cli
from napari_segdiff.engine import recommended_config
from napari_segdiff.io import read_image
from napari_segdiff.models import save_model
from napari_segdiff.training.cli import main as train_cli

FAST = ["--samples", "2", "--steps", "1", "--tile", "32", "--device", "cpu", "-q"]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile") / "tiny.pt"
    save_model(tiny_model(seed=0, perturb=0.05), path, half=False, meta={"name": "tiny-hostile"})
    return path


def _img(h=40, w=48, seed=0):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def _run(fn, *args) -> int:
    return fn([str(a) for a in args])


# ---------------------------------------------------------------- input destroyed
def test_zarr_array_inside_the_output_group_is_refused_and_kept(model_file, tmp_path, capsys):
    store = tmp_path / "data.zarr"
    g = zarr.open_group(str(store), mode="w")
    g.create_array("0", shape=(40, 48, 3), dtype="u1")[:] = _img()
    g.create_array("other", shape=(4,), dtype="u1")[:] = 7
    assert _run(cli, "segment", store / "0", "-o", store, "--overwrite", "--model", model_file, *FAST) == 2
    assert "input" in capsys.readouterr().err
    g = zarr.open_group(str(store), mode="r")
    assert np.array_equal(np.asarray(g["0"]), _img()) and np.asarray(g["other"])[0] == 7


def test_file_inside_the_output_directory_is_refused_and_kept(model_file, tmp_path, capsys):
    box = tmp_path / "box.zarr"
    box.mkdir()
    Image.fromarray(_img()).save(box / "img.png")
    assert _run(cli, "segment", box / "img.png", "-o", box, "--overwrite", "--model", model_file, *FAST) == 2
    assert (box / "img.png").exists() and np.array_equal(read_image(box / "img.png")[..., :3], _img())


def test_library_out_onto_the_store_being_read_is_refused(tmp_path):
    store = tmp_path / "in.zarr"
    zarr.open_array(str(store), mode="w", shape=(40, 48, 3), dtype="u1")[:] = _img()
    with pytest.raises(SegDiffError, match="input"):
        ns.segment(da.from_zarr(str(store)), tiny_model(), samples=1, steps=1, tile=32, out=str(store))
    assert np.array_equal(np.asarray(zarr.open_array(str(store), mode="r")), _img())


def test_library_out_refuses_an_existing_store_unless_overwrite(tmp_path):
    other = tmp_path / "other.zarr"
    zarr.open_group(str(other), mode="w").create_array("keep", shape=(2,), dtype="u1")[:] = 5
    kw = dict(samples=1, steps=1, tile=32, seed=0)
    with pytest.raises(SegDiffError, match="already exists.*overwrite=True"):
        ns.segment(_img(), tiny_model(), out=str(other), **kw)
    assert np.asarray(zarr.open_group(str(other), mode="r")["keep"])[0] == 5
    r = ns.segment(_img(), tiny_model(), out=str(other), overwrite=True, **kw)
    assert r.probability.shape == (40, 48)


# ---------------------------------------------------------------- training state destroyed
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    disc_folder(root / "data", 3, 48, prefix="")
    args = [
        "train",
        "--data",
        root / "data",
        "--preset",
        "tiny",
        "--crop",
        "32",
        "--batch-size",
        "2",
        "--max-steps",
        "2",
        "--val",
        "1",
        "--val-tile",
        "32",
        "--val-samples",
        "1",
        "--val-steps",
        "1",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--out",
        root / "run",
    ]
    assert _run(train_cli, *args) == 0
    return root


@pytest.mark.parametrize("target", ["last.pt", "best.pt"])
def test_export_and_pack_refuse_a_runs_own_checkpoints(run_dir, target, capsys):
    run = run_dir / "run"
    before = (run / target).read_bytes()
    assert _run(train_cli, "export", run, "--name", "x", "-o", run / target) == 2
    assert _run(train_cli, "pack", run, "-o", run / target) == 2
    assert (run / target).read_bytes() == before
    assert "error:" in capsys.readouterr().err


def test_export_refuses_an_existing_file_without_overwrite(run_dir, tmp_path):
    out = tmp_path / "m.pt"
    out.write_bytes(b"keep me")
    assert _run(train_cli, "export", run_dir / "run", "--name", "x", "-o", out) == 2
    assert out.read_bytes() == b"keep me"
    assert _run(train_cli, "export", run_dir / "run", "--name", "x", "-o", out, "--overwrite") == 0
    assert ns.load_model(out).name == "x"


def test_export_samples_zero_and_a_missing_run_are_refused_up_front(run_dir, tmp_path, capsys):
    assert _run(train_cli, "export", run_dir / "run", "--name", "x", "-o", tmp_path / "a.pt", "--samples", "0") == 2
    assert _run(train_cli, "export", tmp_path / "no-run", "--name", "x", "-o", tmp_path / "b.pt") == 2
    assert not (tmp_path / "a.pt").exists() and not (tmp_path / "b.pt").exists()
    assert "Traceback" not in capsys.readouterr().err


def test_export_stores_the_instance_method_and_tta_segment_then_uses(run_dir, tmp_path):
    out = tmp_path / "m.pt"
    args = ("export", run_dir / "run", "--name", "x", "-o", out, "--instances", "hmaxima,h=0.5,min_area=10", "--tta")
    assert _run(train_cli, *args) == 0
    assert ns.load_model(out).meta["instances"] == {"method": "hmaxima", "h": 0.5, "min_area": 10.0}
    assert ns.load_model(out).meta["sampling"]["tta"] is True
    img = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    r = ns.segment(img, str(out), tile=32, samples=1, steps=1, instances=True)
    assert r.info["instances"]["method"] == "hmaxima" and r.info["instances"]["h"] == 0.5
    assert r.info["tta"] is True  # the file's recommendation is segment()'s default


def test_export_stores_a_recommended_threshold_segment_and_the_widget_use(run_dir, tmp_path, capsys):
    out = tmp_path / "m.pt"
    assert _run(train_cli, "export", run_dir / "run", "--name", "x", "-o", out, "--threshold", "0.3") == 0
    assert ns.load_model(out).meta["sampling"]["threshold"] == 0.3
    img = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    r = ns.segment(img, str(out), tile=32, samples=1, steps=1)
    assert r.info["threshold"] == 0.3
    np.testing.assert_array_equal(r.mask, r.probability > 0.3)
    assert ns.segment(img, str(out), tile=32, samples=1, steps=1, threshold=0.6).info["threshold"] == 0.6
    assert recommended_config(ns.load_model(out)).sampling.threshold == 0.3  # what the widget's control takes
    for bad in ("0", "1", "1.5"):
        assert (
            _run(train_cli, "export", run_dir / "run", "--name", "x", "-o", tmp_path / "b.pt", "--threshold", bad) == 2
        )
    assert "--threshold must be between 0 and 1" in capsys.readouterr().err and not (tmp_path / "b.pt").exists()


@pytest.mark.parametrize(
    "spec, why",
    [
        ("blobs", "unknown method"),
        ("hmaxima,h", "key=value"),
        ("hmaxima,size=3", "key=value"),
        ("hmaxima,h=x", "must be a number"),
        ("hmaxima,min_area=-1", ">= 0"),
        (",", "give a method"),
    ],
)
def test_export_refuses_a_bad_instance_method(run_dir, tmp_path, capsys, spec, why):
    out = tmp_path / "m.pt"
    assert _run(train_cli, "export", run_dir / "run", "--name", "x", "-o", out, "--instances", spec) == 2
    assert why in capsys.readouterr().err and not out.exists()


# ---------------------------------------------------------------- silently wrong
def test_cmyk_jpeg_is_read_as_its_rgb(tmp_path):
    yy, xx = np.mgrid[:64, :64]
    rgb = np.stack([128 + 100 * np.sin(yy / 9), 128 + 100 * np.cos(xx / 7), 100 + 80 * np.sin((xx + yy) / 11)], -1)
    rgb = rgb.astype(np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    got = read_image(tmp_path / "c.jpg").astype(float)
    assert got.shape == (64, 64, 3)
    assert np.abs(got - rgb).mean() < 3  # the same picture (JPEG losses aside), not C, M, Y as R, G, B


def test_grey_alpha_png_is_grey_in_the_cli(model_file, tmp_path):
    ga = np.stack([_img(40, 48)[..., 0], np.full((40, 48), 255, np.uint8)], -1)
    Image.fromarray(ga, mode="LA").save(tmp_path / "ga.png")
    assert _run(cli, "segment", tmp_path / "ga.png", "-o", tmp_path / "o.tif", "--model", model_file, *FAST) == 0
    with tifffile.TiffFile(tmp_path / "o.tif") as t:
        assert t.pages[0].shape == (40, 48)  # one 40x48 image, not 40 slices of 48x2


@pytest.mark.parametrize("big", [1e300, 3e38])
def test_finite_huge_floats_give_finite_output(big):
    img = np.random.default_rng(0).random((40, 40)) * big * 2 - big
    r = ns.segment(img, tiny_model(), samples=2, steps=1, tile=32, seed=0)
    assert np.isfinite(r.probability).all() and np.isfinite(r.variance).all()


# ---------------------------------------------------------------- caught too late
def test_bad_val_tile_is_refused_before_training(run_dir, tmp_path):
    args = [
        "train",
        "--data",
        run_dir / "data",
        "--preset",
        "tiny",
        "--crop",
        "32",
        "--max-steps",
        "50",
        "--val",
        "1",
        "--val-tile",
        "13",
        "--device",
        "cpu",
        "--out",
        tmp_path / "r",
    ]
    assert _run(train_cli, *args) == 2
    assert not (tmp_path / "r" / "last.pt").exists()


def test_a_wrongly_typed_model_config_is_a_model_file_error(tmp_path):
    import torch

    m = tiny_model()
    cfg = m.config.to_dict()
    cfg["base_channels"] = "eight"
    torch.save(
        {"format": "napari-segdiff-model", "version": 1, "config": cfg, "state_dict": {}, "meta": {}},
        tmp_path / "bad.pt",
    )
    with pytest.raises(ModelFileError, match="config"):
        ns.load_model(tmp_path / "bad.pt")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_directory_fails_before_the_work(model_file, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        Image.fromarray(_img()).save(tmp_path / "in.png")
        assert _run(cli, "segment", tmp_path / "in.png", "-o", ro / "o.tif", "--model", model_file, *FAST) == 2
    finally:
        ro.chmod(stat.S_IRWXU)


def test_unwritable_output_paths_fail_before_the_work(model_file, tmp_path, capsys):
    Image.fromarray(_img()).save(tmp_path / "in.png")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir.tif").mkdir()
    for out in (tmp_path / "afile" / "o.tif", tmp_path / "adir.tif"):
        assert _run(cli, "segment", tmp_path / "in.png", "-o", out, "--model", model_file, *FAST) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 2 and "Traceback" not in err


# ---------------------------------------------------------------- raw tracebacks
def test_truncated_tiff_is_an_error_line(model_file, tmp_path, capsys):
    tifffile.imwrite(tmp_path / "t.tif", _img(200, 200))
    data = (tmp_path / "t.tif").read_bytes()
    (tmp_path / "t.tif").write_bytes(data[: len(data) // 3])
    assert _run(cli, "segment", tmp_path / "t.tif", "-o", tmp_path / "o.tif", "--model", model_file, *FAST) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err and not (tmp_path / "o.tif").exists()


def test_invalid_config_json_and_net_values_are_error_lines(tmp_path, capsys):
    (tmp_path / "c.json").write_text("{not json")
    assert _run(train_cli, "train", "--config", tmp_path / "c.json") == 2
    assert _run(train_cli, "train", "--data", tmp_path, "--net", "foo=1") == 2
    assert _run(train_cli, "train", "--data", tmp_path, "--net", "base_channels=abc") == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 3 and "Traceback" not in err


def test_resume_on_a_corrupt_checkpoint_is_an_error_line(run_dir, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir / "run", run)
    (run / "last.pt").write_bytes((run / "last.pt").read_bytes()[:1000])
    assert _run(train_cli, "resume", run) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


# ---------------------------------------------------------------- surprising
def test_multi_series_tiff_says_which_series(model_file, tmp_path, capsys):
    with tifffile.TiffWriter(tmp_path / "ms.tif") as w:
        w.write(_img(40, 48, 0))
        w.write(_img(30, 36, 1))
    with pytest.warns(UserWarning, match=r"2 image series .* segmenting series 0 \(choose another with --series\)"):
        assert _run(cli, "segment", tmp_path / "ms.tif", "-o", tmp_path / "o.tif", "--model", model_file, *FAST) == 0
    assert (
        _run(
            cli,
            "segment",
            tmp_path / "ms.tif",
            "-o",
            tmp_path / "o1.tif",
            "--series",
            "1",
            "--model",
            model_file,
            *FAST,
        )
        == 0
    )
    with tifffile.TiffFile(tmp_path / "o1.tif") as t:
        assert t.pages[0].shape == (30, 36)


def test_output_tif_is_three_pages_readable_by_pil(model_file, tmp_path):
    Image.fromarray(_img()).save(tmp_path / "in.png")
    assert _run(cli, "segment", tmp_path / "in.png", "-o", tmp_path / "o.tif", "--model", model_file, *FAST) == 0
    with tifffile.TiffFile(tmp_path / "o.tif") as t:
        assert len(t.pages) == 3 and all(p.shape == (40, 48) for p in t.pages)
    with Image.open(tmp_path / "o.tif") as im:
        assert im.size == (48, 40) and im.n_frames == 3


def test_numpy_integer_settings_accepted_and_fractional_seed_refused():
    r = ns.segment(_img(), tiny_model(), samples=np.int64(2), steps=np.int32(1), tile=32, seed=np.int64(3))
    assert r.info["samples"] == 2 and r.info["seed"] == 3
    with pytest.raises(SegDiffError, match="seed"):
        ns.segment(_img(), tiny_model(), samples=2, steps=1, tile=32, seed=1.9)


def test_overlap_that_multiplies_the_tiles_warns():
    with pytest.warns(UserWarning, match="times the"):
        ns.segment(_img(64, 64), tiny_model(), samples=1, steps=1, tile=32, overlap=0.9, seed=0)


def test_eval_json_path_that_is_a_directory_fails_up_front(run_dir, tmp_path, capsys):
    (tmp_path / "out.json").mkdir()
    args = ["eval", "--model", run_dir / "run" / "best.pt", "--data", run_dir / "data", "--json", tmp_path / "out.json"]
    rc = _run(train_cli, *args)
    assert rc == 2 and "Traceback" not in capsys.readouterr().err
