"""gconv verify at initialisation and on a checkpoint of gconv train: verdict, statistics named,
plot written."""
import json

import numpy as np
import pytest

from global_convergence.cli import main
from global_convergence.conditions.plot import plot_spectrum

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("verify")
    rng = np.random.default_rng(1)
    np.savez(folder / "tiny.npz", x=rng.random((60, 8)).astype(np.float32),
             y=rng.integers(0, 3, 60))
    return folder


@pytest.mark.parametrize("condition,method", [("expressivity", "two-phase"),
                                              ("safe-exploration", "ee")])
def test_verify_decides_on_a_checkpoint_of_gconv_train(tiny, capsys, condition, method):
    out = tiny / method
    assert main(["train", "--data", str(tiny / "tiny.npz"), "--model", "mlp", "--method", method,
                 "--epochs", "4", "--batch-size", "0", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    plot = tiny / f"{condition}.png"
    assert main(["verify", condition, "--checkpoint", str(out / "checkpoint.pt"), "--json",
                 "--plot", str(plot)]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["condition"] == condition and d["verdict"] == "verified" and d["n"] == 60
    assert d["batchnorm"]["statistics"] == "none"             # the mlp has no batch norm
    assert plot.read_bytes()[:8] == PNG
    summary = json.loads((out / "summary.json").read_text())
    again = plot_spectrum(summary["certificate"]["condition"], tiny / f"{method}-cert.png")
    assert again.read_bytes()[:8] == PNG


def test_verify_at_initialisation_names_the_statistics(tiny, capsys):
    assert main(["verify", "safe-exploration", "--data", str(tiny / "tiny.npz"), "--model",
                 "lenet", "--json"]) == 2                         # 8 features are no images
    capsys.readouterr()
    assert main(["verify", "expressivity", "--json"]) == 2
    assert "--checkpoint" in capsys.readouterr().err
