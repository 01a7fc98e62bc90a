"""The trainer: it learns, it resumes exactly (also after SIGKILL), and it exports usable models."""

from __future__ import annotations

import csv
import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import disc_image, tiny_train_config
from skimage.io import imsave

from napari_segdiff import segment
from napari_segdiff._errors import SegDiffError
from napari_segdiff.models import load_model
from napari_segdiff.training.datasets import Sample
from napari_segdiff.training.trainer import TrainConfig, Trainer, export, pack_checkpoint


def _discs(n=3, size=48):
    return [Sample(f"img{i}", *disc_image(size, seed=i, n_discs=4, radius=(4, 9))) for i in range(n)]


def _cfg(out, **kw) -> TrainConfig:
    return tiny_train_config(out, **kw)


def _assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- (a) it learns
def test_tiny_model_learns_bright_discs(tmp_path):
    samples = _discs(3)
    tr = Trainer(_cfg(tmp_path / "run", max_steps=200, val="img2"), samples=samples)
    assert [s.name for s in tr.val_set] == ["img2"] and len(tr.train_set) == 2
    before = tr.validate()["dice"]
    t0 = time.perf_counter()
    res = tr.fit(progress=False)
    assert time.perf_counter() - t0 < 60
    after = tr.validate()["dice"]
    assert before < 0.5 < 0.85 < after, (before, after)
    assert res["step"] == 200 and res["best"] == pytest.approx(after)
    rows = list(csv.DictReader(Path(tmp_path / "run" / "log.csv").read_text().splitlines()))
    assert [int(r["step"]) for r in rows] == list(range(1, 201))
    first = np.mean([float(r["loss"]) for r in rows[:20]])
    last = np.mean([float(r["loss"]) for r in rows[-20:]])
    assert last < 0.5 * first
    assert float(rows[-1]["val_dice"]) == pytest.approx(after)
    assert (tmp_path / "run" / "best.pt").exists() and (tmp_path / "run" / "last.pt").exists()


# ---------------------------------------------------------------- (b) exact resume
def test_resume_gives_identical_weights(tmp_path):
    samples = _discs(2)
    N, k = 12, 5
    a = Trainer(_cfg(tmp_path / "a", max_steps=N, augment="monuseg"), samples=samples)
    a.fit(progress=False)

    b = Trainer(_cfg(tmp_path / "b", max_steps=k, augment="monuseg"), samples=samples)
    b.fit(progress=False)
    assert b.step == k
    del b
    torch.manual_seed(1234)  # disturb the global RNG: resume must restore it
    np.random.seed(99)
    c = Trainer.resume(tmp_path / "b", samples=samples, max_steps=N)
    assert c.step == k and c.cfg.max_steps == N
    c.fit(progress=False)
    assert c.step == N
    _assert_same_state(a.net.state_dict(), c.net.state_dict())
    _assert_same_state(a.ema.state_dict(), c.ema.state_dict())
    sa, sc = a.opt.state_dict()["state"], c.opt.state_dict()["state"]
    assert sa.keys() == sc.keys()
    for i in sa:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(sa[i][name]), torch.as_tensor(sc[i][name]))
    # and the checkpoint on disk is the same run
    la = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    lc = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert la["step"] == lc["step"] == N
    _assert_same_state(la["model"], lc["model"])
    rows = list(csv.DictReader(Path(tmp_path / "b" / "log.csv").read_text().splitlines()))
    assert [int(r["step"]) for r in rows] == list(range(1, N + 1))


def test_resume_without_checkpoint_is_refused(tmp_path):
    with pytest.raises(SegDiffError, match="checkpoint"):
        Trainer.resume(tmp_path, samples=_discs(2))


def _write_folder(root: Path, samples):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for s in samples:
        imsave(root / "images" / f"{s.name}.png", s.image, check_contrast=False)
        imsave(root / "masks" / f"{s.name}.png", s.mask.astype(np.uint8) * 255, check_contrast=False)


def test_sigkill_and_resume_matches_an_uninterrupted_run(tmp_path):
    samples = _discs(2)
    data = tmp_path / "data"
    _write_folder(data, samples)
    run = tmp_path / "killed"
    N = 40
    args = [
        "--data",
        str(data),
        "--preset",
        "tiny",
        "--crop",
        "32",
        "--batch-size",
        "4",
        "--lr",
        "0.002",
        "--warmup-steps",
        "10",
        "--augment",
        "monuseg",
        "--val",
        "",
        "--val-every",
        "10000",
        "--ckpt-every",
        "1",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--seed",
        "0",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "napari_segdiff.training.cli"]
    proc = subprocess.Popen(
        cmd + ["train", *args, "--max-steps", str(N), "--out", str(run)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not (run / "last.pt").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        time.sleep(0.2)  # a few more steps, killed at an arbitrary point
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    killed_at = torch.load(run / "last.pt", weights_only=True)["step"]
    assert 1 <= killed_at < N, killed_at
    r = subprocess.run(
        cmd + ["resume", str(run), "--max-steps", str(N), "--threads", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming {run} at step {killed_at}" in r.stdout
    resumed = torch.load(run / "last.pt", weights_only=True)
    assert resumed["step"] == N

    # the same run without interruption, in this process, with the same settings and data
    cfg = _cfg(tmp_path / "straight", max_steps=N, augment="monuseg", ckpt_every=N, data=str(data))
    straight = Trainer(cfg)
    straight.fit(progress=False)
    _assert_same_state(straight.net.state_dict(), resumed["model"])
    _assert_same_state(straight.ema.state_dict(), resumed["ema"])
    rows = list(csv.DictReader(Path(run / "log.csv").read_text().splitlines()))
    assert [int(r["step"]) for r in rows] == list(range(1, N + 1))


# ---------------------------------------------------------------- (c) export
def test_export_gives_a_model_that_segments(tmp_path):
    samples = _discs(3)
    tr = Trainer(_cfg(tmp_path / "run", max_steps=8, val="img2"), samples=samples)
    tr.fit(progress=False)
    out = tmp_path / "exported.pt"
    path, sha, half = export(
        tmp_path / "run", out, "discs", sampling={"samples": 2, "steps": 3}, extra_meta={"description": "test"}
    )
    assert path == out and out.exists()
    m = load_model(out)
    assert m.name == "discs" and m.sha256 == sha and m.meta["train_step"] == 8
    assert m.meta["description"] == "test" and m.meta["sampling"] == {"samples": 2, "steps": 3}
    assert m.config == tr.net_cfg
    # the file holds the EMA weights (rounded to fp16 when that is accurate enough)
    ema = torch.load(tmp_path / "run" / "best.pt", weights_only=True)["ema"]
    for k, v in m.net.state_dict().items():
        ref = ema[k].half().float() if half and ema[k].is_floating_point() else ema[k]
        assert torch.equal(v, ref), k
    # segment() uses the recommended sampling stored in the file
    r = segment(samples[2].image, str(out), tile=32, device="cpu")
    assert r.info["samples"] == 2 and r.info["steps"] == 3 and r.info["model"] == "discs"
    assert r.probability.shape == samples[2].mask.shape
    assert r.probability.min() >= 0 and r.probability.max() <= 1


# ---------------------------------------------------------------- config
def test_train_config_validation_and_round_trip(tmp_path):
    cfg = _cfg(tmp_path)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(SegDiffError, match="unknown"):
        TrainConfig.from_dict({"learning_rate": 1.0})
    for bad in (dict(amp="fp8"), dict(crop=0), dict(batch_size=0), dict(max_steps=0)):
        with pytest.raises(SegDiffError):
            TrainConfig(**bad)
    with pytest.raises(SegDiffError, match="multiple"):
        Trainer(_cfg(tmp_path, crop=33), samples=_discs(2))


def test_default_fraction_split(tmp_path):
    """TrainConfig's default val="0.2" holds out a fraction (it is not an image name)."""
    tr = Trainer(_cfg(tmp_path, val="0.2"), samples=_discs(5))
    assert len(tr.val_set) == 1 and len(tr.train_set) == 4


def test_cosine_lr_decay_schedule_and_resume_overrides(tmp_path):
    samples = _discs(2)
    tr = Trainer(
        _cfg(tmp_path / "a", max_steps=100, warmup_steps=10, lr=1e-3, lr_decay_start=50, lr_min=1e-5), samples=samples
    )
    assert tr.lr_at(0) == pytest.approx(1e-4)  # warm-up
    assert tr.lr_at(20) == tr.lr_at(50) == pytest.approx(1e-3)  # constant until the decay starts
    lrs = [tr.lr_at(s) for s in range(50, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:])) and lrs[0] > lrs[1]  # strictly decaying from the start
    assert tr.lr_at(75) == pytest.approx((1e-3 + 1e-5) / 2)  # cosine: half-way at the middle
    assert tr.lr_at(100) == pytest.approx(1e-5) and tr.lr_at(150) == pytest.approx(1e-5)
    assert Trainer(_cfg(tmp_path / "c", max_steps=100), samples=samples).lr_at(99) == pytest.approx(2e-3)
    for bad in (dict(lr_decay_start=100, max_steps=100), dict(lr_decay_start=-1), dict(lr_min=1.0, lr=1e-3)):
        with pytest.raises(SegDiffError, match="lr_"):
            _cfg(tmp_path, **bad)
    # a constant-rate run resumed with a decay tail and bf16 autocast: the overrides are honoured
    b = Trainer(_cfg(tmp_path / "b", max_steps=3), samples=samples)
    b.fit(progress=False)
    from napari_segdiff.training.cli import main as train_main

    r = Trainer.resume(tmp_path / "b", samples=samples, max_steps=8, lr_decay_start=4, lr_min=0.0, amp="bf16", lr=5e-4)
    assert (r.step, r.cfg.amp, r.cfg.lr_decay_start, r.cfg.lr) == (3, "bf16", 4, 5e-4)
    assert r.lr_at(4) == pytest.approx(5e-4 * min(1.0, 5 / r.cfg.warmup_steps))  # restart at the new peak
    r.fit(progress=False)
    assert r.step == 8 and r.opt.param_groups[0]["lr"] == pytest.approx(r.lr_at(7))
    assert np.isfinite(float((tmp_path / "b" / "log.csv").read_text().splitlines()[-1].split(",")[2]))
    with pytest.raises(SystemExit):  # the resume CLI knows the new flags and checks their types
        train_main(["resume", str(tmp_path / "b"), "--lr-min", "abc"])
    with pytest.raises(SystemExit):
        train_main(["resume", str(tmp_path / "b"), "--lr", "fast"])


def test_bf16_training_on_a_cpu_without_native_bf16_warns(tmp_path, monkeypatch):
    """Emulated bf16 measured x25 slower per step than float32 on an AVX2 CPU: say so, name the fix."""
    import warnings

    from napari_segdiff import engine

    monkeypatch.setattr(engine, "native_bf16", lambda device: False)
    with pytest.warns(RuntimeWarning, match="--amp none"):
        Trainer(_cfg(tmp_path / "a", amp="bf16"), samples=_discs(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trainer(_cfg(tmp_path / "b", amp="none"), samples=_discs(2))
        monkeypatch.setattr(engine, "native_bf16", lambda device: True)
        Trainer(_cfg(tmp_path / "c", amp="bf16"), samples=_discs(2))


def test_packed_checkpoint_is_smaller_and_resumes(tmp_path):
    import shutil

    from napari_segdiff.training.cli import main as train_main

    samples = _discs(2)
    a = Trainer(_cfg(tmp_path / "a", max_steps=6, preset="tiny"), samples=samples)
    a.fit(progress=False)
    # pack refuses to write into a run directory (beside a config.json), so pack first, then make it a run
    assert train_main(["pack", str(tmp_path / "a"), "-o", str(tmp_path / "packed.pt")]) == 0
    packed = tmp_path / "b" / "last.pt"
    packed.parent.mkdir()
    shutil.move(tmp_path / "packed.pt", packed)
    shutil.copy(tmp_path / "a" / "config.json", packed.parent / "config.json")
    full = (tmp_path / "a" / "last.pt").stat().st_size
    assert packed.stat().st_size < 0.8 * full
    st = torch.load(packed, weights_only=True)
    assert st["packed"] and next(iter(st["ema"].values())).dtype == torch.float16
    ref = Trainer.resume(tmp_path / "a", samples=samples)
    got = Trainer.resume(tmp_path / "b", samples=samples)
    assert got.step == ref.step == 6
    _assert_same_state(got.net.state_dict(), ref.net.state_dict())  # the model itself is kept exactly
    for (k, v), w in zip(got.ema.state_dict().items(), ref.ema.state_dict().values()):
        assert v.dtype == w.dtype and torch.allclose(v, w, rtol=1e-3, atol=1e-4), k
    sg, sr = got.opt.state_dict()["state"], ref.opt.state_dict()["state"]
    for i in sr:
        assert sg[i]["exp_avg"].dtype == torch.float32
        assert torch.allclose(sg[i]["exp_avg_sq"], sr[i]["exp_avg_sq"], rtol=1e-2, atol=1e-12)
    got.cfg = dataclasses.replace(got.cfg, max_steps=9)
    got.fit(progress=False)
    assert got.step == 9
    with pytest.raises(SegDiffError, match="itself"):
        pack_checkpoint(packed, packed)
    assert train_main(["pack", str(tmp_path / "a" / "config.json"), "-o", str(tmp_path / "x.pt")]) == 2
    assert not (tmp_path / "x.pt").exists()


def test_unknown_select_metric_is_refused():
    with pytest.raises(SegDiffError, match="select_metric must be one of .*got 'dcie'"):
        _cfg("unused", select_metric="dcie")


@pytest.mark.parametrize(
    "metric,values,best",
    [("dice", [0.5, 0.8, 0.6], 0.8), ("ece", [0.3, 0.1, 0.2], 0.1), ("calibration", [0.3, 0.1, 0.2], 0.1)],
)
def test_checkpoint_selection_follows_the_metric_direction(tmp_path, metric, values, best):
    t = Trainer(_cfg(tmp_path, select_metric=metric), samples=_discs(2))
    scores = {t.score({metric: v}, loss=1.0): v for v in values}
    assert scores[max(scores)] == best


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "none")])
def test_amp_auto_takes_bf16_only_where_the_cpu_has_it(tmp_path, monkeypatch, native, expected):
    import napari_segdiff.engine as engine

    monkeypatch.setattr(engine, "native_bf16", lambda device: native)
    tr = Trainer(_cfg(tmp_path / "run", max_steps=1, amp="auto", device="cpu"), samples=_discs(2))
    assert tr.amp == expected and tr.cfg.amp == "auto"  # the run keeps 'auto', resolved again on resume
    with pytest.raises(SegDiffError, match="none, bf16, fp16 or auto"):
        _cfg(tmp_path / "bad", amp="bfloat16")


def test_frozen_encoder_trains_everything_but_g(tmp_path):
    tr = Trainer(_cfg(tmp_path / "run", max_steps=3, val="none", freeze_encoder=True), samples=_discs(2))
    before = {k: v.clone() for k, v in tr.net.state_dict().items()}
    for _ in range(3):
        tr.train_step()
    after = tr.net.state_dict()
    g = [k for k in before if k.startswith("G.")]
    rest = [k for k in before if not k.startswith("G.") and before[k].is_floating_point()]
    assert g and rest
    assert all(torch.equal(before[k], after[k]) for k in g)
    assert sum(not torch.equal(before[k], after[k]) for k in rest) > 0.9 * len(rest)
    # and without the option G learns too
    tr = Trainer(_cfg(tmp_path / "run2", max_steps=3, val="none"), samples=_discs(2))
    before = {k: v.clone() for k, v in tr.net.state_dict().items()}
    for _ in range(3):  # the output layer starts at zero: the first step moves only it
        tr.train_step()
    assert any(not torch.equal(before[k], tr.net.state_dict()[k]) for k in g)


def test_focus_steps_puts_half_the_batch_at_the_samplers_timesteps(tmp_path):
    tr = Trainer(_cfg(tmp_path / "run", val="none", batch_size=8, focus_steps=2), samples=_discs(2))
    T = tr.diffusion.T
    focus = set(tr.diffusion.sampling_schedule(2).timesteps.tolist())
    assert focus == {0, T - 1}
    draws = torch.stack([tr.timesteps(8) for _ in range(200)])
    assert draws.min() >= 0 and draws.max() < T
    assert all(int(v) in focus for v in draws[:, :4].flatten())  # the focused half
    assert len(set(draws[:, 4:].flatten().tolist())) > 0.9 * T  # the uniform half covers the schedule
    tr.train_step()  # and a step runs with them
    assert Trainer(_cfg(tmp_path / "u", val="none"), samples=_discs(2)).timesteps(8) is None
    with pytest.raises(SegDiffError, match="focus_steps"):
        _cfg(tmp_path / "bad", focus_steps=-1)
    with pytest.raises(SegDiffError, match="focus_steps must be at most"):
        Trainer(_cfg(tmp_path / "bad", val="none", focus_steps=T + 1), samples=_discs(2))


def test_recipe_switches_take_true_or_false_and_nothing_else(capsys):
    from napari_segdiff.training.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["train", "--colour-norm", "false"]).colour_norm is False  # not the truthy string "false"
    assert parse(["train", "--freeze-encoder", "yes"]).freeze_encoder is True
    with pytest.raises(SystemExit):
        parse(["train", "--colour-norm", "maybe"])
    assert "expected true or false" in capsys.readouterr().err
    with pytest.raises(SegDiffError, match="colour_norm must be true or false"):
        TrainConfig(colour_norm="false")


def test_warm_start_may_change_the_input_scale_and_nothing_else(tmp_path):
    from _helpers import tiny_model

    from napari_segdiff.models import save_model

    base = tiny_model(seed=3)
    p = tmp_path / "base.pt"
    save_model(base.net, p, half=False, meta={"name": "base"})
    samples = _discs(2, size=64)
    tr = Trainer(_cfg(tmp_path / "run", init=str(p), net={"input_scale": 0.5}), samples=samples)
    assert tr.net_cfg.input_scale == 0.5 and base.config.input_scale == 1.0
    assert tr.net_cfg == dataclasses.replace(base.config, input_scale=0.5)
    # the weights are the warm start's; the data the network sees is resized by the new scale
    for k, v in base.net.state_dict().items():
        assert torch.equal(tr.net.state_dict()[k], v), k
    assert tr.train_set[0].image.shape[:2] == (32, 32)
    with pytest.raises(SegDiffError, match="base_channels"):
        Trainer(_cfg(tmp_path / "r2", init=str(p), net={"base_channels": 64}), samples=samples)
    for bad in ("half", True):
        with pytest.raises(SegDiffError, match="input_scale must be a number"):
            Trainer(_cfg(tmp_path / "r3", init=str(p), net={"input_scale": bad}), samples=samples)
    with pytest.raises(ValueError, match="input_scale must be in"):
        Trainer(_cfg(tmp_path / "r4", init=str(p), net={"input_scale": 9.0}), samples=samples)


def test_the_run_names_the_network_it_trains(tmp_path):
    from napari_segdiff.config import get_preset
    from napari_segdiff.training.cli import network_description

    def desc(**kw):
        cfg = TrainConfig(**kw)
        return network_description(cfg, cfg.network_config())

    assert desc(preset="tiny") == "tiny"
    assert desc(preset="cpu-small", net={"input_scale": 0.5}) == "cpu-small with input_scale=0.5"
    # a recipe that overrides every field of the default preset is named by the preset it matches
    medium = dataclasses.asdict(get_preset("cpu-medium", input_scale=0.5))
    assert desc(preset="cpu-small", net=medium) == "cpu-medium with input_scale=0.5"
    assert desc(preset="cpu-small", net={"base_channels": 40}).startswith("cpu-small with base_channels=40")
    from _helpers import tiny_model

    from napari_segdiff.models import save_model

    p = tmp_path / "base.pt"
    save_model(tiny_model(seed=3).net, p, half=False, meta={"name": "base"})
    assert desc(init=str(p), net={"input_scale": 0.5}) == f"the network of {p} (input scale 0.5)"
