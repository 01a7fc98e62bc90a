"""The straightforward sampler the engine's fast path is checked and benchmarked against."""

from __future__ import annotations

import torch

from napari_segdiff.engine import tile_seed
from napari_segdiff.models import SegDiffModel


def reference_tile_sample(model: SegDiffModel, image: torch.Tensor, samples: int, steps: int | None, seed: int):
    """Algorithm 1 as the public code runs it: each sample alone, G(I) inside every network call. The
    reference the engine's fast path is checked and benchmarked against: it draws the same per-tile
    noise as :class:`TileSampler` (tile index 0), so the two agree to float precision."""
    net, diff = model.net, model.diffusion
    h, w = image.shape[-2:]
    K = model.config.mask_channels
    g = torch.Generator().manual_seed(tile_seed(seed, 0))
    outs = []
    # draw the same noise as the engine: per step one (N, K, h, w) tensor from the tile's generator
    noises: list[torch.Tensor] = []
    sched = diff.sampling_schedule(steps)

    def noise_for(k):
        while len(noises) <= k:
            noises.append(torch.randn((samples, K, h, w), generator=g))
        return noises[k]

    for j in range(samples):
        calls = iter(range(sched.num_steps + 1))
        x = diff.sample(
            lambda x_t, t: net(x_t, t, image=image),
            (1, K, h, w),
            steps=steps,
            noise_fn=lambda s, calls=calls, j=j: noise_for(next(calls))[j : j + 1],
        )
        outs.append(x)
    p = ((torch.cat(outs).clamp(-1, 1) + 1) / 2).numpy()  # (N, K, h, w)
    mean, second = p.mean(0), (p * p).mean(0)
    if K == 1:
        return mean[0], second[0]
    return mean.transpose(1, 2, 0), second.transpose(1, 2, 0)  # (h, w, K), as the engine returns them
