"""Shared test settings: small thread count (CI has 2 cores) and flushed subnormals."""
import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _flush_denormals():
    # torch has no getter for the flag; False is the process default every test starts from
    torch.set_flush_denormal(True)
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


def reference_jacobian(model, x: torch.Tensor) -> torch.Tensor:
    """J in vec row order (row j·n + i), by torch.func — independent of the ntk package."""
    from torch.func import functional_call, jacrev, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p, xi):
        return functional_call(model, p, (xi[None],)).reshape(-1)

    jac = vmap(jacrev(f), in_dims=(None, 0))(params, x)            # name → (n, m, *shape)
    rows = torch.cat([j.flatten(2) for j in jac.values()], dim=2)   # (n, m, d)
    return rows.transpose(0, 1).reshape(-1, rows.shape[2])
