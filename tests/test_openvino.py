"""The OpenVINO runtime (the ``openvino`` extra) against the torch reference path on a tiny model, its on-disk
cache, and how ``runtime`` is resolved and refused."""

import copy
import os

import numpy as np
import pytest
import torch

import napari_segdiff as ns
from napari_segdiff import _openvino
from napari_segdiff._errors import SegDiffError
from napari_segdiff.engine import resolve_runtime

needs_openvino = pytest.mark.skipif(not _openvino.available(), reason="the openvino extra is not installed")
CPU = torch.device("cpu")


@pytest.fixture
def model(tiny_model):
    return tiny_model


def _image(seed=0, size=64):
    return np.random.default_rng(seed).random((size, size, 3)).astype(np.float32)


@needs_openvino
@pytest.mark.parametrize("tta", [False, True])
def test_openvino_fp32_equals_torch(model, tta):
    """Same noise, same network, another runtime: probability and variance equal to float rounding."""
    kw = dict(samples=3, steps=3, tile=32, seed=0, precision="fp32", tta=tta)
    a = ns.segment(_image(), model, runtime="torch", **kw)
    b = ns.segment(_image(), model, runtime="openvino", **kw)
    assert a.info["runtime"].startswith("torch") and b.info["runtime"].startswith("openvino")
    assert 0.02 < a.mask.mean() < 0.98  # both classes present, so the comparison means something
    assert a.variance.max() > 1e-4  # the samples differ: the noise went through both runtimes alike
    np.testing.assert_allclose(b.probability, a.probability, atol=2e-4)
    np.testing.assert_allclose(b.variance, a.variance, atol=2e-4)
    assert (a.mask == b.mask).mean() > 0.999


@needs_openvino
def test_local_attention_same_in_both_runtimes(model, tmp_path, monkeypatch):
    """meta['attention'] = 'window': tiles of two crops a side are attended to by blocks in both runtimes (and
    differ from global attention), a tile that is not a multiple of the crop whole in both; the caller's model
    keeps its global attention."""
    monkeypatch.setenv(_openvino.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(_openvino, "_COMPILED", type(_openvino._COMPILED)())
    local = copy.deepcopy(model)
    local.meta["attention"] = "window"
    kw = dict(samples=2, steps=2, seed=0, precision="fp32")
    img = _image(2, size=96)
    for tile, blocks in ((64, True), (48, False)):
        a = ns.segment(img, local, runtime="torch", tile=tile, **kw)
        b = ns.segment(img, local, runtime="openvino", tile=tile, **kw)
        np.testing.assert_allclose(b.probability, a.probability, atol=2e-4)
        g = ns.segment(img, model, runtime="torch", tile=tile, **kw)
        assert (np.abs(g.probability - a.probability).max() > 1e-3) == blocks
    assert not local.net.local_attention and not model.net.local_attention
    conversions = [p for p in _openvino.cache_dir().iterdir() if not p.name.startswith(".")]
    assert len(conversions) == 2  # local, and global for the 48 tile (keyed apart)


@needs_openvino
def test_openvino_bf16_close_to_torch(model):
    kw = dict(samples=3, steps=3, tile=32, seed=0)
    a = ns.segment(_image(1), model, runtime="torch", precision="fp32", **kw)
    b = ns.segment(_image(1), model, runtime="openvino", precision="bf16", **kw)
    assert b.info["precision"] == "bf16"
    assert (a.mask == b.mask).mean() > 0.95
    assert np.abs(a.probability - b.probability).mean() < 0.05


@needs_openvino
def test_conversion_cached_on_disk_and_keyed_by_weights(model, tmp_path, monkeypatch):
    monkeypatch.setenv(_openvino.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(_openvino, "_COMPILED", type(_openvino._COMPILED)())  # a fresh process, as far as it knows
    before = _openvino.conversions
    kw = dict(samples=2, steps=2, tile=32, seed=0, runtime="openvino", precision="fp32")
    first = ns.segment(_image(), model, **kw)
    assert _openvino.conversions == before + 1
    key = _openvino.ir_key(model.net)
    assert (tmp_path / "openvino" / key / "denoiser.xml").exists()
    assert not [p for p in (tmp_path / "openvino").iterdir() if p.name.startswith(".")]  # no temp folder left
    _openvino._COMPILED.clear()  # a later process: reads the IR, converts nothing
    again = ns.segment(_image(), model, **kw)
    assert _openvino.conversions == before + 1
    np.testing.assert_array_equal(first.probability, again.probability)
    # other weights, another key: a stale conversion is never used
    other = copy.deepcopy(model.net)
    assert _openvino.ir_key(other) == key
    with torch.no_grad():
        next(other.parameters()).add_(0.1)  # in place: the remembered key of this network must not be reused
    assert _openvino.ir_key(other) != key
    assert _openvino.ir_key(model.net, local=True) != key == _openvino.ir_key(model.net, local=False)
    with torch.no_grad():
        model.net.time_table.weight.mul_(1.0)  # same values, but a write: hashed again, same key
    assert _openvino.ir_key(model.net) == key


@needs_openvino
def test_cache_keeps_the_most_recent(model, tmp_path, monkeypatch):
    monkeypatch.setenv(_openvino.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(_openvino, "KEEP", 2)
    root = tmp_path / "openvino"
    root.mkdir(parents=True)
    for i, name in enumerate(("old1", "old2", "old3")):
        (root / name).mkdir()
        (root / name / "denoiser.xml").write_text("x")
        os.utime(root / name, (1000 + i, 1000 + i))
    _openvino._touch_and_prune(root / "old1")  # just used: kept, with the newest other one
    assert sorted(p.name for p in root.iterdir()) == ["old1", "old3"]


def test_resolve_runtime(monkeypatch):
    from napari_segdiff import engine

    monkeypatch.delenv("NAPARI_SEGDIFF_RUNTIME", raising=False)
    monkeypatch.setattr(_openvino, "available", lambda: True)
    for capability, expected in (("AVX512", "openvino"), ("AVX2", "torch"), ("DEFAULT", "torch")):
        monkeypatch.setattr(engine, "cpu_capability", lambda c=capability: c)
        assert resolve_runtime("auto", CPU) == expected, capability  # OpenVINO only where it measured faster
        assert resolve_runtime("openvino", CPU) == "openvino"  # asked for by name: taken on any CPU
    monkeypatch.setenv("NAPARI_SEGDIFF_RUNTIME", "openvino")
    assert resolve_runtime("auto", CPU) == "openvino"  # the environment overrides the CPU rule
    monkeypatch.undo()
    monkeypatch.delenv("NAPARI_SEGDIFF_RUNTIME", raising=False)
    assert resolve_runtime("torch", CPU) == "torch"
    assert resolve_runtime("auto", torch.device("cuda")) == "torch"  # OpenVINO is for the CPU only
    monkeypatch.setenv("NAPARI_SEGDIFF_RUNTIME", "torch")
    assert resolve_runtime("auto", CPU) == "torch"
    monkeypatch.setenv("NAPARI_SEGDIFF_RUNTIME", "tensorflow")
    with pytest.raises(SegDiffError, match="NAPARI_SEGDIFF_RUNTIME must be one of"):
        resolve_runtime("auto", CPU)
    with pytest.raises(SegDiffError, match="runtime must be one of auto, torch, openvino"):
        resolve_runtime("onnx", CPU)


def test_openvino_refused_off_cpu_and_when_missing(model, monkeypatch):
    with pytest.raises(SegDiffError, match="runs on the CPU"):
        resolve_runtime("openvino", torch.device("cuda"))
    monkeypatch.setattr(_openvino, "available", lambda: False)
    monkeypatch.delenv("NAPARI_SEGDIFF_RUNTIME", raising=False)
    assert resolve_runtime("auto", CPU) == "torch"  # auto falls back without a word
    with pytest.raises(SegDiffError, match=r"pip install 'napari-segdiff\[openvino\]'"):
        ns.segment(_image(), model, samples=1, steps=1, tile=32, runtime="openvino")


def test_info_names_the_runtime(model):
    r = ns.segment(_image(), model, samples=1, steps=1, tile=32, runtime="torch")
    assert r.info["runtime"] == f"torch {torch.__version__}"


@needs_openvino
def test_cli_runtime_flag(model, tmp_path, capsys):
    import tifffile

    from napari_segdiff.cli import main
    from napari_segdiff.io import read_result
    from napari_segdiff.models import save_model

    path = tmp_path / "tiny.pt"
    save_model(model, path, half=False, meta={"name": "tiny-cli"})
    img = (_image(2) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "in.tif", img)
    fast = ["--samples", "2", "--steps", "2", "--tile", "32", "--precision", "fp32", "-q", "--model", str(path)]
    out = tmp_path / "ov.tif"
    assert main(["segment", str(tmp_path / "in.tif"), "-o", str(out), "--runtime", "openvino", *fast]) == 0
    assert f"openvino {_openvino.version()} fp32" in capsys.readouterr().out  # the summary line names the runtime
    ref = ns.segment(img, str(path), samples=2, steps=2, tile=32, precision="fp32", runtime="torch")
    np.testing.assert_allclose(read_result(out)["probability"], ref.probability, atol=2e-4)
    with pytest.raises(SystemExit):  # argparse names the choices
        main(["segment", str(tmp_path / "in.tif"), "-o", str(tmp_path / "x.tif"), "--runtime", "onnx", *fast])
    assert "invalid choice: 'onnx'" in capsys.readouterr().err


@needs_openvino
def test_unwritable_cache_is_refused_with_the_fix(model, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(_openvino.CACHE_ENV, str(blocker))
    monkeypatch.setattr(_openvino, "_COMPILED", type(_openvino._COMPILED)())
    with pytest.raises(SegDiffError, match="NAPARI_SEGDIFF_CACHE to a writable folder, or use runtime 'torch'"):
        ns.segment(_image(), model, samples=1, steps=1, tile=32, runtime="openvino")
    assert blocker.read_text() == "not a folder"  # nothing lost
