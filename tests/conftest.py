import numpy as np
import pytest
import torch


@pytest.fixture
def paper_points() -> torch.Tensor:
    """The paper's 20 points: ``np.random.seed(1); np.random.randn(20, 2)``."""
    np.random.seed(1)
    return torch.tensor(np.random.randn(20, 2))
