"""Shared test settings: small thread count (CI has 2 cores) and flushed subnormals."""
import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _flush_denormals():
    previous = torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


@pytest.fixture
def quiet_one_thread(monkeypatch):
    """No PNG plots (matplotlib costs more than a tiny run) and one intra-op thread (bit-identical
    runs, no OpenMP spinning on a busy 2-core machine)."""
    from global_convergence.training import loop
    monkeypatch.setattr(loop, "plot_run", lambda *args, **kwargs: [])
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
