"""Shared test fixtures. Keep this small: fixtures used by one test file belong in that file."""
import pytest


@pytest.fixture(scope="session")
def tiny_model():
    """The 74k-parameter 'tiny' network (use tile 32/64, samples=2, steps=2). Its zero-initialised layers
    get small seeded random weights, so that the untrained network's output depends on the image and on
    the sampling noise (a freshly built one predicts a constant 0.5 everywhere)."""
    import torch

    from napari_segdiff import SegDiffModel

    model = SegDiffModel.from_config("tiny", name="tiny")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.net.parameters():
            if p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model
