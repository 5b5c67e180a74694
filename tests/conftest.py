import matplotlib
import pytest
import torch

matplotlib.use("Agg")


@pytest.fixture(autouse=True)
def _fresh_param_store():
    """Each test starts from an empty Pyro param store and float32 default dtype."""
    import pyro

    pyro.clear_param_store()
    torch.set_default_dtype(torch.float32)
    yield
    pyro.clear_param_store()
