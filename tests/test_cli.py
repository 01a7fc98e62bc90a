"""`napari-segdiff segment` in-process: outputs, and never writing over the input."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr
from _helpers import tiny_model

from napari_segdiff import engine as engine_mod
from napari_segdiff import segment
from napari_segdiff.cli import main
from napari_segdiff.io import read_result
from napari_segdiff.models import save_model

FAST = ["--samples", "2", "--steps", "2", "--tile", "32", "--device", "cpu", "-q"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    model_path = d / "tiny.pt"
    save_model(tiny_model(seed=0, perturb=0.05), model_path, half=False, meta={"name": "tiny-cli"})
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:45, :70]
    img = np.clip(
        128 + 90 * np.sin(yy / 6.0)[..., None] * np.cos(xx / 8.0)[..., None] + rng.normal(0, 8, (45, 70, 3)), 0, 255
    ).astype(np.uint8)
    tif = d / "in.tif"
    tifffile.imwrite(tif, img)
    return d, model_path, tif, img


def _stack(path):
    """probability, variance and mask of a written result as one float32 (3, ...) array."""
    r = read_result(path)
    return np.stack([r["probability"], r["variance"], r["mask"].astype(np.float32)])


def _run(*args) -> int:
    return main([str(a) for a in args])


def test_segment_to_tif(files, tmp_path, capsys):
    d, model_path, tif, img = files
    out = tmp_path / "out.tif"
    assert _run("segment", tif, "-o", out, "--model", model_path, *FAST) == 0
    assert "wrote" in capsys.readouterr().out
    stack = _stack(out)
    assert stack.shape == (3, 45, 70) and stack.dtype == np.float32
    prob, var, mask = stack
    assert prob.min() >= 0 and prob.max() <= 1 and var.min() >= 0 and var.max() <= 0.25
    assert set(np.unique(mask)) <= {0.0, 1.0}
    np.testing.assert_array_equal(mask.astype(bool), prob > 0.5)
    # the CLI is segment() with the same settings (seed 0 by default)
    ref = segment(img, str(model_path), samples=2, steps=2, tile=32, device="cpu")
    np.testing.assert_array_equal(prob, ref.probability)
    np.testing.assert_array_equal(var, ref.variance)


def test_table_of_objects_and_its_refusals(files, tmp_path, capsys):
    d, model_path, tif, img = files
    out, table = tmp_path / "out.tif", tmp_path / "objects.csv"
    assert _run("segment", tif, "-o", out, "--model", model_path, "--table", table, *FAST) == 0
    labels = read_result(out)["labels"]  # --table turned --instances on
    text = table.read_text().splitlines()
    assert text[0].startswith("label,area_px,y,x,") and "mean_variance" in text[0]
    assert "area_um2" not in text[0]  # no pixel size given: no physical units
    assert len(text) - 1 == labels.max()
    # a streamed .zarr output: the table is measured before the store takes its final name
    zt = tmp_path / "z.csv"
    assert _run("segment", tif, "-o", tmp_path / "out.zarr", "--model", model_path, "--table", zt, *FAST) == 0
    assert zt.read_text() == table.read_text()
    before = table.read_bytes()
    capsys.readouterr()
    for extra, message in [
        (["--table", table], "already exists"),  # an existing table only with --overwrite
        (["--table", tmp_path / "o.tif"], "must end in .csv"),
        (["--table", tif], "must end in .csv"),
    ]:
        assert _run("segment", tif, "-o", tmp_path / "new.tif", "--model", model_path, *extra, *FAST) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "new.tif").exists() and table.read_bytes() == before


def test_segment_precision_flag(files, tmp_path):
    d, model_path, tif, img = files
    out = tmp_path / "out32.tif"
    assert _run("segment", tif, "-o", out, "--model", model_path, "--precision", "fp32", *FAST) == 0
    ref = segment(img, str(model_path), samples=2, steps=2, tile=32, device="cpu", precision="fp32")
    np.testing.assert_array_equal(read_result(out)["probability"], ref.probability)
    with pytest.raises(SystemExit):  # argparse refuses an unknown precision, naming the choices
        _run("segment", tif, "-o", tmp_path / "x.tif", "--model", model_path, "--precision", "fp16", *FAST)


def test_segment_to_zarr(files, tmp_path):
    d, model_path, tif, img = files
    out = tmp_path / "out.zarr"
    assert _run("segment", tif, "-o", out, "--model", model_path, "--seed", "4", *FAST) == 0
    g = zarr.open_group(str(out), mode="r")
    assert sorted(g.array_keys()) == ["mask", "probability", "variance"]
    for name in ("probability", "variance", "mask"):
        assert g[name].shape == (45, 70)
    prob = np.asarray(g["probability"][:])
    np.testing.assert_array_equal(np.asarray(g["mask"][:]), prob > 0.5)
    assert g.attrs["seed"] == 4 and g.attrs["model"] == "tiny-cli"
    ref = segment(img, str(model_path), samples=2, steps=2, tile=32, device="cpu", seed=4)
    np.testing.assert_array_equal(prob, ref.probability)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp store left


def test_zarr_input(files, tmp_path):
    d, model_path, tif, img = files
    src = tmp_path / "in.zarr"
    z = zarr.open_array(str(src), mode="w", shape=img.shape, chunks=(16, 16, 3), dtype="u1")
    z[:] = img
    out = tmp_path / "o.tif"
    assert _run("segment", src, "-o", out, "--model", model_path, *FAST) == 0
    ref = segment(img, str(model_path), samples=2, steps=2, tile=32, device="cpu")
    np.testing.assert_array_equal(read_result(out)["probability"], ref.probability)


def test_refuses_to_write_over_its_input(files, tmp_path, capsys):
    d, model_path, tif, img = files
    before = tif.read_bytes()
    for extra in ([], ["--overwrite"]):
        assert _run("segment", tif, "-o", tif, "--model", model_path, *FAST, *extra) == 2
        assert "input" in capsys.readouterr().err
    # also through another spelling of the same path
    assert _run("segment", tif, "-o", tif.parent / "." / tif.name, "--model", model_path, "--overwrite", *FAST) == 2
    assert tif.read_bytes() == before


def test_refuses_an_existing_output_without_overwrite(files, tmp_path, capsys):
    d, model_path, tif, img = files
    for name in ("exists.tif", "exists.zarr"):
        out = tmp_path / name
        if name.endswith(".tif"):
            out.write_bytes(b"keep me")
        else:
            out.mkdir()
            (out / "marker").write_text("keep me")
        assert _run("segment", tif, "-o", out, "--model", model_path, *FAST) == 2
        assert "--overwrite" in capsys.readouterr().err
        assert (out.read_bytes() if out.is_file() else (out / "marker").read_text().encode()) == b"keep me"
        assert _run("segment", tif, "-o", out, "--model", model_path, "--overwrite", *FAST) == 0
        if name.endswith(".tif"):
            assert _stack(out).shape == (3, 45, 70)
        else:
            assert zarr.open_group(str(out), mode="r")["probability"].shape == (45, 70)
            assert not (out / "marker").exists()


def test_bad_arguments_give_an_error_not_a_traceback(files, tmp_path, capsys):
    d, model_path, tif, img = files
    assert _run("segment", tmp_path / "missing.tif", "-o", tmp_path / "o.tif", "--model", model_path) == 2
    assert "does not exist" in capsys.readouterr().err
    assert _run("segment", tif, "-o", tmp_path / "o.tif", "--model", tmp_path / "nomodel.pt", *FAST) == 2
    assert (
        _run(
            "segment",
            tif,
            "-o",
            tmp_path / "o.tif",
            "--model",
            model_path,
            "--steps",
            "500",
            "--tile",
            "32",
            "--device",
            "cpu",
            "-q",
        )
        == 2
    )
    assert _run("segment", tif, "-o", tmp_path / "o.png", "--model", model_path, *FAST) == 2
    assert not (tmp_path / "o.tif").exists() and not (tmp_path / "o.png").exists()


def test_models_command(capsys):
    assert main(["models"]) == 0
    assert capsys.readouterr().out.strip()


def test_write_result_formats_and_refusals(tmp_path):
    from napari_segdiff._errors import SegDiffError
    from napari_segdiff.engine import SegmentationResult
    from napari_segdiff.io import read_image, write_result

    prob = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    res = SegmentationResult(prob, prob * (1 - prob), prob > 0.5, {"model": "m", "seed": 1, "tile": (1, 2)})
    z = write_result(res, tmp_path / "r.zarr")
    g = zarr.open_group(str(z), mode="r")
    np.testing.assert_array_equal(g["probability"][:], prob)
    np.testing.assert_array_equal(g["mask"][:], prob > 0.5)
    assert g.attrs["seed"] == 1 and g.attrs["tile"] == "(1, 2)"
    t = write_result(res, tmp_path / "r.tiff")
    np.testing.assert_array_equal(read_result(t)["variance"], prob * (1 - prob))
    with pytest.raises(SegDiffError, match="already exists"):
        write_result(res, tmp_path / "r.tiff")
    with pytest.raises(SegDiffError, match="input"):
        write_result(res, tmp_path / "r.tiff", overwrite=True, inputs=(tmp_path / "r.tiff",))
    with pytest.raises(SegDiffError, match="format"):
        write_result(res, tmp_path / "r.png")
    # the zarr result reads back as an image (its first array)
    assert read_image(tmp_path / "r.zarr").shape == (3, 4)


def test_a_folder_of_images_is_segmented_image_by_image(files, tmp_path, capsys, monkeypatch):
    """Several inputs or a folder: one result per image, each the same as the image segmented alone; the
    outputs are checked before any work, and an image that fails is reported while the others are written."""
    d, model_path, tif, img = files
    folder = tmp_path / "imgs"
    folder.mkdir()
    tifffile.imwrite(folder / "a.tif", img)
    iio = pytest.importorskip("imageio.v3")
    iio.imwrite(folder / "b.png", img[::-1])
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "results"
    assert _run("segment", folder, "-o", f"{out}/", "--model", model_path, *FAST) == 0
    assert "segmented 2 of 2 images" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["a.tif", "b.tif"]
    for name, arr in (("a", img), ("b", img[::-1])):
        alone = segment(arr, str(model_path), samples=2, steps=2, tile=32, device="cpu")
        np.testing.assert_array_equal(read_result(out / f"{name}.tif")["probability"], alone.probability)
    # a name pattern, with a table per image; files and folders may be mixed
    res = tmp_path / "res"

    def two_images(out, table, *more):
        return _run("segment", folder / "a.tif", tif, "-o", out, "--table", table, "--model", model_path, *FAST, *more)

    assert two_images(f"{res}/{{stem}}_seg.zarr", f"{res}/{{stem}}.csv") == 0
    assert sorted(p.name for p in res.iterdir()) == ["a.csv", "a_seg.zarr", "in.csv", "in_seg.zarr"]
    labels = read_result(res / "in_seg.zarr")["labels"]
    assert len((res / "in.csv").read_text().splitlines()) - 1 == labels.max()
    # one table for the batch: every image's objects, named in the first column, the same rows as alone
    assert two_images(tmp_path / "both", res / "all.csv") == 0
    assert "objects of 2 images in" in capsys.readouterr().out
    lines = (res / "all.csv").read_text().splitlines()
    own = {"a": (res / "a.csv").read_text().splitlines(), "in": (res / "in.csv").read_text().splitlines()}
    assert lines[0] == "image," + own["a"][0]
    assert lines[1:] == [f"{folder / 'a.tif'},{r}" for r in own["a"][1:]] + [f"{tif},{r}" for r in own["in"][1:]]
    assert len(own["a"]) > 1 and len(own["in"]) > 1
    # interrupted at the second image: its result is not written, the table holds the first image's objects
    sampler, calls = engine_mod.TileSampler.__call__, []

    def interrupt_second_image(self, *a, **k):
        calls.append(1)
        if len(calls) > 1:  # the first image's tiles are one batch, one call
            raise KeyboardInterrupt
        return sampler(self, *a, **k)

    monkeypatch.setattr(engine_mod.TileSampler, "__call__", interrupt_second_image)
    part = tmp_path / "part"
    assert two_images(part, part / "t.csv", "--batch-size", "64") == 130
    assert "after it were not started" in capsys.readouterr().err
    assert sorted(p.name for p in part.iterdir()) == ["a.tif", "t.csv"]
    assert (part / "t.csv").read_text().splitlines() == lines[: len(own["a"])]
    monkeypatch.undo()
    # refused before any work, nothing written
    capsys.readouterr()
    tifffile.imwrite(tmp_path / "a.tif", img)
    (tmp_path / "empty").mkdir()
    before = sorted(tmp_path.rglob("*"))
    for argv, message in [
        ([folder, "-o", tmp_path / "one.tif"], "give an output folder"),
        ([folder, "-o", out], "already exists"),  # a.tif is there: refused before b.tif is written either
        ([folder, "-o", tmp_path / "new", "--table", res / "all.csv"], "already exists"),  # the batch's table
        ([folder / "a.tif", tmp_path / "a.tif", "-o", tmp_path / "new"], "would both be written"),
        ([tmp_path / "a.tif", "-o", f"{tmp_path}/{{stem}}.tif", "--overwrite"], "is the input"),
        ([tmp_path / "empty", "-o", tmp_path / "new"], "holds no images"),
    ]:
        assert _run("segment", *argv, "--model", model_path, *FAST) == 2
        assert message in capsys.readouterr().err
        assert sorted(tmp_path.rglob("*")) == before
    # a bad image among good ones: the others are written, the exit status says one was not
    (folder / "c.tif").write_bytes(b"II*\x00 this is not a tiff")
    assert _run("segment", folder, "-o", tmp_path / "mixed", "--model", model_path, *FAST) == 2
    captured = capsys.readouterr()
    assert "c.tif" in captured.err and "segmented 2 of 3 images; not written:" in captured.out
    assert sorted(p.name for p in (tmp_path / "mixed").iterdir()) == ["a.tif", "b.tif"]
