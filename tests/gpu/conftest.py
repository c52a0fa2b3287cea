"""Fixtures of the GPU tests (tests/gpu): run by `pytest -m gpu`, skipped without CUDA (see common.GPU)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def deterministic_cudnn():
    """Deterministic convolution kernels for the test, so that two runs of the same steps can be compared closely
    (cuDNN's fastest backward kernels add in an order that changes from run to run)."""
    before = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic = before
