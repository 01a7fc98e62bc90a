"""Bad input, faults and safety (docs/bad-input.md lists every case and points here).

Each case either works (with the stated result) or raises the project's own SegDiffError (or its
subclass ModelFileError) whose message names the problem and the fix.
"""

from __future__ import annotations

import errno
import os
import re
import signal
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import torch
from _helpers import tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import napari_segdiff as ns
from napari_segdiff import ModelFileError, SegDiffError
from napari_segdiff import engine as engine_mod
from napari_segdiff.cli import main as cli_main
from napari_segdiff.models import SegDiffModel, save_model

FAST = dict(samples=2, steps=2, tile=32, overlap=0.25, seed=0)
FAST_CLI = ["--samples", "2", "--steps", "2", "--tile", "32", "-q"]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3, perturb=0.05)


@pytest.fixture(scope="module")
def model_file(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "tiny model.pt"
    save_model(model, path)
    return path


def _check_result(r, shape):
    assert r.probability.shape == shape and r.variance.shape == shape and r.mask.shape == shape
    assert np.all((r.probability >= 0) & (r.probability <= 1))
    assert np.all((r.variance >= 0) & (r.variance <= 0.25 + 1e-6))


# ------------------------------------------------------------------ images that work
rng = np.random.default_rng(0)
GOOD_IMAGES = {
    "1x1": rng.random((1, 1, 3)),
    "smaller-than-tile": rng.random((20, 30, 3)),
    "thin-3x5000": rng.random((3, 500)),  # thin: 3 rows (kept at 500 wide for speed; 5000 in the hypothesis range)
    "not-multiple-of-tile": rng.random((70, 45, 3)),
    "constant": np.full((40, 40, 3), 7.0),
    "uint8": (rng.random((40, 40, 3)) * 255).astype(np.uint8),
    "uint16": (rng.random((40, 40)) * 4095).astype(np.uint16),
    "int32": (rng.random((40, 40, 3)) * 1e6 - 5e5).astype(np.int32),
    "float-outside-0-1": rng.random((40, 40, 3)) * 300 - 5,
    "float64": rng.random((40, 40, 3)).astype(np.float64),
    "bool": rng.random((40, 40)) > 0.5,
    "grey": rng.random((40, 40)).astype(np.float32),
    "RGBA": rng.random((40, 40, 4)).astype(np.float32),
    "grey-with-channel-axis": rng.random((40, 40, 1)).astype(np.float32),
}


@pytest.mark.parametrize("name", sorted(GOOD_IMAGES))
def test_images_that_work(model, name):
    img = GOOD_IMAGES[name]
    r = ns.segment(img, model, **FAST)
    _check_result(r, img.shape[:2])


def test_channel_first_equals_channel_last(model):
    img = rng.random((50, 60, 3)).astype(np.float32)
    a = ns.segment(img, model, **FAST)
    b = ns.segment(np.moveaxis(img, -1, 0), model, **FAST)
    np.testing.assert_allclose(a.probability, b.probability, atol=1e-6)


def test_non_contiguous_and_read_only(model):
    base = rng.random((100, 120, 3)).astype(np.float32)
    view = base[::2, ::2]  # non-contiguous
    view.flags.writeable = False
    before = view.copy()
    a = ns.segment(view, model, **FAST)
    b = ns.segment(np.ascontiguousarray(view), model, **FAST)
    np.testing.assert_allclose(a.probability, b.probability, atol=1e-6)
    np.testing.assert_array_equal(view, before)  # input untouched


def test_dask_ragged_chunks_equal_numpy(model):
    img = rng.random((77, 91, 3)).astype(np.float32)
    lazy = da.from_array(img, chunks=((10, 50, 17), (33, 58), (3,)))
    np.testing.assert_allclose(
        ns.segment(lazy, model, **FAST).probability, ns.segment(img, model, **FAST).probability, atol=1e-6
    )


def test_zarr_read_only(model, tmp_path):
    zarr = pytest.importorskip("zarr")
    img = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    z = zarr.open_array(str(tmp_path / "in.zarr"), mode="w", shape=img.shape, chunks=(32, 32, 3), dtype="u1")
    z[:] = img
    ro = zarr.open_array(str(tmp_path / "in.zarr"), mode="r")
    r = ns.segment(ro, model, **FAST)
    np.testing.assert_allclose(r.probability, ns.segment(img, model, **FAST).probability, atol=1e-6)


# ------------------------------------------------------------------ images that are refused
BAD_IMAGES = {
    "empty-0px": (np.zeros((0, 10, 3)), "empty"),
    "nan": (np.where(rng.random((20, 20)) > 0.5, np.nan, 0.3), "NaN"),
    "inf": (np.where(rng.random((20, 20)) > 0.5, np.inf, 0.3), "infinite"),
    "2-channel": (rng.random((20, 20, 2)), "channels"),
    "6-channel": (rng.random((20, 20, 6)), "channels"),
    "3d-stack": (rng.random((5, 40, 40)), "stack"),
    "4d": (rng.random((2, 3, 20, 20)), "single 2-D image"),
    "5d": (rng.random((2, 2, 3, 20, 20)), "single 2-D image"),
    "complex-dtype": (np.ones((10, 10), np.complex64), "dtype"),
    "not-an-array": ([[1, 2], [3, 4]], "array"),
}


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_images_refused(model, name):
    img, words = BAD_IMAGES[name]
    with pytest.raises(SegDiffError, match=words):
        ns.segment(img, model, **FAST)


# ------------------------------------------------------------------ parameters
@pytest.mark.parametrize(
    "kw, words",
    [
        ({"samples": 0}, "samples must be"),
        ({"steps": 0}, "steps must be"),
        (
            {"steps": 21},
            "between 1 and 20",
        ),  # tiny was trained for T=20: "a model trained for a different number of steps"
        ({"overlap": 1.0}, r"overlap must be in \[0, 1\)"),
        ({"overlap": -0.1}, r"overlap must be in \[0, 1\)"),
        ({"tile": 33}, "multiple of 2"),
        ({"threshold": 1.5}, r"threshold must be in \[0, 1\]"),
        ({"batch_size": 0}, "batch_size"),
        ({"device": "tpu"}, "device"),
        ({"sampler": "euler"}, "sampler must be one of ddpm, ddim"),
    ],
)
def test_parameters_refused_with_range(model, kw, words):
    args = {**FAST, **kw}
    with pytest.raises(SegDiffError, match=words):
        ns.segment(np.zeros((40, 40)), model, **args)


# ------------------------------------------------------------------ models
def test_model_other_architecture_named(tmp_path):
    from napari_segdiff.config import get_preset
    from napari_segdiff.network import SegDiffNet

    path = tmp_path / "raw.pt"
    torch.save(SegDiffNet(get_preset("cpu-small")).state_dict(), path)
    with pytest.raises(ModelFileError, match="cpu-small"):
        ns.load_model(path)


# ------------------------------------------------------------------ devices and memory
def test_mps_absent():
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        pytest.skip("MPS present")
    with pytest.raises(SegDiffError, match="mps"):
        ns.segment(np.zeros((8, 8)), SegDiffModel.from_config("tiny"), device="mps")


def test_memory_refused_up_front(model, monkeypatch):
    monkeypatch.setattr(engine_mod, "available_memory", lambda dev: 1_000_000)
    with pytest.raises(SegDiffError, match="GiB.*lower samples or tile"):
        ns.segment(np.zeros((40, 40)), model, **FAST)


def test_memory_lowers_batch_with_warning(model, monkeypatch):
    need = engine_mod.estimate_sample_bytes(model.config, 32) * 2
    monkeypatch.setattr(engine_mod, "available_memory", lambda dev: int(need * 1.5 / 0.7))
    with pytest.warns(UserWarning, match="batch_size lowered from 4 to 1"):
        r = ns.segment(np.zeros((70, 70)), model, **{**FAST, "batch_size": 4})
    assert r.info["batch_size"] == 1


# ------------------------------------------------------------------ files
def _write_png(path, img):
    from skimage.io import imsave

    imsave(str(path), img, check_contrast=False)


def test_cli_refuses_output_equal_to_input(model_file, tmp_path, capsys):
    inp = tmp_path / "img.tif"
    import tifffile

    tifffile.imwrite(inp, (rng.random((40, 40)) * 255).astype(np.uint8))
    before = inp.read_bytes()
    assert cli_main(["segment", str(inp), "-o", str(inp), "--model", str(model_file), "--overwrite", "-q"]) == 2
    assert "is the input" in capsys.readouterr().err
    assert inp.read_bytes() == before


def test_cli_refuses_existing_output(model_file, tmp_path, capsys):
    inp, out = tmp_path / "img.png", tmp_path / "out.tif"
    _write_png(inp, (rng.random((40, 40, 3)) * 255).astype(np.uint8))
    out.write_bytes(b"precious")
    assert cli_main(["segment", str(inp), "-o", str(out), "--model", str(model_file), "-q"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"


@pytest.mark.parametrize(
    "name, content, words",
    [
        ("img.xyz", b"whatever", "unknown image format"),
        ("broken.png", b"\x89PNG\r\n\x1a\nnot really", "cannot read"),
        ("missing.png", None, "does not exist"),
    ],
)
def test_cli_unreadable_or_unknown_input(model_file, tmp_path, capsys, name, content, words):
    inp = tmp_path / name
    if content is not None:
        inp.write_bytes(content)
    assert cli_main(["segment", str(inp), "-o", str(tmp_path / "o.tif"), "--model", str(model_file), "-q"]) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "o.tif").exists()


def test_cli_unknown_output_format(model_file, tmp_path, capsys):
    inp = tmp_path / "img.png"
    _write_png(inp, (rng.random((40, 40, 3)) * 255).astype(np.uint8))
    assert cli_main(["segment", str(inp), "-o", str(tmp_path / "o.jpg"), "--model", str(model_file), "-q"]) == 2
    assert "unknown output format" in capsys.readouterr().err


def test_cli_paths_with_spaces_and_non_ascii(model_file, tmp_path):
    d = tmp_path / "mes données ñ"
    d.mkdir()
    inp, out = d / "noyaux é.png", d / "résultat 1.tif"
    _write_png(inp, (rng.random((40, 40, 3)) * 255).astype(np.uint8))
    assert (
        cli_main(
            [
                "segment",
                str(inp),
                "-o",
                str(out),
                "--model",
                str(model_file),
                *FAST_CLI,
            ]
        )
        == 0
    )
    from napari_segdiff.io import read_result

    assert {k: v.shape for k, v in read_result(out).items()} == dict.fromkeys(
        ("probability", "variance", "mask"), (40, 40)
    )


def test_full_disk_keeps_previous_output(model, tmp_path, monkeypatch):
    import tifffile

    from napari_segdiff.io import write_result

    out = tmp_path / "out.tif"
    r = ns.segment(np.zeros((40, 40)), model, **FAST)
    write_result(r, out)
    before = out.read_bytes()

    def disk_full(self, *a, **k):
        self._fh.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tifffile.TiffWriter, "write", disk_full)
    with pytest.raises(OSError):
        write_result(r, out, overwrite=True)
    assert out.read_bytes() == before  # the previous file survives
    assert [p.name for p in tmp_path.iterdir()] == ["out.tif"]  # no temp file left behind


def test_full_disk_keeps_previous_checkpoint(tmp_path, monkeypatch):
    from napari_segdiff.io import atomic_write_bytes

    path = tmp_path / "last.pt"
    atomic_write_bytes(path, lambda f: f.write(b"good checkpoint"))

    def fail(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        atomic_write_bytes(path, fail)
    assert path.read_bytes() == b"good checkpoint"


# ------------------------------------------------------------------ interruptions
def test_ctrl_c_during_cli_segment_leaves_no_output(model_file, tmp_path, monkeypatch, capsys):
    inp, out = tmp_path / "img.png", tmp_path / "out.zarr"
    _write_png(inp, (rng.random((100, 100, 3)) * 255).astype(np.uint8))
    calls = {"n": 0}
    real = engine_mod.TileSampler.__call__

    def interrupted(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(engine_mod.TileSampler, "__call__", interrupted)
    code = cli_main(
        [
            "segment",
            str(inp),
            "-o",
            str(out),
            "--model",
            str(model_file),
            "--tile",
            "32",
            "--batch-size",
            "1",
            "--samples",
            "1",
            "--steps",
            "1",
            "-q",
        ]
    )
    assert code == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.png"]  # no final output, no temp store


def test_ctrl_c_during_training_saves_checkpoint_and_resumes(tmp_path):
    from napari_segdiff.training.datasets import Sample
    from napari_segdiff.training.trainer import TrainConfig, Trainer

    img = (rng.random((48, 48, 3)) * 255).astype(np.uint8)
    samples = [Sample(f"s{i}", img, img[..., 0] > 128) for i in range(3)]
    cfg = TrainConfig(
        preset="tiny",
        crop=32,
        batch_size=2,
        val="s2",
        max_steps=50,
        val_every=1000,
        val_tile=32,
        ckpt_every=1000,
        out=str(tmp_path / "run"),
        threads=1,
    )
    tr = Trainer(cfg, samples)

    def ctrl_c_at_step_3(t):
        if t.step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    tr.fit(progress=False, on_step=ctrl_c_at_step_3)
    assert tr.step == 3  # stopped cleanly at the interrupt, not at max_steps
    resumed = Trainer.resume(tmp_path / "run", samples, max_steps=5)
    assert resumed.step == 3
    resumed.fit(progress=False)
    assert resumed.step == 5


# ------------------------------------------------------------------ property test
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    h=st.integers(0, 70),
    w=st.integers(0, 70),
    layout=st.sampled_from(["hw", "hw1", "hw2", "hw3", "hw4", "chw3", "hw7"]),
    dtype=st.sampled_from(["uint8", "uint16", "int32", "float32", "float64", "bool"]),
    special=st.sampled_from([None, "nan", "inf", "const"]),
)
def test_property_random_shapes_and_dtypes(model, h, w, layout, dtype, special):
    shape = {
        "hw": (h, w),
        "hw1": (h, w, 1),
        "hw2": (h, w, 2),
        "hw3": (h, w, 3),
        "hw4": (h, w, 4),
        "chw3": (3, h, w),
        "hw7": (h, w, 7),
    }[layout]
    r = np.random.default_rng(h * 100 + w)
    img = (r.random(shape) * 1000).astype(dtype) if dtype != "bool" else r.random(shape) > 0.5
    if special and dtype.startswith("float") and img.size:
        img.flat[0] = {"nan": np.nan, "inf": np.inf, "const": img.flat[0]}[special]
    want = _documented_refusal(shape, dtype, special)
    try:
        res = ns.segment(img, model, samples=2, steps=1, tile=32, seed=0)
    except SegDiffError as e:
        assert want is not None, f"{shape} {dtype} {special}: refused but it is a valid image: {e}"
        assert re.search(want, str(e)), f"{shape} {dtype} {special}: refused for another reason: {e}"
        return
    assert want is None, f"{shape} {dtype} {special}: accepted, but the documentation says: refuse ({want})"
    channel_first = len(shape) == 3 and shape[-1] not in (1, 3, 4) and shape[0] in (1, 3, 4)
    _check_result(res, shape[1:3] if channel_first else shape[:2])


def _documented_refusal(shape, dtype, special) -> str | None:
    """What the README and docs/bad-input.md say segment() does with such an array: None (segment it) or
    the pattern of the refusal. 3-D arrays are channel-last unless the last axis cannot be a channel axis
    (1, 3, 4) and the first can; other channel counts are refused; so is an empty image and, for floats, NaN
    or infinity."""
    if len(shape) == 3:
        if shape[-1] not in (1, 3, 4) and shape[0] in (1, 3, 4):
            shape = (shape[1], shape[2], shape[0])
        if shape[-1] not in (1, 3, 4):
            return "channels|slices"
    if shape[0] < 1 or shape[1] < 1:
        return "empty"
    if special in ("nan", "inf") and dtype.startswith("float"):
        return "NaN or infinite"
    return None


def test_property_oracle_can_fail(model):
    """The oracle of the property test is not a rubber stamp: it calls a valid image valid and a refused one
    refused, so a wrongful refusal or a wrongful acceptance fails the property test."""
    assert _documented_refusal((5, 6, 3), "uint8", None) is None
    assert _documented_refusal((3, 5, 6), "uint8", None) is None  # channel-first colour
    assert _documented_refusal((5, 6, 2), "uint8", None) == "channels|slices"
    assert _documented_refusal((0, 6), "float32", None) == "empty"
    assert _documented_refusal((4, 4), "float32", "nan") == "NaN or infinite"
    assert _documented_refusal((4, 4), "uint8", "nan") is None


def test_cli_processes_a_stack_slice_by_slice(model_file, tmp_path):
    import tifffile

    stack = (rng.random((5, 40, 50)) * 255).astype(np.uint8)  # 5 slices (3 or 4 would read as channel-first colour)
    stack[1] = 0  # slices differ, so a result copied from one slice to all would show
    inp, out = tmp_path / "stack.tif", tmp_path / "stack_result.zarr"
    tifffile.imwrite(inp, stack)
    assert (
        cli_main(
            [
                "segment",
                str(inp),
                "-o",
                str(out),
                "--model",
                str(model_file),
                *FAST_CLI,
            ]
        )
        == 0
    )
    import zarr

    g = zarr.open_group(str(out), mode="r")
    prob = np.asarray(g["probability"])
    assert prob.shape == (5, 40, 50)
    one = ns.segment(stack[2], ns.load_model(model_file), samples=2, steps=2, tile=32, seed=0)
    np.testing.assert_allclose(prob[2], one.probability, atol=1e-5)
    assert np.abs(prob[1] - prob[2]).max() > 1e-4


def test_every_test_named_in_the_bad_input_doc_exists():
    """docs/bad-input.md lists each refusal with the test that shows it: those tests must exist."""
    root = Path(__file__).resolve().parents[1]
    named = set(re.findall(r"`(?:tests/\w+\.py::)?(test_\w+)`", (root / "docs" / "bad-input.md").read_text()))
    defined = set()
    for f in (root / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)", f.read_text(), flags=re.M))
    assert named and not named - defined, f"named in docs/bad-input.md but not defined: {sorted(named - defined)}"
