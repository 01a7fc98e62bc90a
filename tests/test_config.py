"""Typed, validated configuration."""

from __future__ import annotations

import dataclasses
import warnings

import pytest

from napari_segdiff._errors import SegDiffError
from napari_segdiff.config import PRESETS, NetworkConfig, SamplingConfig, SegmentConfig, TilingConfig, get_preset


def test_presets_are_valid_and_round_trip_through_dicts():
    for name, cfg in PRESETS.items():
        d = cfg.to_dict()
        assert isinstance(d["channel_mult"], list) and isinstance(d["attention_resolutions"], list)
        assert NetworkConfig.from_dict(d) == cfg, name


def test_paper_presets_follow_section_5():
    for name in ("monuseg", "vaihingen"):
        cfg = PRESETS[name]
        assert cfg.image_size == 256 and cfg.base_channels == 128 and cfg.diffusion_steps == 100
        assert cfg.parameterization == "eps" and cfg.time_embedding == "learned"
    assert PRESETS["monuseg"].rrdb_blocks == 12 and PRESETS["vaihingen"].rrdb_blocks == 6
    assert PRESETS["cityscapes"].image_size == 128 and PRESETS["cityscapes"].rrdb_blocks == 15


def test_downsample_factor_and_attention_levels():
    cfg = NetworkConfig(image_size=64, base_channels=8, channel_mult=(1, 2, 2, 2), attention_resolutions=(16, 8))
    assert cfg.downsample_factor == 8
    assert cfg.attention_levels == (2, 3)  # 64 -> 32 -> 16 -> 8


@pytest.mark.parametrize(
    "kw",
    [
        dict(in_channels=0),
        dict(base_channels=12),
        dict(base_channels=0),
        dict(channel_mult=()),
        dict(num_res_blocks=0),
        dict(rrdb_blocks=-1),
        dict(diffusion_steps=1),
        dict(time_embedding="fourier"),
        dict(beta_schedule="cosine"),
        dict(parameterization="v"),
        dict(image_size=100),
        dict(input_scale=0.0),
        dict(input_scale=5.0),
        dict(dropout=1.0),
        dict(dropout=-0.1),
    ],
)
def test_bad_network_values_are_refused(kw):
    with pytest.raises(SegDiffError):
        NetworkConfig(**kw)


def test_network_from_dict_refuses_unknown_keys():
    d = PRESETS["tiny"].to_dict()
    d["base_chanels"] = 8
    with pytest.raises(SegDiffError, match="base_chanels"):
        NetworkConfig.from_dict(d)


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["tiny"].image_size = 64  # type: ignore[misc]


def test_get_preset_overrides_and_unknown_name():
    cfg = get_preset("tiny", base_channels=16)
    assert cfg.base_channels == 16 and PRESETS["tiny"].base_channels == 8
    assert get_preset("tiny") is PRESETS["tiny"]
    with pytest.raises(SegDiffError, match="tiny"):
        get_preset("huge")


@pytest.mark.parametrize(
    "kw",
    [
        dict(samples=0),
        dict(samples=2.5),
        dict(steps=0),
        dict(steps=1.5),
        dict(sampler="euler"),
        dict(eta=-0.1),
        dict(eta=1.5),
        dict(threshold=1.5),
        dict(threshold=-0.01),
    ],
)
def test_bad_sampling_values_are_refused(kw):
    with pytest.raises(SegDiffError):
        SamplingConfig(**kw)


def test_sampling_defaults():
    s = SamplingConfig()
    assert s.samples >= 1 and s.steps is not None and s.sampler == "ddpm" and s.seed == 0
    assert SamplingConfig(steps=None).steps is None


@pytest.mark.parametrize(
    "kw", [dict(tile=4), dict(tile=64.0), dict(overlap=1.0), dict(overlap=-0.1), dict(batch_size=0)]
)
def test_bad_tiling_values_are_refused(kw):
    with pytest.raises(SegDiffError):
        TilingConfig(**kw)


@pytest.mark.parametrize("tile,overlap,stride", [(256, 0.25, 192), (64, 0.0, 64), (32, 0.5, 16), (8, 0.99, 1)])
def test_tiling_stride(tile, overlap, stride):
    assert TilingConfig(tile=tile, overlap=overlap).stride == stride


def test_segment_config_device():
    for dev in ("auto", "cpu", "cuda", "cuda:1", "mps"):
        assert SegmentConfig(device=dev).device == dev
    with pytest.raises(SegDiffError):
        SegmentConfig(device="tpu")


def test_segment_config_precision():
    assert SegmentConfig().precision == "auto"
    assert SegmentConfig(precision="bf16").precision == "bf16"
    with pytest.raises(SegDiffError, match="auto, fp32, bf16"):
        SegmentConfig(precision="fp16")


def test_auto_precision_follows_native_bf16(monkeypatch):
    import torch

    from napari_segdiff import engine

    cpu = torch.device("cpu")
    monkeypatch.setattr(engine, "native_bf16", lambda device: True)
    assert engine.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(engine, "native_bf16", lambda device: False)
    assert engine.resolve_precision("auto", cpu) == "fp32"
    with pytest.warns(RuntimeWarning, match="emulates"):  # asked for: honoured, with a warning that it is slow
        assert engine.resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(engine, "native_bf16", lambda device: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # native: no warning
        assert engine.resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(SegDiffError, match="precision"):
        engine.resolve_precision("half", cpu)


# ---------------------------------------------------------------- the one parameter table
def test_every_segment_flag_comes_from_the_table():
    from napari_segdiff.cli import build_parser
    from napari_segdiff.config import params

    seg = next(a for a in build_parser()._actions if getattr(a, "choices", None) and "segment" in a.choices)
    flags = {a.dest: a for a in seg.choices["segment"]._actions}
    for cls in (SamplingConfig, TilingConfig, SegmentConfig):
        for name, (default, p) in params(cls).items():
            a = flags[name]
            assert a.default is None and p.help.split(":")[0].split(" (")[0] in (a.help or "")
            if p.choices:
                assert tuple(a.choices) == p.choices
            elif not isinstance(default, bool):
                assert a.type is (str if isinstance(default, str) else int if isinstance(default, int) else float)


def test_table_bounds_are_what_validation_enforces():
    from napari_segdiff.config import check_value, params

    for cls in (SamplingConfig, TilingConfig):
        for name, (default, p) in params(cls).items():
            if p.min is not None:
                check_value(name, p.min, default, p)  # the bound itself is allowed
                with pytest.raises(SegDiffError, match=name):
                    check_value(name, p.min - (p.step or 1), default, p)
            if p.max is not None:
                with pytest.raises(SegDiffError, match=name):
                    check_value(name, p.max + (p.step or 1), default, p)
                if p.max_open:
                    with pytest.raises(SegDiffError, match=name):
                        check_value(name, p.max, default, p)


def test_one_device_check_for_config_and_engine():
    from napari_segdiff.engine import resolve_device

    for bad in ("cuda:x", "cuda:", "gpu", 0):
        with pytest.raises(SegDiffError, match="cuda:N"):
            SegmentConfig(device=bad)
        with pytest.raises(SegDiffError, match="cuda:N"):
            resolve_device(bad)


def test_default_sentinel_survives_pickling():
    import pickle

    from napari_segdiff.config import DEFAULT

    assert pickle.loads(pickle.dumps(DEFAULT)) is DEFAULT and repr(DEFAULT) == "DEFAULT"


def test_widget_options_follow_the_table():
    from napari_segdiff.config import widget_options

    o = widget_options(TilingConfig, "overlap")
    assert (o["label"], o["min"], o["step"]) == ("tile overlap", 0.0, 0.05) and o["max"] == pytest.approx(0.95)
    assert widget_options(SamplingConfig, "samples")["max"] == 1024
    assert widget_options(SegmentConfig, "precision")["choices"] == ["auto", "fp32", "bf16"]
    assert widget_options(TilingConfig, "tile", max=512)["max"] == 512
