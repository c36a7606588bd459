"""Every script in examples/ runs (small sizes) and prints what it promises."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import global_convergence

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _python(*args: str) -> str:
    """``python ARGS`` as a user runs it (on this checkout's package, one thread); its stdout."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    source = str(Path(global_convergence.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [source, env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _run(script: str, *args: str) -> dict:
    """Run an example; its last line is a JSON summary."""
    return json.loads(_python(str(EXAMPLES / script), *args).strip().splitlines()[-1])


def test_the_readme_snippet_runs_and_prints_a_verified_certificate_with_its_bound():
    text = (EXAMPLES.parent / "README.md").read_text()
    snippet = re.search(r"## Python: the wrapper is a .*?```python\n(.*?)```", text, re.S).group(1)
    assert len(snippet.strip().splitlines()) <= 25
    verdict, formula = _python("-c", snippet).strip().splitlines()[-1].split(" ", 1)
    assert verdict == "verified" and formula.startswith("L(theta_t) <= inf_theta")


def test_the_plain_loop_certifies_the_switch_and_trains_at_one_over_l():
    summary = _run("plain_loop.py", "--n", "60", "--steps", "300", "--tau", "200")
    assert summary["phase"] == 2 and summary["verdict"] == "verified"
    assert summary["bound_withheld_because"] == []          # full-batch GD at 1/L̂
    assert summary["final_loss"] < summary["loss_at_switch"]
    assert 0 < summary["step_max"] < float("inf")
    assert summary["final_lr"] == summary["step_max"]       # the step the bound is for, to the end


def test_the_lightning_example_keeps_the_frozen_part_bit_identical():
    summary = _run("lightning_example.py", "--n", "64", "--steps", "40", "--tau", "24")
    assert summary == {**summary, "phase": 2, "steps": 40, "frozen_bit_identical": True,
                       "statistics_recomputed": True}
    assert summary["lr"] == 0.1 * 0.5 ** (40 // 40)


def test_the_hugging_face_example_trains_through_the_switch_and_certifies_honestly():
    summary = _run("huggingface_example.py", "--n", "64", "--steps", "40", "--tau", "20")
    assert summary["phase"] == 2 and summary["steps"] == 40 and summary["optimizer"] == "sgd"
    assert summary["verdict"] == "verified"
    assert {"full_batch", "no_momentum"} <= set(summary["bound_withheld_because"])


def test_the_alignment_at_initialisation_study_prints_the_verdicts_of_the_verifier():
    import importlib.util

    import torch

    from global_convergence import flush_denormals, make_loss
    from global_convergence.conditions import alignment
    from global_convergence.data import load_dataset

    summary = _run("alignment_at_initialisation.py", "--data", "digits", "--n", "60",
                   "--widths", "1", "--seeds", "0", "--variant", "max", "relu")
    assert summary["variant"] == ["max", "relu"] and len(summary["checks"]) == 1
    check = summary["checks"][0]
    path = EXAMPLES / "alignment_at_initialisation.py"
    spec = importlib.util.spec_from_file_location("study", path)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    data = load_dataset("digits", n=60, seed=0)
    model = study.lenet_variant(1, 0, tuple(data.x_train.shape[1:]), {"max", "relu"})
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in model) == 2
    assert not any(isinstance(m, torch.nn.Softplus) for m in model)
    with flush_denormals():
        verdict = alignment(model, data.x_train, (data.y_train >= 5).long(),
                            loss=make_loss("ce", 2))
    assert (check["verdict"], check["rank"], check["rank_augmented"]) == \
        (verdict.verdict, verdict.rank, verdict.details["rank_augmented"])
