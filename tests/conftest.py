"""Shared test fixtures. Keep this small: fixtures used by one test file belong in that file."""

import pytest


@pytest.fixture(scope="session", autouse=True)
def _runtime_and_cache(tmp_path_factory):
    """The suite runs the torch runtime unless a test asks for OpenVINO by name, and converted networks go to
    a temporary cache, never the user's."""
    mp = pytest.MonkeyPatch()
    mp.setenv("NAPARI_SEGDIFF_RUNTIME", "torch")
    mp.setenv("NAPARI_SEGDIFF_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def tiny_model():
    """The 74k-parameter 'tiny' network (use tile 32/64, samples=2, steps=2) with its zero-initialised
    layers given seeded random weights (see tests/_helpers.py), so that outputs depend on the image and
    on the sampling noise (a freshly built one predicts a constant 0.5 everywhere)."""
    from _helpers import tiny_model as make

    model = make(seed=0, perturb=0.3)
    model.name = "tiny"
    return model
