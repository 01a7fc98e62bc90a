"""The SegDiff network eps_theta(x_t, I, t) = D(E(F(x_t) + G(I), t), t) (section 4.3)."""

from __future__ import annotations

import os

import pytest
import torch

from napari_segdiff.config import PRESETS, get_preset
from napari_segdiff.network import Attention, ImageEncoder, SegDiffNet, count_parameters

PAPER_PRESETS = ("monuseg", "vaihingen", "cityscapes")
CPU_PRESETS = [n for n in PRESETS if n not in PAPER_PRESETS]


def _slow_enabled(request) -> bool:
    return bool(os.environ.get("SEGDIFF_SLOW")) or "slow" in (request.config.getoption("markexpr") or "").replace(
        "not slow", ""
    )


def _forward(net: SegDiffNet, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cfg = net.config
    img = torch.rand(1, cfg.in_channels, size, size, generator=g) * 2 - 1
    x = torch.randn(1, 1, size, size, generator=g)
    t = torch.tensor([cfg.diffusion_steps - 1])
    with torch.inference_mode():
        return net(x, t, image=img)


@pytest.mark.parametrize("name", CPU_PRESETS)
def test_cpu_presets_build_and_run_at_their_image_size(name):
    cfg = PRESETS[name]
    net = SegDiffNet(cfg).eval()
    out = _forward(net, cfg.image_size)
    assert out.shape == (1, 1, cfg.image_size, cfg.image_size)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_paper_presets_build_and_run_fully_convolutionally(name):
    """The ~130M-parameter presets build; one forward at the smallest input they accept (their
    downsampling factor) exercises every layer cheaply."""
    cfg = PRESETS[name]
    net = SegDiffNet(cfg).eval()
    assert 120e6 < count_parameters(net) < 140e6
    # the paper: attention after the residual blocks at 16x16 and 8x8, and in the bottleneck
    assert {cfg.image_size // 2**lvl for lvl in cfg.attention_levels} == {16, 8}
    n_attn = sum(isinstance(m, Attention) for m in net.modules())
    assert n_attn == 2 * (2 * cfg.num_res_blocks + 1) + 1
    size = cfg.downsample_factor
    out = _forward(net, size)
    assert out.shape == (1, 1, size, size) and torch.isfinite(out).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_paper_presets_run_at_their_image_size(name, request):
    """One forward at the training resolution: ~1 TFLOP each on CPU, so opt-in (-m slow or SEGDIFF_SLOW=1)."""
    if not _slow_enabled(request):
        pytest.skip("full-size forward of a paper preset: run with -m slow or SEGDIFF_SLOW=1")
    cfg = PRESETS[name]
    net = SegDiffNet(cfg).eval()
    out = _forward(net, cfg.image_size)
    assert out.shape == (1, 1, cfg.image_size, cfg.image_size) and torch.isfinite(out).all()


def test_monuseg_G_matches_the_public_reference_parameter_count():
    cfg = PRESETS["monuseg"]
    G = ImageEncoder(cfg.in_channels, cfg.base_channels, cfg.rrdb_width, cfg.rrdb_growth, cfg.rrdb_blocks)
    assert count_parameters(G) == 8_782_592


def _perturbed(net: SegDiffNet, seed: int = 0) -> SegDiffNet:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net


@pytest.mark.parametrize("name", ["tiny", "cpu-small"])
def test_precomputed_features_give_the_same_output(name):
    cfg = PRESETS[name]
    torch.manual_seed(0)
    net = _perturbed(SegDiffNet(cfg).eval())
    g = torch.Generator().manual_seed(1)
    s = cfg.image_size
    img = torch.rand(2, 3, s, s, generator=g) * 2 - 1
    x = torch.randn(2, 1, s, s, generator=g)
    t = torch.tensor([0, cfg.diffusion_steps - 1])
    with torch.inference_mode():
        a = net(x, t, image=img)
        b = net(x, t, features=net.encode_image(img))
    assert torch.equal(a, b)
    assert a.abs().max() > 0  # not trivially zero
    with pytest.raises(ValueError):
        net(x, t)


def test_output_depends_on_image_noise_and_timestep():
    torch.manual_seed(0)
    net = _perturbed(SegDiffNet(PRESETS["tiny"]).eval())
    g = torch.Generator().manual_seed(2)
    img = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    x = torch.randn(1, 1, 32, 32, generator=g)
    with torch.inference_mode():
        base = net(x, torch.tensor([3]), image=img)
        assert not torch.allclose(base, net(x, torch.tensor([15]), image=img))
        assert not torch.allclose(base, net(-x, torch.tensor([3]), image=img))
        assert not torch.allclose(base, net(x, torch.tensor([3]), image=-img))


def test_fresh_network_output_layer_is_zero():
    """The last conv is zero-initialised (as in the public code): an untrained net predicts 0."""
    net = SegDiffNet(PRESETS["tiny"]).eval()
    out = _forward(net, 32)
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("name", ["tiny", "cpu-small", "cpu-medium"])
def test_attention_sits_at_16_and_8_pixel_levels_of_the_training_size(name):
    """Attention follows residual blocks whose maps are 16x16 or 8x8 at image_size, plus the bottleneck."""
    cfg = PRESETS[name]
    net = SegDiffNet(cfg)
    sizes_by_level = {lvl: cfg.image_size // 2**lvl for lvl in cfg.attention_levels}
    assert set(sizes_by_level.values()) <= set(cfg.attention_resolutions)
    n_levels = len(cfg.channel_mult)
    # every level whose map is 16 or 8 at image_size has attention (and no other level does)
    expected = {lvl for lvl in range(n_levels) if cfg.image_size // 2**lvl in cfg.attention_resolutions}
    assert set(cfg.attention_levels) == expected
    n_attn = sum(isinstance(m, Attention) for m in net.modules())
    # per attention level: num_res_blocks in E, num_res_blocks + 1 in D; plus one in the bottleneck
    assert n_attn == len(expected) * (2 * cfg.num_res_blocks + 1) + 1


def test_attention_maps_seen_at_image_size():
    cfg = PRESETS["cpu-small"]  # 128 px, attention at 16 px (level 3) and in the bottleneck (16 px)
    net = SegDiffNet(cfg).eval()
    seen = []
    for m in net.modules():
        if isinstance(m, Attention):
            m.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape[-2:])))
    _forward(net, cfg.image_size)
    assert seen and set(seen) == {(16, 16)}


def test_network_is_fully_convolutional_for_larger_tiles():
    torch.manual_seed(0)
    net = _perturbed(SegDiffNet(PRESETS["tiny"]).eval())
    out = _forward(net, 64)
    assert out.shape == (1, 1, 64, 64)
    out = _forward(net, 34)  # any multiple of the downsampling factor (2)
    assert out.shape == (1, 1, 34, 34)


def test_sinusoidal_time_embedding_variant():
    cfg = get_preset("tiny", time_embedding="sinusoidal")
    net = SegDiffNet(cfg).eval()
    assert net.time_table is None and net.time_mlp is not None
    assert _forward(net, 32).shape == (1, 1, 32, 32)
    learned = SegDiffNet(PRESETS["tiny"])
    assert learned.time_table.num_embeddings == PRESETS["tiny"].diffusion_steps


def test_grey_input_channels():
    cfg = get_preset("tiny", in_channels=1)
    net = SegDiffNet(cfg).eval()
    assert _forward(net, 32).shape == (1, 1, 32, 32)


def _reference_attention(attn: Attention, x: torch.Tensor, window: int = 0) -> torch.Tensor:
    """Multi-head self-attention over the pixels written out with einsum and softmax (the oracle); with
    ``window``, a pixel attends only to the pixels of its own ``window`` x ``window`` block."""
    b, c, h, w = x.shape
    heads, d = attn.heads, c // attn.heads
    t = attn.norm(x).reshape(b, c, h * w)
    qkv = torch.einsum("oc,bcn->bon", attn.qkv.weight[:, :, 0], t) + attn.qkv.bias[None, :, None]
    q, k, v = qkv.reshape(b, 3, heads, d, h * w).unbind(1)  # channel order (3, heads, d)
    scores = torch.einsum("bhdn,bhdm->bhnm", q, k) / d**0.5
    if window:
        yy, xx = torch.meshgrid(torch.arange(h) // window, torch.arange(w) // window, indexing="ij")
        block = (yy * w + xx).reshape(-1)
        scores = scores.masked_fill(block[:, None] != block[None, :], float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhnm,bhdm->bhdn", weights, v).reshape(b, c, h * w)
    out = torch.einsum("oc,bcn->bon", attn.proj.weight[:, :, 0], out) + attn.proj.bias[None, :, None]
    return x + out.reshape(b, c, h, w)


@pytest.mark.parametrize("channels_last", [False, True])
def test_attention_matches_the_written_out_formula(channels_last):
    torch.manual_seed(0)
    attn = Attention(32, 4).eval()
    torch.nn.init.normal_(attn.proj.weight, std=0.2)  # the fresh output projection is zero
    x = torch.randn(2, 32, 6, 5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got, want = attn(x), _reference_attention(attn, x)
    assert (want - x).abs().max() > 0.05  # the attention branch really contributes
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_attention_takes_the_fused_cpu_kernel():
    """The fused kernel needs a unit stride in q/k/v's last dimension; a layout change that loses it sends
    attention back to the math fallback (bmm + softmax + NaN guards), which cost ~half the forward time."""
    attn = Attention(64, 4).eval()
    x = torch.randn(2, 64, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        attn(x)
    ops = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops, sorted(ops)
    assert "aten::_scaled_dot_product_attention_math" not in ops


@pytest.mark.parametrize("channels_last", [False, True])
def test_local_attention_attends_within_blocks(channels_last):
    """A window: each pixel attends to its own block only (the oracle masks the other blocks' scores); a grid
    no larger than the window, or not a multiple of it, is attended to whole."""
    torch.manual_seed(0)
    attn = Attention(32, 4, tokens=3).eval()
    torch.nn.init.normal_(attn.proj.weight, std=0.2)
    x = torch.randn(2, 32, 6, 9)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        whole = attn(x)
        attn.window = 3
        got = attn(x)
        want = _reference_attention(attn, x, window=3)
        assert (got - whole).abs().max() > 1e-3  # the blocks really change the result
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        for shape in ((2, 32, 3, 3), (2, 32, 6, 8)):  # one block; not a multiple of 3
            y = torch.randn(shape)
            torch.testing.assert_close(attn(y), _reference_attention(attn, y), atol=1e-5, rtol=1e-5)


def test_local_attention_windows_are_the_training_crop():
    """set_local_attention gives every attention the window of a training crop's grid: the network is unchanged
    at the crop size and differs on a tile of two crops a side."""
    cfg = PRESETS["cpu-small"]
    torch.manual_seed(0)
    net = _perturbed(SegDiffNet(cfg).eval())
    attns = [m for m in net.modules() if isinstance(m, Attention)]
    assert {m.tokens for m in attns} == {cfg.image_size // 8} and not net.local_attention
    plain = {s: _forward(net, s) for s in (cfg.image_size, 2 * cfg.image_size)}
    net.set_local_attention(True)
    assert net.local_attention and {m.window for m in attns} == {cfg.image_size // 8}
    assert torch.equal(_forward(net, cfg.image_size), plain[cfg.image_size])
    assert (_forward(net, 2 * cfg.image_size) - plain[2 * cfg.image_size]).abs().max() > 1e-4
    assert not net.set_local_attention(False).local_attention
