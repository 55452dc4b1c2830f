"""Test configuration.

Without a CUDA device, Triton kernels run in the interpreter on CPU tensors. TRITON_INTERPRET must be set
before any kernel is defined, so it is set here, before the tests import diffusion_fast.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Small CPU tensors run faster on one thread than on two busy ones.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")
