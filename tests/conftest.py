"""Shared test settings: small thread count (CI has 2 cores) and flushed subnormals."""
import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _flush_denormals():
    previous = torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)
