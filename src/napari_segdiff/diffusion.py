"""Noise schedule, forward process, training loss and samplers (SegDiff section 3), pure torch.

Masks live in [-1, 1]. The schedule is a small object holding float64 tables; the samplers take a
``model_fn(x_t, t) -> output`` closure (so the caller decides how G(I) is cached) and an explicit
``torch.Generator`` for reproducible noise.

Beta scale: Eq. 14 taken literally for T=100 (betas 1e-4 .. 2e-2) leaves alpha_bar_T ~ 0.37, so x_T is
far from the N(0, I) that sampling starts from. ``linear-scaled`` (the default, as the public SegDiff
and guided-diffusion code) multiplies both ends by 1000/T, giving 1e-3 .. 2e-1 for T=100 and
alpha_bar_T ~ 2e-5. ``linear-paper`` keeps Eq. 14 literally.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ._errors import SegDiffError

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def linear_betas(T: int, kind: str = "linear-scaled") -> np.ndarray:
    """Eq. 14: beta_t = (1e-4 (T - t) + 2e-2 (t - 1)) / (T - 1), t = 1..T (optionally x 1000/T)."""
    scale = 1000.0 / T if kind == "linear-scaled" else 1.0
    if kind not in ("linear-scaled", "linear-paper"):
        raise SegDiffError(f"unknown beta schedule {kind!r}; use 'linear-scaled' or 'linear-paper'")
    t = np.arange(1, T + 1, dtype=np.float64)
    betas = (1e-4 * scale * (T - t) + 2e-2 * scale * (t - 1)) / (T - 1)
    return np.clip(betas, 1e-8, 0.999)


def _extract(table: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return table.to(x.device)[t.long()].to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


class Schedule:
    """Diffusion tables for a set of timesteps. Index i (0-based) is the paper's t = i + 1.

    ``timesteps`` maps each index to the model's own timestep (for a respaced schedule, a subset of
    0..T-1); the model is always called with those original indices.
    """

    def __init__(self, betas: np.ndarray, timesteps: np.ndarray | None = None):
        betas = np.asarray(betas, dtype=np.float64)
        self.num_steps = len(betas)
        self.timesteps = np.arange(self.num_steps) if timesteps is None else np.asarray(timesteps)
        alphas = 1.0 - betas  # Eq. 3
        abar = np.cumprod(alphas)  # Eq. 3
        abar_prev = np.append(1.0, abar[:-1])
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)  # Eq. 10, beta tilde
        f = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64))  # noqa: E731
        self.betas, self.alphas, self.alpha_bar, self.alpha_bar_prev = map(f, (betas, alphas, abar, abar_prev))
        self.posterior_variance = f(post_var)
        # Eq. 9 coefficients of x_0 and x_t in the posterior mean
        self.posterior_coef_x0 = f(betas * np.sqrt(abar_prev) / (1.0 - abar))
        self.posterior_coef_xt = f((1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar))
        self._model_t = torch.from_numpy(self.timesteps.astype(np.int64))

    @classmethod
    def linear(cls, T: int, kind: str = "linear-scaled") -> Schedule:
        return cls(linear_betas(T, kind))

    def respaced(self, steps: int) -> Schedule:
        """A subset of ``steps`` evenly spaced timesteps with betas recomputed from alpha_bar, so the
        DDPM posterior between kept steps is exact (improved-DDPM respacing). steps == T: unchanged."""
        if not 1 <= steps <= self.num_steps:
            raise SegDiffError(
                f"steps must be between 1 and {self.num_steps} (the model's diffusion steps), got {steps}"
            )
        if steps == self.num_steps:
            return self
        keep = np.unique(np.round(np.linspace(0, self.num_steps - 1, steps)).astype(int))
        if steps == 1:  # one step goes from x_T straight to x_0: the model must see t = T, not t = 1
            keep = np.array([self.num_steps - 1])
        abar = self.alpha_bar.numpy()[keep]
        new_betas = 1.0 - abar / np.append(1.0, abar[:-1])
        return Schedule(new_betas, self.timesteps[keep])

    # ------------------------------------------------------------ forward process
    def q_sample(self, x0: torch.Tensor, i: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Eq. 5: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        ab = _extract(self.alpha_bar, i, x0)
        return ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise

    def posterior(self, x0: torch.Tensor, x_t: torch.Tensor, i: torch.Tensor):
        """Eq. 8-10: mean and variance of q(x_{t-1} | x_t, x_0)."""
        mean = _extract(self.posterior_coef_x0, i, x_t) * x0 + _extract(self.posterior_coef_xt, i, x_t) * x_t
        return mean, _extract(self.posterior_variance, i, x_t)

    def model_t(self, i: torch.Tensor) -> torch.Tensor:
        return self._model_t.to(i.device)[i.long()]

    # ------------------------------------------------------------ parameterisations
    def x0_from_eps(self, x_t: torch.Tensor, i: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        ab = _extract(self.alpha_bar, i, x_t)
        return (x_t - (1.0 - ab).sqrt() * eps) / ab.sqrt()

    def eps_from_x0(self, x_t: torch.Tensor, i: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        ab = _extract(self.alpha_bar, i, x_t)
        return (x_t - ab.sqrt() * x0) / (1.0 - ab).sqrt()


class Diffusion:
    """A schedule plus the network's parameterisation: the training loss and the samplers."""

    def __init__(self, T: int = 100, schedule: str = "linear-scaled", parameterization: str = "eps"):
        if parameterization not in ("eps", "x0"):
            raise SegDiffError(f"parameterization must be 'eps' or 'x0', got {parameterization!r}")
        self.T = T
        self.schedule = Schedule.linear(T, schedule)
        self.parameterization = parameterization

    @classmethod
    def from_config(cls, cfg) -> Diffusion:
        return cls(cfg.diffusion_steps, cfg.beta_schedule, cfg.parameterization)

    # ------------------------------------------------------------ training
    def training_loss(
        self,
        model_fn: ModelFn,
        x0: torch.Tensor,
        generator: torch.Generator | None = None,
        i: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Eq. 18: E ||eps - eps_theta(sqrt(abar) x0 + sqrt(1 - abar) eps, I, t)||^2 (or the x0 target).

        ``weight`` (broadcastable to x0, 0 where the target is unknown) makes it a weighted mean."""
        b = x0.shape[0]
        if i is None:
            i = torch.randint(0, self.T, (b,), generator=generator, device="cpu").to(x0.device)
        noise = torch.randn(x0.shape, generator=generator, device="cpu").to(x0.device, x0.dtype)
        x_t = self.schedule.q_sample(x0, i, noise)
        out = model_fn(x_t, i)
        target = noise if self.parameterization == "eps" else x0
        err = (out.float() - target.float()) ** 2
        if weight is None:
            return err.mean()
        w = weight.float().expand_as(err)
        return (err * w).sum() / w.sum().clamp(min=1.0)

    # ------------------------------------------------------------ sampling
    def sampling_schedule(self, steps: int | None) -> Schedule:
        return self.schedule if steps is None else self.schedule.respaced(steps)

    def predict_x0(self, sched: Schedule, model_out: torch.Tensor, x_t: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        x0 = model_out if self.parameterization == "x0" else sched.x0_from_eps(x_t, i, model_out)
        return x0.clamp(-1.0, 1.0)  # masks live in [-1, 1]

    @torch.no_grad()
    def sample(
        self,
        model_fn: ModelFn,
        shape: tuple[int, ...],
        steps: int | None = None,
        sampler: str = "ddpm",
        eta: float = 1.0,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        noise_fn: Callable[[tuple[int, ...]], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Algorithm 1 (ancestral DDPM, Eq. 16 via Eq. 9-13) on the full or a respaced schedule.

        ``sampler='ddim'`` uses the DDIM update with ``eta``. Noise is drawn on the CPU from
        ``generator`` (or by ``noise_fn``) so results do not depend on the device.
        """
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
        sched = self.sampling_schedule(steps)
        if noise_fn is None:
            noise_fn = lambda s: torch.randn(s, generator=generator, dtype=torch.float32)  # noqa: E731
        x = noise_fn(shape).to(device, dtype)  # x_T ~ N(0, I)
        for k in reversed(range(sched.num_steps)):
            i = torch.full((shape[0],), k, dtype=torch.long, device=device)
            out = model_fn(x, sched.model_t(i))
            x0 = self.predict_x0(sched, out.to(dtype), x, i)
            if sampler == "ddim":
                eps = sched.eps_from_x0(x, i, x0)
                ab = _extract(sched.alpha_bar, i, x)
                ab_prev = _extract(sched.alpha_bar_prev, i, x)
                sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
                mean = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma**2).clamp(min=0).sqrt() * eps
                var = sigma**2
            else:
                mean, var = sched.posterior(x0, x, i)  # Eq. 9, 10, 13
            if k > 0:  # 1[t > 1] in Algorithm 1
                x = mean + var.sqrt() * noise_fn(shape).to(device, dtype)
            else:
                x = mean
        return x
