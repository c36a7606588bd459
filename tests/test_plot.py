"""plot_spectrum draws a verdict, its JSON and a certificate's condition; refuses what has none."""
import pytest
import torch

from global_convergence.conditions.plot import plot_spectrum
from global_convergence.errors import UserInputError
from global_convergence.linalg import DenseFactor, dense_rank_verdict, factor_rank_verdict

PNG = b"\x89PNG\r\n\x1a\n"


def test_plot_spectrum_of_a_verdict_and_of_its_json(tmp_path):
    a = torch.randn(30, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a[-1] = a[0]                                              # rank 29 of 30
    v = dense_rank_verdict(a)
    assert v.details["spectrum"]["index"][0] == 1 and len(v.details["spectrum"]["values"]) == 30
    out = plot_spectrum(v, tmp_path / "dense.png")
    assert out.read_bytes()[:8] == PNG and out.stat().st_size > 10_000
    cert = factor_rank_verdict(DenseFactor(a[:-1] + 0))       # the Gram certificate decides
    assert cert.details["spectrum"]["certified_lower_bound"] > 0
    condition = {"condition": "expressivity", **cert.to_dict()}
    assert plot_spectrum(condition, tmp_path / "cert.png").read_bytes()[:8] == PNG
    with pytest.raises(UserInputError, match="no spectrum"):
        plot_spectrum({k: val for k, val in v.to_dict().items() if k != "spectrum"},
                      tmp_path / "none.png")


def test_spectrum_stays_small_at_large_n():
    a = torch.randn(600, 700, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    spectrum = dense_rank_verdict(a, use_qr=False).details["spectrum"]
    assert len(spectrum["values"]) == 201 and spectrum["index"][-1] == 600
