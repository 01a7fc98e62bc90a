"""Model files: atomic save, safe load (weights_only), checksums and clear errors."""

from __future__ import annotations

import hashlib
import os
import pickle

import pytest
import torch
from _helpers import tiny_model

from napari_segdiff import models
from napari_segdiff._errors import ModelFileError, SegDiffError
from napari_segdiff.config import get_preset
from napari_segdiff.models import (
    FORMAT,
    SegDiffModel,
    atomic_write_bytes,
    load_model,
    load_model_file,
    save_model,
    sha256_of,
)


def _probe(model: SegDiffModel) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    x = torch.randn(2, 1, 32, 32, generator=g)
    with torch.inference_mode():
        return model.net(x, torch.tensor([0, 19]), image=img)


def test_fp32_round_trip_is_exact(tmp_path):
    m = tiny_model(seed=1)
    path = tmp_path / "m.pt"
    sha = save_model(m, path, half=False, meta={"name": "round-trip", "sampling": {"samples": 2}})
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest() == sha256_of(path)
    loaded = load_model(path)
    assert loaded.sha256 == sha and loaded.name == "round-trip" and loaded.meta["sampling"] == {"samples": 2}
    assert loaded.config == m.config
    a, b = m.net.state_dict(), loaded.net.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert torch.equal(_probe(m), _probe(loaded))
    assert not loaded.net.training
    assert m.config.diffusion_steps == loaded.diffusion.T


def test_fp16_round_trip(tmp_path):
    m = tiny_model(seed=2)
    p16, p32 = tmp_path / "h.pt", tmp_path / "f.pt"
    save_model(m, p16)  # fp16 by default
    save_model(m, p32, half=False)
    assert p16.stat().st_size < 0.7 * p32.stat().st_size
    raw = torch.load(p16, weights_only=True)
    assert all(v.dtype == torch.float16 for v in raw["state_dict"].values() if v.is_floating_point())
    loaded = load_model(p16)
    for k, v in m.net.state_dict().items():
        w = loaded.net.state_dict()[k]
        assert w.dtype == torch.float32  # back in fp32 for computing
        assert torch.equal(w, v.half().float()), k  # exactly the fp16-rounded weights
    torch.testing.assert_close(_probe(loaded), _probe(m), atol=2e-2, rtol=2e-2)
    assert loaded.name == "h"  # no name in meta: the file stem


def test_save_accepts_a_bare_network(tmp_path):
    m = tiny_model()
    save_model(m.net, tmp_path / "n.pt", half=False)
    assert torch.equal(_probe(load_model(tmp_path / "n.pt")), _probe(m))


def test_checksum_mismatch_is_refused(tmp_path):
    path = tmp_path / "m.pt"
    sha = save_model(tiny_model(), path)
    assert load_model_file(path, expected_sha256=sha).sha256 == sha
    with pytest.raises(ModelFileError, match="sha256"):
        load_model_file(path, expected_sha256="0" * 64)


def test_registry_entry_is_checksum_verified(tmp_path, monkeypatch):
    path = tmp_path / "reg.pt"
    sha = save_model(tiny_model(), path)
    monkeypatch.setattr(models, "WEIGHTS_DIR", tmp_path)
    monkeypatch.setattr(
        models,
        "_registry",
        lambda: {
            "good": {"file": "reg.pt", "sha256": sha, "description": "d"},
            "bad": {"file": "reg.pt", "sha256": "f" * 64},
        },
    )
    assert load_model("good").name == "good"
    assert models.list_models()["good"] == "d"
    with pytest.raises(ModelFileError, match="sha256"):
        load_model("bad")


def test_a_copy_of_a_shipped_file_gets_its_registry_facts(tmp_path, monkeypatch):
    """Loaded by path, a file whose sha256 is a registry entry's gets that entry's measured facts (pixel size,
    sampling, instance split), so it segments as it does by name; another file keeps its own metadata."""
    shipped = tmp_path / "shipped.pt"
    sha = save_model(tiny_model(), shipped, meta={"sampling": {"steps": 2}})
    other = tmp_path / "other.pt"
    save_model(tiny_model(), other, meta={"sampling": {"steps": 2}}, half=False)
    facts = {"pixel_size": 0.5, "pixel_unit": "m", "sampling": {"samples": 3, "steps": 1}}
    monkeypatch.setattr(models, "WEIGHTS_DIR", tmp_path)
    monkeypatch.setattr(models, "_registry", lambda: {"m": {"file": "shipped.pt", "sha256": sha, "meta": facts}})
    copy = tmp_path / "elsewhere" / "copy.pt"
    copy.parent.mkdir()
    copy.write_bytes(shipped.read_bytes())
    by_path = load_model(str(copy))
    assert {k: by_path.meta[k] for k in facts} == facts == {k: load_model("m").meta[k] for k in facts}
    assert load_model(str(other)).meta["sampling"] == {"steps": 2} and "pixel_size" not in load_model(str(other)).meta


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-segdiff-test",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": FORMAT, "payload": _Evil()}, f)
    path2 = tmp_path / "evil2.pt"
    torch.save({"format": FORMAT, "version": 1, "payload": _Evil()}, path2)
    for p in (path, path2):
        with pytest.raises(ModelFileError):
            load_model(p)
    assert not (tmp_path / "pwned-by-segdiff-test").exists()


@pytest.mark.parametrize("keep", [0, 10, 0.5, 0.99])
def test_truncated_file_is_refused(tmp_path, keep):
    path = tmp_path / "m.pt"
    save_model(tiny_model(), path)
    data = path.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    path.write_bytes(data[:n])
    with pytest.raises(ModelFileError):
        load_model(path)


def test_another_architectures_state_dict_is_a_clear_error(tmp_path):
    m = tiny_model()
    other = SegDiffModel.from_config(get_preset("tiny", base_channels=16))
    path = tmp_path / "mixed.pt"
    # a file claiming the tiny architecture but holding another's weights (same keys, other shapes)
    torch.save(
        {
            "format": FORMAT,
            "version": 1,
            "config": m.config.to_dict(),
            "state_dict": other.net.state_dict(),
            "meta": {},
        },
        path,
    )
    with pytest.raises(ModelFileError, match="architecture"):
        load_model(path)
    # and one holding weights of a deeper network (unexpected keys)
    deeper = SegDiffModel.from_config(get_preset("tiny", channel_mult=(1, 2, 2)))
    torch.save(
        {
            "format": FORMAT,
            "version": 1,
            "config": m.config.to_dict(),
            "state_dict": deeper.net.state_dict(),
            "meta": {},
        },
        path,
    )
    with pytest.raises(ModelFileError, match="architecture"):
        load_model(path)


def test_foreign_files_are_refused(tmp_path):
    m = tiny_model()
    p = tmp_path / "sd.pt"
    torch.save(m.net.state_dict(), p)  # a bare state dict: no header
    with pytest.raises(ModelFileError, match="not a napari-segdiff model"):
        load_model(p)
    p = tmp_path / "ckpt.pt"
    torch.save({"model": m.net.state_dict(), "step": 3}, p)  # a training checkpoint
    with pytest.raises(ModelFileError, match="checkpoint"):
        load_model(p)
    p = tmp_path / "badcfg.pt"
    torch.save({"format": FORMAT, "version": 1, "config": {"base_channels": 7}, "state_dict": {}, "meta": {}}, p)
    with pytest.raises(ModelFileError, match="config"):
        load_model(p)
    p = tmp_path / "text.pt"
    p.write_text("hello")
    with pytest.raises(ModelFileError):
        load_model(p)


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model(tmp_path / "nope.pt")
    with pytest.raises(ModelFileError, match="unknown model"):
        load_model("no-such-model-name")
    assert issubclass(ModelFileError, SegDiffError)


def test_model_objects_pass_through():
    m = tiny_model()
    assert load_model(m) is m


def test_shared_model_loads_once_and_reloads_a_replaced_file(tmp_path, monkeypatch):
    """segment() by name reads, checks and builds the model once; a file written again (a user model registered
    anew), another registry entry or another checksum loads afresh; load_model stays a private copy."""
    path = tmp_path / "reg.pt"
    sha = save_model(tiny_model(seed=1), path)
    reg = {"m": {"file": "reg.pt", "sha256": sha, "meta": {"pixel_size": 0.5}}}
    monkeypatch.setattr(models, "WEIGHTS_DIR", tmp_path)
    monkeypatch.setattr(models, "_registry", lambda: reg)
    monkeypatch.setattr(models, "_SHARED", models.OrderedDict())
    reads = []
    real = models.load_model_file
    monkeypatch.setattr(models, "load_model_file", lambda *a, **k: reads.append(a[0]) or real(*a, **k))

    first = models.shared_model("m")
    assert models.shared_model("m") is first and len(reads) == 1
    assert first.meta["pixel_size"] == 0.5
    assert load_model("m") is not first and len(reads) == 2  # a private copy, read again
    by_path = models.shared_model(str(path))
    assert by_path is not first and models.shared_model(str(path)) is by_path and len(reads) == 3

    # the registry's facts changed: loaded afresh, with the new facts
    reg["m"]["meta"] = {"pixel_size": 0.25}
    assert models.shared_model("m").meta["pixel_size"] == 0.25 and len(reads) == 4

    # the file replaced by other weights (another size or time): loaded afresh, the new weights checked
    sha2 = save_model(tiny_model(seed=2), path, half=False)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    with pytest.raises(ModelFileError, match="sha256"):
        models.shared_model("m")
    reg["m"]["sha256"] = sha2
    fresh = models.shared_model("m")
    assert not torch.equal(_probe(fresh), _probe(first))
    assert torch.equal(_probe(fresh), _probe(load_model(str(path))))
    assert len(models._SHARED) <= models.SHARED_MODELS
    m = tiny_model()
    assert models.shared_model(m) is m


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")

    def failing(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write_bytes(path, failing)
    assert path.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["f.bin"]  # no temp file left behind
    atomic_write_bytes(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new"
