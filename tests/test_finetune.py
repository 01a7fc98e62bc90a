"""napari-segdiff-train finetune with a tiny model: budgets, validation share, best-state keeping, the model
file's provenance, the user model directory, and the refusals that keep data safe."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers import disc_folder, disc_image, tiny_model
from PIL import Image

import napari_segdiff as ns
from napari_segdiff import SegDiffError
from napari_segdiff.models import list_models, load_model, save_model, sha256_of, user_models_dir
from napari_segdiff.training.cli import main
from napari_segdiff.training.finetune import DEFAULT_BLEND, choose_threshold, finetune, recommended_blend


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    d = tmp_path / "user-models"
    monkeypatch.setenv("NAPARI_SEGDIFF_MODELS", str(d))
    return d


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("ft")
    path = d / "base.pt"
    save_model(
        tiny_model(seed=0, perturb=0.3),
        path,
        half=False,
        meta={
            "name": "tiny-base",
            "pixel_size": 0.15,
            "pixel_unit": "m",
            "sampling": {"samples": 2, "steps": 2},
            "tiling": {"tile": 32},  # the tiny network's size (the threshold choice segments at the model's tile)
        },
    )
    return path


def _folder(root, n=8, size=48, instance_masks=False):
    return disc_folder(root, n, size, prefix="im", mask_value=7 if instance_masks else 255)


def test_finetune_writes_a_model_with_its_provenance_and_registers_it(base, tmp_path, user_dir):
    data = _folder(tmp_path / "data", n=8, instance_masks=True)
    out = tmp_path / "mine.pt"
    res = finetune(str(base), data, out, steps=3, name="mine", progress=False, threshold="auto")
    assert res.steps == 3 and res.val_images and len(res.train_images) == 6 and res.kept in ("best", "base")
    m = load_model(str(out))
    assert m.meta["base_model"] == {"name": "tiny-base", "sha256": sha256_of(base)}
    ft = m.meta["finetune"]
    assert ft["steps"] == 3 and sorted(ft["train_images"] + ft["val_images"]) == [f"im{i}" for i in range(8)]
    assert m.meta["pixel_size"] == 0.15 and m.meta["sampling"]["samples"] == 2 and m.meta["sampling"]["steps"] == 2
    chose = ft["threshold"]  # chosen on the held-back validation images, recorded with its scores
    assert chose["on"] == "validation" and chose["images"] == ft["val_images"] and chose["inherited"] == 0.5
    assert m.meta["sampling"]["threshold"] == chose["chosen"] == res.threshold
    assert chose["pooled_iou"][f"{res.threshold:g}"] == max(chose["pooled_iou"].values())
    # by name, everywhere: load_model, list_models, segment
    assert "mine" in list_models() and (user_dir / "mine.pt").is_file()
    assert load_model("mine").sha256 == sha256_of(user_dir / "mine.pt")
    img, _ = disc_image(32, seed=9)
    assert ns.segment(img, "mine", tile=32, device="cpu").probability.shape == (32, 32)


def test_base_state_is_kept_when_finetuning_does_not_beat_it(base, tmp_path, user_dir, monkeypatch):
    from napari_segdiff.training import trainer as trainer_mod

    data = _folder(tmp_path / "data", n=8)
    scores = iter([0.9, 0.1, 0.1, 0.1])  # the base model scores 0.9, every fine-tuned state 0.1
    monkeypatch.setattr(trainer_mod.Trainer, "validate", lambda self, net=None: {"iou": next(scores)})
    res = finetune(str(base), data, tmp_path / "o.pt", steps=2, progress=False)
    assert res.kept == "base" and res.base_score == 0.9
    base_w = load_model(str(base)).net.state_dict()
    new_w = load_model(str(tmp_path / "o.pt")).net.state_dict()
    # the base weights (to the float16 rounding the model file may use), not a fine-tuned state
    assert all(np.allclose(base_w[k].numpy(), new_w[k].numpy(), rtol=1e-3, atol=1e-4) for k in base_w)


def test_small_data_trains_on_everything(base, tmp_path, user_dir):
    data = _folder(tmp_path / "data", n=2)
    res = finetune(str(base), data, tmp_path / "o.pt", steps=2, progress=False)
    assert res.val_images == [] and res.kept == "last" and len(res.train_images) == 2


def test_min_val_images_decides_whether_a_validation_image_is_held_back(base, tmp_path, user_dir):
    data = _folder(tmp_path / "data", n=4)
    res = finetune(str(base), data, tmp_path / "o.pt", steps=2, progress=False, min_val_images=5)
    assert res.val_images == [] and res.kept == "last" and len(res.train_images) == 4
    res = finetune(str(base), data, tmp_path / "p.pt", steps=2, progress=False, min_val_images=4)
    assert len(res.val_images) == 1 and len(res.train_images) == 3


def test_cancel_keeps_the_best_so_far(base, tmp_path, user_dir):
    data = _folder(tmp_path / "data", n=8)
    res = finetune(str(base), data, tmp_path / "o.pt", steps=1000, progress=False, should_stop=lambda: True)
    assert res.cancelled and res.steps == 1 and (tmp_path / "o.pt").is_file()


def test_cli_synopsis_and_refusals(base, tmp_path, user_dir, capsys):
    data = _folder(tmp_path / "data", n=2)
    out = tmp_path / "cli.pt"
    assert (
        main(
            [
                "finetune",
                "--model",
                str(base),
                "--data",
                str(data),
                "--steps",
                "2",
                "-o",
                str(out),
                "--name",
                "cli-model",
                "-q",
            ]
        )
        == 0
    )
    assert "registered user model 'cli-model'" in capsys.readouterr().out
    before = out.read_bytes()
    reg_before = (user_dir / "models.json").read_text()
    cases = [
        (["--steps", "2", "-o", str(out)], "already exists"),  # existing output without --overwrite
        (["--steps", "2", "-o", str(tmp_path / "x.pt"), "--name", "cli-model"], "exists already"),  # name clash
        (["--steps", "2", "-o", str(tmp_path / "x.pt"), "--name", "nuclei-he"], "shipped model's name"),
        (["--steps", "0", "-o", str(tmp_path / "x.pt")], "steps must be an integer > 0"),
        (["--minutes", "-1", "-o", str(tmp_path / "x.pt")], "minutes must be > 0"),
    ]
    for extra, msg in cases:
        assert main(["finetune", "--model", str(base), "--data", str(data), *extra, "-q"]) == 2, extra
        assert msg in capsys.readouterr().err, msg
    assert out.read_bytes() == before and (user_dir / "models.json").read_text() == reg_before
    assert not (tmp_path / "x.pt").exists()


def test_bad_data_and_bad_base_refused(base, tmp_path, user_dir):
    data = _folder(tmp_path / "data", n=2)
    (data / "images" / "lonely.png").write_bytes((data / "images" / "im0.png").read_bytes())
    with pytest.raises(SegDiffError, match="have no mask"):
        finetune(str(base), data, tmp_path / "o.pt", steps=1, progress=False)
    (data / "images" / "lonely.png").unlink()
    Image.fromarray(np.zeros((30, 30), np.uint8)).save(data / "masks" / "im1.png")
    with pytest.raises(SegDiffError, match="is .* but its mask is"):
        finetune(str(base), data, tmp_path / "o.pt", steps=1, progress=False)
    empty = _folder(tmp_path / "empty", n=2)
    for p in (empty / "masks").iterdir():
        Image.fromarray(np.zeros((48, 48), np.uint8)).save(p)
    with pytest.raises(SegDiffError, match="every mask is empty"):
        finetune(str(base), empty, tmp_path / "o.pt", steps=1, progress=False)
    foreign = tmp_path / "foreign.pt"
    foreign.write_bytes(b"not a model")
    with pytest.raises(SegDiffError, match="not a valid napari-segdiff model"):
        finetune(str(foreign), empty, tmp_path / "o.pt", steps=1, progress=False)
    with pytest.raises(SegDiffError, match="either minutes or steps"):
        finetune(str(base), empty, tmp_path / "o.pt", progress=False)
    assert not (tmp_path / "o.pt").exists()


def test_corrupt_user_model_list_is_a_clear_error(user_dir):
    user_dir.mkdir(parents=True)
    (user_dir / "models.json").write_text("{not json")
    with pytest.raises(SegDiffError, match="user model list .* is unreadable"):
        list_models()
    assert user_models_dir() == user_dir


def test_recipe_overrides_reach_the_trainer_and_the_file_records_them(base, tmp_path, user_dir):
    data = _folder(tmp_path / "data", n=4)
    res = finetune(
        str(base), data, tmp_path / "o.pt", steps=3, progress=False, recipe={"freeze_encoder": True, "focus_steps": 2}
    )
    m, b = load_model(str(res.path)), load_model(str(base))
    rec = m.meta["finetune"]["recipe"]
    assert rec["freeze_encoder"] is True and rec["focus_steps"] == 2
    g = [k for k in b.net.state_dict() if k.startswith("G.")]
    ms, bs = m.net.state_dict(), b.net.state_dict()  # to the file's fp16 rounding
    assert g and all(torch.allclose(ms[k].float(), bs[k].float(), rtol=2e-3, atol=1e-6) for k in g)
    assert any(not torch.allclose(ms[k].float(), bs[k].float(), rtol=2e-3, atol=1e-6) for k in bs if k not in g)
    with pytest.raises(SegDiffError, match="unknown training config keys"):
        finetune(str(base), data, tmp_path / "p.pt", steps=1, progress=False, recipe={"freez_encoder": True})


def test_blend_states_mixes_floating_tensors_and_keeps_counters():
    from napari_segdiff.training.trainer import blend_states

    tuned = {"w": torch.tensor([1.0, 3.0], dtype=torch.float16), "n": torch.tensor(7)}
    base = {"w": torch.tensor([5.0, -1.0], dtype=torch.float16), "n": torch.tensor(2)}
    out = blend_states(tuned, base, 0.75)
    assert out["w"].dtype == torch.float16 and out["w"].tolist() == [2.0, 2.0]  # 0.75 * tuned + 0.25 * base
    assert out["n"].item() == 7  # an integer buffer is not averaged
    assert blend_states(tuned, base, 1.0)["w"].tolist() == [1.0, 3.0]


def test_blend_writes_the_weighted_mean_of_fine_tuned_and_base_weights(base, tmp_path, user_dir):
    data = _folder(tmp_path / "data", n=4)
    fast = {"lr": 1e-2, "warmup_steps": 1}  # weights that move measurably in 3 steps
    full = finetune(str(base), data, tmp_path / "full.pt", steps=3, progress=False, seed=3, recipe=fast, blend=1)
    half = finetune(str(base), data, tmp_path / "half.pt", steps=3, progress=False, seed=3, recipe=fast, blend=0.5)
    f, h, b = (load_model(str(p)).net.state_dict() for p in (full.path, half.path, base))
    assert load_model(str(half.path)).meta["finetune"]["blend"] == 0.5
    assert load_model(str(full.path)).meta["finetune"]["blend"] == 1.0
    default = finetune(str(base), data, tmp_path / "default.pt", steps=1, progress=False, seed=3)
    assert default.kept == "last" and load_model(str(default.path)).meta["finetune"]["blend"] == DEFAULT_BLEND
    moved = [k for k in b if b[k].is_floating_point() and not torch.allclose(f[k].float(), b[k].float(), atol=1e-3)]
    assert moved  # fine-tuning changed weights, so the blend is not trivially the base
    for k in b:
        if b[k].is_floating_point():  # to the files' fp16 rounding
            expected = 0.5 * f[k].float() + 0.5 * b[k].float()
            assert torch.allclose(h[k].float(), expected, rtol=4e-3, atol=1e-4), k
    for bad in (0, 1.5, -0.2, True, float("nan")):
        with pytest.raises(SegDiffError, match=r"blend is the share of the fine-tuned weights"):
            finetune(str(base), data, tmp_path / "bad.pt", steps=1, progress=False, blend=bad)
    assert not (tmp_path / "bad.pt").exists()


def test_a_base_model_recommends_its_blend_and_fine_tunes_carry_it(tmp_path, user_dir, capsys):
    """blend=None (the default) takes the base model's ``finetune_blend``; a given blend overrides it."""
    path = tmp_path / "rec.pt"
    meta = {"name": "tiny-rec", "sampling": {"samples": 2, "steps": 2}, "tiling": {"tile": 32}, "finetune_blend": 0.5}
    save_model(tiny_model(seed=0, perturb=0.3), path, half=False, meta=meta)
    data = _folder(tmp_path / "data", n=4)
    fast = {"lr": 1e-2, "warmup_steps": 1}
    rec = finetune(str(path), data, tmp_path / "rec-ft.pt", steps=3, progress=False, seed=3, recipe=fast)
    given = finetune(str(path), data, tmp_path / "given.pt", steps=3, progress=False, seed=3, recipe=fast, blend=1)
    r, g = load_model(str(rec.path)), load_model(str(given.path))
    assert rec.blend == 0.5 and r.meta["finetune"]["blend"] == 0.5 and r.meta["finetune_blend"] == 0.5
    assert given.blend == 1.0 and g.meta["finetune"]["blend"] == 1.0
    b = load_model(str(path)).net.state_dict()
    rs, gs = r.net.state_dict(), g.net.state_dict()
    moved = [k for k in b if b[k].is_floating_point() and not torch.allclose(gs[k].float(), b[k].float(), atol=1e-3)]
    assert moved
    for k in moved:  # the recommended run wrote half way between the same fine-tune and its base
        assert torch.allclose(rs[k].float(), 0.5 * gs[k].float() + 0.5 * b[k].float(), rtol=4e-3, atol=1e-4), k
    out = tmp_path / "cli.pt"
    assert main(["finetune", "--model", str(path), "--data", str(data), "--steps", "1", "-o", str(out)]) == 0
    assert "blend 0.5" in capsys.readouterr().out and load_model(str(out)).meta["finetune"]["blend"] == 0.5
    assert recommended_blend({}) == DEFAULT_BLEND and recommended_blend({"finetune_blend": 2}) == DEFAULT_BLEND
    assert recommended_blend(load_model("nuclei-he").meta) == 0.5  # the shipped nuclei model's (registry)
    assert recommended_blend(load_model("buildings-all").meta) == DEFAULT_BLEND


def test_choose_threshold_takes_the_best_pooled_iou_and_breaks_ties_towards_the_preferred(monkeypatch):
    from types import SimpleNamespace

    from napari_segdiff import engine
    from napari_segdiff.training.datasets import Sample

    yy, xx = np.mgrid[:40, :40]
    r = np.hypot(yy - 20, xx - 20)
    gt = r < 8
    # the object at 0.45, a ring around it at 0.25: any threshold in [0.25, 0.45) gives exactly the object
    prob = np.where(gt, 0.45, np.where(r < 12, 0.25, 0.02)).astype(np.float32)
    monkeypatch.setattr(engine, "segment", lambda image, model, seed=0: SimpleNamespace(probability=prob))
    s = [Sample("a", np.zeros((40, 40, 3), np.uint8), gt)]
    t, ious = choose_threshold(None, s, prefer=0.2)
    assert t == 0.3 and ious[0.3] == ious[0.4] == 1.0
    assert ious[0.2] == pytest.approx(gt.sum() / (r < 12).sum()) and ious[0.5] == 0.0
    assert choose_threshold(None, s, prefer=0.5)[0] == 0.4


def test_threshold_keep_given_or_refused(base, tmp_path, user_dir, capsys):
    data = _folder(tmp_path / "data", n=2)
    kept = finetune(str(base), data, tmp_path / "k.pt", steps=1, progress=False)  # the default: keep
    m = load_model(str(kept.path))
    assert m.meta["sampling"] == {"samples": 2, "steps": 2} and "threshold" not in m.meta["finetune"]
    given = finetune(str(base), data, tmp_path / "g.pt", steps=1, progress=False, threshold=0.35)
    assert load_model(str(given.path)).meta["sampling"]["threshold"] == 0.35 == given.threshold
    auto = finetune(str(base), data, tmp_path / "a.pt", steps=1, progress=False, threshold="auto")  # no val: kept
    assert load_model(str(auto.path)).meta["sampling"] == {"samples": 2, "steps": 2} and auto.threshold is None
    assert "kept the base model's 0.5 (choosing it needs held-back images: from 8 images on)" in auto.threshold_note
    for bad in (0, 1, 1.5, "high", True):
        with pytest.raises(SegDiffError, match="threshold: 'auto', 'keep' or a number in"):
            finetune(str(base), data, tmp_path / "bad.pt", steps=1, progress=False, threshold=bad)
    assert not (tmp_path / "bad.pt").exists()
    out = tmp_path / "cli.pt"
    args = ["finetune", "--model", str(base), "--data", str(data), "--steps", "1", "-q", "-o", str(out)]
    assert main([*args, "--threshold", "0.3"]) == 0
    assert "mask threshold 0.3 as given" in capsys.readouterr().out
    assert load_model(str(out)).meta["sampling"]["threshold"] == 0.3


def test_threshold_judges_are_central_crops_within_the_pixel_budget(monkeypatch):
    from napari_segdiff.training import finetune as ft
    from napari_segdiff.training.datasets import Sample

    monkeypatch.setattr(ft, "THRESHOLD_MAX_SIDE", 40)
    monkeypatch.setattr(ft, "THRESHOLD_MAX_PIXELS", 2000)
    img = np.arange(100 * 60 * 3, dtype=np.uint8).reshape(100, 60, 3)
    mask = np.zeros((100, 60), bool)
    mask[30:70, 10:50] = True
    js = ft._judges([Sample(f"s{i}", img, mask) for i in range(3)])
    assert [j.name for j in js] == ["s0", "s1"]  # 1600 px each: the second reaches the budget, the third waits
    assert js[0].mask.shape == (40, 40) and js[0].mask.all()  # rows 30-69, columns 10-49: the centre
    assert (js[0].image == img[30:70, 10:50]).all()


def test_export_blends_a_run_with_the_model_it_started_from(tmp_path, capsys):
    """`export --blend A --blend-base MODEL`: A x the run's EMA + (1 - A) x MODEL's weights, recorded in the file;
    the incomplete, out-of-range and mismatched cases are refused."""
    from _helpers import tiny_train_config

    from napari_segdiff.training.trainer import Trainer

    data = tmp_path / "data"
    disc_folder(data, n=2, size=48)
    runs = []
    for seed in (0, 1):
        run = tmp_path / f"run{seed}"
        Trainer(tiny_train_config(run, data=str(data), max_steps=2, seed=seed), samples=None).fit(progress=False)
        assert main(["export", str(run), "--name", f"r{seed}", "-o", str(tmp_path / f"r{seed}.pt")]) == 0
        runs.append(run)
    out = tmp_path / "blend.pt"
    assert (
        main(
            [
                "export",
                str(runs[0]),
                "--name",
                "b",
                "-o",
                str(out),
                "--blend",
                "0.25",
                "--blend-base",
                str(tmp_path / "r1.pt"),
            ]
        )
        == 0
    )
    tuned, base, blended = (load_model(str(p)) for p in (tmp_path / "r0.pt", tmp_path / "r1.pt", out))
    b_state, t_state = base.net.state_dict(), tuned.net.state_dict()
    diffs = 0
    for k, v in blended.net.state_dict().items():
        if v.is_floating_point():
            want = 0.25 * t_state[k].float() + 0.75 * b_state[k].float()
            assert torch.allclose(v.float(), want, atol=2e-3), k  # the files hold fp16 weights
            diffs += int(not torch.equal(t_state[k], b_state[k]))
    assert diffs > 0  # the two runs differ, so the blend is tested
    assert blended.meta["blend"] == {"share": 0.25, "base": "r1", "base_sha256": base.sha256}
    capsys.readouterr()
    bad = [["--blend", "0.5"], ["--blend-base", str(tmp_path / "r1.pt")], ["--blend", "1.5", "--blend-base", "r1"]]
    for extra in bad:
        assert main(["export", str(runs[0]), "--name", "x", "-o", str(tmp_path / "x.pt"), *extra]) == 2
        assert "--blend A --blend-base MODEL" in capsys.readouterr().err
    assert (
        main(
            [
                "export",
                str(runs[0]),
                "--name",
                "x",
                "-o",
                str(tmp_path / "x.pt"),
                "--blend",
                "0.5",
                "--blend-base",
                "nuclei-he",
            ]
        )
        == 2
    )
    assert "another network" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()
