import pytest
import torch

from fm.models import GaussianOTFlow


@pytest.fixture
def gaussian_field():
    """The exact OT-path velocity for data N(1.5, 0.5^2 I): known sampling marginals and log-density."""
    return GaussianOTFlow(mu=1.5, std=0.5, sigma_min=0.0).double()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
