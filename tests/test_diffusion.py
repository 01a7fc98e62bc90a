"""Noise schedule, forward process, posterior, training loss and samplers (SegDiff section 3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_segdiff._errors import SegDiffError
from napari_segdiff.config import get_preset
from napari_segdiff.diffusion import Diffusion, Schedule, linear_betas
from napari_segdiff.network import SegDiffNet


# ------------------------------------------------------------------ Eq. 14 and the two beta scales
def _eq14(T: int, t: int, lo: float = 1e-4, hi: float = 2e-2) -> float:
    return (lo * (T - t) + hi * (t - 1)) / (T - 1)


@pytest.mark.parametrize("T", [2, 20, 100, 1000])
def test_linear_paper_is_eq14_literally(T):
    betas = linear_betas(T, "linear-paper")
    assert betas.shape == (T,)
    for t in (1, 2, T // 2, T):  # paper's 1-based t
        assert betas[t - 1] == pytest.approx(_eq14(T, t), rel=1e-12)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(2e-2)
    assert np.all(np.diff(betas) > 0)


@pytest.mark.parametrize("T", [20, 100, 1000])
def test_linear_scaled_multiplies_both_ends_by_1000_over_T(T):
    betas = linear_betas(T, "linear-scaled")
    k = 1000.0 / T
    expected = np.minimum(np.linspace(1e-4 * k, 2e-2 * k, T), 0.999)  # beta < 1 (T = 20: 5e-3 .. 1 -> 0.999)
    np.testing.assert_allclose(betas, expected, rtol=1e-12)
    if T == 1000:  # the two conventions agree at T = 1000
        np.testing.assert_allclose(betas, linear_betas(T, "linear-paper"), rtol=1e-12)


def test_unknown_schedule_is_refused():
    with pytest.raises(SegDiffError, match="linear-scaled"):
        linear_betas(100, "cosine")


def test_alpha_bar_T_for_T100():
    # independent: alpha_bar_T = prod_t (1 - beta_t) with beta_t from Eq. 14 evaluated by hand
    T = 100
    paper = np.prod([1.0 - _eq14(T, t) for t in range(1, T + 1)])
    # the scaled schedule multiplies both ends by 1000 / T = 10: 1e-3 .. 2e-1
    scaled = np.prod([1.0 - _eq14(T, t, 1e-3, 2e-1) for t in range(1, T + 1)])
    assert 0.36 < paper < 0.38  # Eq. 14 literally: x_T keeps most of x_0
    # ~2e-5 (exp(-sum beta) ~ 4e-5 to first order; the second-order term halves it): x_T ~ N(0, I)
    assert 1e-5 < scaled < 5e-5
    assert scaled == pytest.approx(2.04e-5, rel=0.01)
    assert float(Schedule.linear(T, "linear-paper").alpha_bar[-1]) == pytest.approx(paper, rel=1e-10)
    assert float(Schedule.linear(T, "linear-scaled").alpha_bar[-1]) == pytest.approx(scaled, rel=1e-10)
    # Diffusion picks the schedule by name
    assert float(Diffusion(T, "linear-scaled").schedule.alpha_bar[-1]) == pytest.approx(scaled, rel=1e-10)


def test_schedule_tables_match_eq3_and_eq10():
    betas = np.linspace(0.01, 0.3, 7)
    s = Schedule(betas)
    alphas = 1 - betas
    abar = np.array([np.prod(alphas[: i + 1]) for i in range(7)])
    np.testing.assert_allclose(s.alphas.numpy(), alphas, rtol=1e-12)
    np.testing.assert_allclose(s.alpha_bar.numpy(), abar, rtol=1e-12)
    for i in range(7):
        abar_prev = 1.0 if i == 0 else abar[i - 1]
        assert float(s.posterior_variance[i]) == pytest.approx((1 - abar_prev) / (1 - abar[i]) * betas[i], rel=1e-12)
    assert float(s.posterior_variance[0]) == 0.0  # no noise is added at the last step (t = 1)


# ------------------------------------------------------------------ forward process
@pytest.mark.parametrize("i", [0, 10, 99])
def test_q_sample_statistics(i):
    s = Schedule.linear(100)
    ab = float(s.alpha_bar[i])
    g = torch.Generator().manual_seed(i)
    n = 400_000
    x0 = torch.full((n, 1, 1, 1), 0.7, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    xt = s.q_sample(x0, torch.full((n,), i), noise)
    # Eq. 4: mean sqrt(abar) x0, variance 1 - abar; standard errors ~ 1.6e-3 (mean), 2.2e-3 (var)
    assert float(xt.mean()) == pytest.approx(np.sqrt(ab) * 0.7, abs=6e-3)
    assert float(xt.var()) == pytest.approx(1 - ab, abs=max(1e-2 * (1 - ab), 1e-6))


def test_q_sample_uses_each_items_own_timestep():
    s = Schedule.linear(100)
    x0 = torch.ones(3, 1, 2, 2)
    noise = torch.zeros_like(x0)
    xt = s.q_sample(x0, torch.tensor([0, 50, 99]), noise)
    for b, i in enumerate((0, 50, 99)):
        assert torch.allclose(xt[b], torch.full((1, 2, 2), float(s.alpha_bar[i].sqrt())))


# ------------------------------------------------------------------ posterior, Eq. 8-10
def test_posterior_mean_and_variance_by_hand():
    s = Schedule.linear(100)
    for i in (1, 17, 60, 99):
        t = i + 1
        beta = _eq14(100, t, 1e-3, 2e-1)
        abar = np.prod([1 - _eq14(100, k, 1e-3, 2e-1) for k in range(1, t + 1)])
        abar_prev = np.prod([1 - _eq14(100, k, 1e-3, 2e-1) for k in range(1, t)])
        x0, xt = 0.4, -1.3
        mu_eq9 = np.sqrt(abar_prev) * beta / (1 - abar) * x0 + np.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar) * xt
        var_eq10 = (1 - abar_prev) / (1 - abar) * beta
        # the same posterior from Bayes' rule directly: q(x_t | x_{t-1}) q(x_{t-1} | x_0), both Gaussian
        prec = (1 - beta) / beta + 1 / (1 - abar_prev)
        mu_bayes = (np.sqrt(1 - beta) * xt / beta + np.sqrt(abar_prev) * x0 / (1 - abar_prev)) / prec
        assert mu_bayes == pytest.approx(mu_eq9, rel=1e-9) and 1 / prec == pytest.approx(var_eq10, rel=1e-9)
        mean, var = s.posterior(
            torch.full((1, 1, 1, 1), x0, dtype=torch.float64),
            torch.full((1, 1, 1, 1), xt, dtype=torch.float64),
            torch.tensor([i]),
        )
        assert float(mean) == pytest.approx(mu_eq9, rel=1e-9)
        assert float(var) == pytest.approx(var_eq10, rel=1e-9)


def test_eps_parameterisation_gives_eq11_mean():
    """Posterior mean at x0 = x0_from_eps(eps) is Eq. 11: (x_t - beta / sqrt(1 - abar) eps) / sqrt(alpha)."""
    s = Schedule.linear(100)
    g = torch.Generator().manual_seed(0)
    for i in (3, 40, 90):
        xt = torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64)
        eps = torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64)
        idx = torch.full((4,), i)
        x0 = s.x0_from_eps(xt, idx, eps)
        mean, _ = s.posterior(x0, xt, idx)
        beta, abar = float(s.betas[i]), float(s.alpha_bar[i])
        eq11 = (xt - beta / np.sqrt(1 - abar) * eps) / np.sqrt(1 - beta)
        torch.testing.assert_close(mean, eq11, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(s.eps_from_x0(xt, idx, x0), eps, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------ respacing
def test_respaced_schedule_keeps_alpha_bar_at_kept_steps():
    s = Schedule.linear(100)
    r = s.respaced(10)
    assert r.num_steps == 10
    assert r.timesteps[0] == 0 and r.timesteps[-1] == 99 and np.all(np.diff(r.timesteps) > 0)
    np.testing.assert_allclose(r.alpha_bar.numpy(), s.alpha_bar.numpy()[r.timesteps], rtol=1e-12)
    assert s.respaced(100) is s or np.array_equal(s.respaced(100).alpha_bar.numpy(), s.alpha_bar.numpy())
    with pytest.raises(SegDiffError):
        s.respaced(0)
    with pytest.raises(SegDiffError):
        s.respaced(101)


def test_a_single_step_starts_from_the_last_timestep():
    """steps=1 predicts x_0 from x_T in one step: the model is asked at t = T (pure noise), and for
    Gaussian data the result is E[x_0 | x_T] ~ mu, not a copy of the noise."""
    d = Diffusion(100, "linear-scaled", "eps")
    r = d.schedule.respaced(1)
    assert r.num_steps == 1 and list(r.timesteps) == [99]
    assert float(r.alpha_bar[0]) == pytest.approx(float(d.schedule.alpha_bar[-1]))
    mu, s = 0.3, 0.2
    out = d.sample(
        _gaussian_eps_model(d, mu, s),
        (4, 1, 32, 32),
        steps=1,
        generator=torch.Generator().manual_seed(0),
        dtype=torch.float64,
    )
    assert float(out.mean()) == pytest.approx(mu, abs=0.01) and float(out.std()) < 0.05


def test_sampler_calls_the_model_with_original_timesteps():
    d = Diffusion(100, parameterization="x0")
    seen = []

    def model(x, t):
        seen.append(t.tolist())
        return torch.zeros_like(x)

    d.sample(model, (2, 1, 4, 4), steps=5, generator=torch.Generator().manual_seed(0))
    expected = list(reversed(d.schedule.respaced(5).timesteps.tolist()))
    assert [ts[0] for ts in seen] == expected and expected[0] == 99 and expected[-1] == 0
    assert all(len(set(ts)) == 1 and len(ts) == 2 for ts in seen)


# ------------------------------------------------------------------ training loss
@pytest.mark.parametrize("param", ["x0", "eps"])
def test_one_optimizer_step_lowers_the_loss_on_a_fixed_batch(param):
    cfg = get_preset("tiny", parameterization=param)
    torch.manual_seed(0)
    net = SegDiffNet(cfg).train()
    d = Diffusion.from_config(cfg)
    g = torch.Generator().manual_seed(3)
    img = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    x0 = (img[:, :1] > 0).float() * 2 - 1
    i = torch.tensor([0, 5, 10, 19])

    def loss():
        return d.training_loss(lambda x, t: net(x, t, image=img), x0, generator=torch.Generator().manual_seed(7), i=i)

    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    before = loss()
    assert torch.isfinite(before) and before > 0
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = loss()
    assert float(after) < float(before.detach())


def test_training_loss_target_matches_parameterisation():
    """A model that returns exactly the target has zero loss; the target is eps or x0 as configured."""
    x0 = torch.rand(3, 1, 4, 4) * 2 - 1
    for param in ("eps", "x0"):
        d = Diffusion(20, parameterization=param)
        i = torch.tensor([2, 9, 19])
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))

        def oracle(xt, t, param=param, d=d):
            if param == "x0":
                return x0
            return d.schedule.eps_from_x0(xt, t, x0)

        loss = d.training_loss(oracle, x0, generator=torch.Generator().manual_seed(5), i=i)
        assert float(loss) < 1e-9
        # and the noise really is the generator's first draw
        xt = d.schedule.q_sample(x0, i, noise)
        assert torch.allclose(d.schedule.eps_from_x0(xt, i, x0), noise, atol=1e-4)


# ------------------------------------------------------------------ samplers against analytic models
@pytest.mark.parametrize(
    "sampler,eta,steps",
    [("ddpm", 1.0, None), ("ddpm", 1.0, 7), ("ddim", 0.0, 7), ("ddim", 1.0, None), ("ddim", 0.5, 3)],
)
def test_fixed_x0_model_is_returned_exactly(sampler, eta, steps):
    d = Diffusion(50, parameterization="x0")
    target = torch.linspace(-0.9, 0.9, 64, dtype=torch.float64).reshape(1, 1, 8, 8).repeat(3, 1, 1, 1)
    out = d.sample(
        lambda x, t: target,
        tuple(target.shape),
        steps=steps,
        sampler=sampler,
        eta=eta,
        generator=torch.Generator().manual_seed(1),
        dtype=torch.float64,
    )
    torch.testing.assert_close(out, target, rtol=0, atol=1e-9)


def test_fixed_x0_model_as_eps_model_is_returned_exactly():
    d = Diffusion(30, parameterization="eps")
    target = torch.full((2, 1, 5, 5), -0.25, dtype=torch.float64)
    model = lambda x, t: d.schedule.eps_from_x0(x, t, target)  # noqa: E731  (t = original timestep)
    out = d.sample(model, (2, 1, 5, 5), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(out, target, rtol=0, atol=1e-9)


def _gaussian_eps_model(d: Diffusion, mu: float, s: float):
    """The exact (Bayes-optimal) eps predictor for data x_0 ~ N(mu, s^2), independently per pixel."""
    ab_full = d.schedule.alpha_bar

    def model(x, t):
        ab = ab_full[t.long()].to(x.dtype).reshape(-1, 1, 1, 1)
        a, b = ab.sqrt(), (1 - ab).sqrt()
        return b / (a * a * s * s + b * b) * (x - a * mu)

    return model


def _linear_gaussian_prediction(betas: np.ndarray, mu: float, s: float, sampler: str) -> tuple[float, float]:
    """Mean and variance of the sampler's output for the Gaussian eps model, by the linear recursion
    (Eq. 9-10 for DDPM, the DDIM eta=0 update), written out independently of the library."""
    alphas = 1 - betas
    abar = np.cumprod(alphas)
    M, V = 0.0, 1.0  # x_T ~ N(0, 1)
    for i in reversed(range(len(betas))):
        a, b = np.sqrt(abar[i]), np.sqrt(1 - abar[i])
        abp = abar[i - 1] if i > 0 else 1.0
        k = a * s * s / (a * a * s * s + b * b)  # x0_hat = mu (1 - k a) + k x
        c = mu * (1 - k * a)
        if sampler == "ddpm":
            c0 = np.sqrt(abp) * betas[i] / (1 - abar[i])
            c1 = np.sqrt(alphas[i]) * (1 - abp) / (1 - abar[i])
            M, V = c0 * c + (c0 * k + c1) * M, (c0 * k + c1) ** 2 * V + (1 - abp) / (1 - abar[i]) * betas[i]
        else:  # eps_hat = (x - a x0_hat) / b ; x' = sqrt(abp) x0_hat + sqrt(1 - abp) eps_hat
            gx = np.sqrt(abp) * k + np.sqrt(1 - abp) * (1 - a * k) / b
            g0 = np.sqrt(abp) * c - np.sqrt(1 - abp) * a * c / b
            M, V = g0 + gx * M, gx**2 * V
    return M, V


@pytest.mark.parametrize("sampler,eta", [("ddpm", 1.0), ("ddim", 0.0)])
def test_gaussian_data_sampler_statistics(sampler, eta):
    mu, s = 0.3, 0.2
    d = Diffusion(100, "linear-scaled", "eps")
    out = d.sample(
        _gaussian_eps_model(d, mu, s),
        (8, 1, 128, 128),
        sampler=sampler,
        eta=eta,
        generator=torch.Generator().manual_seed(0),
        dtype=torch.float64,
    )
    M, V = _linear_gaussian_prediction(linear_betas(100), mu, s, sampler)
    # 131072 independent pixels: s.e. of mean ~ 6e-4, of std ~ 4e-4
    assert float(out.mean()) == pytest.approx(M, abs=3e-3)
    assert float(out.std()) == pytest.approx(np.sqrt(V), abs=3e-3)
    # and the samples do resemble the data distribution (the sampler is a good approximation)
    assert pytest.approx(mu, abs=5e-3) == M
    assert 0.8 * s < np.sqrt(V) <= 1.0 * s
    # the pixels are independent draws: neighbouring pixels are uncorrelated
    flat = out[:, 0] - out.mean()
    corr = float((flat[:, :, 1:] * flat[:, :, :-1]).mean() / flat.var())
    assert abs(corr) < 0.02


# ------------------------------------------------------------------ seeds and determinism
def _tiny_eps_model():
    d = Diffusion(20, parameterization="eps")
    return d, _gaussian_eps_model(d, 0.1, 0.5)


def test_respaced_with_all_steps_equals_full_sampler():
    d, model = _tiny_eps_model()
    for sampler in ("ddpm", "ddim"):
        a = d.sample(model, (2, 1, 6, 6), steps=None, sampler=sampler, generator=torch.Generator().manual_seed(4))
        b = d.sample(model, (2, 1, 6, 6), steps=20, sampler=sampler, generator=torch.Generator().manual_seed(4))
        assert torch.equal(a, b)


def test_seeded_sampling_is_repeatable_and_seed_dependent():
    d, model = _tiny_eps_model()
    for sampler, steps in (("ddpm", None), ("ddpm", 5), ("ddim", 5)):
        a = d.sample(model, (2, 1, 6, 6), steps=steps, sampler=sampler, generator=torch.Generator().manual_seed(9))
        b = d.sample(model, (2, 1, 6, 6), steps=steps, sampler=sampler, generator=torch.Generator().manual_seed(9))
        c = d.sample(model, (2, 1, 6, 6), steps=steps, sampler=sampler, generator=torch.Generator().manual_seed(10))
        assert torch.equal(a, b)
        assert not torch.allclose(a, c)


def test_ddim_eta0_is_deterministic_given_xT_and_eta1_is_not():
    d, model = _tiny_eps_model()
    xT = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(0))

    def noise_fn_factory(seed):
        g = torch.Generator().manual_seed(seed)
        calls = []

        def noise_fn(shape):
            calls.append(shape)
            return xT.clone() if len(calls) == 1 else torch.randn(shape, generator=g)

        return noise_fn

    runs = {
        eta: [
            d.sample(model, (2, 1, 6, 6), steps=8, sampler="ddim", eta=eta, noise_fn=noise_fn_factory(s))
            for s in (1, 2)
        ]
        for eta in (0.0, 1.0)
    }
    assert torch.equal(runs[0.0][0], runs[0.0][1])  # eta = 0: a function of x_T alone
    assert not torch.allclose(runs[1.0][0], runs[1.0][1])  # eta = 1: fresh noise every step
    assert torch.isfinite(runs[1.0][0]).all()
    # eta = 0 and eta = 1 are different samplers
    assert not torch.allclose(runs[0.0][0], runs[1.0][0])


def test_unknown_parameterisation_is_refused():
    with pytest.raises(SegDiffError):
        Diffusion(10, parameterization="v")


def test_unknown_sampler_refused():
    from napari_segdiff.config import get_preset

    d = Diffusion.from_config(get_preset("tiny"))
    with pytest.raises(ValueError, match="sampler must be 'ddpm' or 'ddim', got 'ddim2'"):
        d.sample(lambda x, t: x, (1, 1, 4, 4), steps=2, sampler="ddim2")
