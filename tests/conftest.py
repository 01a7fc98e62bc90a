"""Shared test fixtures. Keep this small: fixtures used by one test file belong in that file."""

import pytest


@pytest.fixture(scope="session")
def tiny_model():
    """The 74k-parameter 'tiny' network (use tile 32/64, samples=2, steps=2) with its zero-initialised
    layers given seeded random weights (see tests/_helpers.py), so that outputs depend on the image and
    on the sampling noise (a freshly built one predicts a constant 0.5 everywhere)."""
    from _helpers import tiny_model as make

    model = make(seed=0, perturb=0.3)
    model.name = "tiny"
    return model
