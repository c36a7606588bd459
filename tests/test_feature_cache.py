"""Where phase 2 keeps the trunk features (``feature_cache``: memory, disk, off, auto) and where the
inputs live (``data_on_device``: CUDA device or pinned CPU memory).

The disk cache is a float32 ``.npy`` memmap written chunk by chunk and read per batch; it holds the
same float32 values as the memory cache, so the two give the same losses, and the path that
recomputes the frozen trunk agrees with both to the rounding of a batch through the trunk
(``tests/test_phase2_cache.py``: 1e-5). The file lives in the run's folder (a temporary folder
without one) and is gone when the run ends.

No GPU was available where these tests were written: the placement logic and the batch gathering
are tested on the CPU with ``device="cpu"`` (and a ``torch.device("cuda")`` that is never touched);
the CUDA test at the end runs only where CUDA is available.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from global_convergence.cli import main
from global_convergence.errors import UserInputError
from global_convergence.training import TrainConfig, build_run, feature_cache, phase2, storage, train

TOL = 1e-5
BUILD_FEATURE_CACHE = feature_cache.build_feature_cache
CASES = {
    "two-phase-mlp": dict(data="two-moons", model="mlp", method="two-phase", epochs=5, batch_size=20),
    "ee-mlp": dict(data="two-moons", model="mlp", method="ee", epochs=5, batch_size=20),
    # a test set (digits), so the test split is cached on disk too
    "two-phase-lenet": dict(data="digits", n=40, model="lenet", method="two-phase", epochs=4,
                            batch_size=20, lr=0.05),
}
STORAGES = {"memory": dict(feature_cache="memory"), "disk": dict(feature_cache="disk"),
            "off": dict(cache_features=False)}


pytestmark = pytest.mark.usefixtures("quiet_one_thread")


def run(options: dict, out: Path | None, monkeypatch) -> tuple[list[dict], list, list[bool]]:
    """Logged rows of a run logged every step, what ``build_feature_cache`` returned, and whether
    the cache's files existed at each logged phase-2 step."""
    built, present = [], []

    def spy(run_):
        result = BUILD_FEATURE_CACHE(run_)
        built.append(result)
        return result

    def record(event):
        if event.phase == 2 and built[-1] is not None:
            present.append(all(f.is_file() for f in built[-1].files))
        rows.append(dict(event.row))

    monkeypatch.setattr(phase2, "build_feature_cache", spy)
    rows: list[dict] = []
    train(TrainConfig(**options, log_every=1), out, progress=False, callbacks=[record])
    return rows, built, present


@pytest.mark.parametrize("case", list(CASES))
def test_disk_memory_and_uncached_second_phases_give_the_same_losses(case, tmp_path, monkeypatch):
    results = {name: run({**CASES[case], **extra}, tmp_path / name, monkeypatch)
               for name, extra in STORAGES.items()}
    memory, disk, off = (results[name][0] for name in STORAGES)
    (memory_cache,), (disk_cache,), built_off = (results[name][1] for name in STORAGES)
    assert built_off == [None]
    assert isinstance(memory_cache.train, torch.Tensor) and memory_cache.files == []
    assert isinstance(disk_cache.train, np.ndarray)
    splits = 2 if case == "two-phase-lenet" else 1
    assert [f.parent for f in disk_cache.files] == [tmp_path / "disk"] * splits
    assert results["disk"][2] and all(results["disk"][2])          # there during phase 2 ...
    assert not any(f.exists() for f in disk_cache.files)           # ... and gone afterwards
    assert not list((tmp_path / "disk").glob("feature-cache*"))
    assert [r["step"] for r in memory] == [r["step"] for r in disk] == [r["step"] for r in off]
    assert sum(r["phase"] == 2 for r in disk) >= 2
    for a, b, c in zip(disk, memory, off):
        assert a["phase"] == b["phase"] == c["phase"]
        for reference in (b, c):
            scale = max(1.0, abs(reference["loss"]))
            assert abs(a["loss"] - reference["loss"]) <= TOL * scale, (a, reference)
            assert a["train_error"] == reference["train_error"]
            assert a["test_error"] == reference["test_error"]


def test_without_an_output_folder_the_disk_cache_lives_in_a_temporary_folder(monkeypatch):
    _, (cache,), present = run({**CASES["ee-mlp"], "feature_cache": "disk"}, None, monkeypatch)
    assert cache.folder is not None and cache.files[0].parent == cache.folder
    assert present and all(present)
    assert not cache.folder.exists()


def test_auto_keeps_the_cache_in_memory_below_the_budget_and_on_disk_above(monkeypatch):
    """Written chunk by chunk (chunks of 7 here) into the memmap: the same float32 features as
    the memory cache; ``close`` deletes the file and its temporary folder."""
    run_ = build_run(TrainConfig(**CASES["two-phase-lenet"]), eval_chunk=7)
    run_.model.freeze_trunk()
    monkeypatch.setattr(storage, "CACHE_MEMORY_BUDGET", 10**12)
    memory = feature_cache.build_feature_cache(run_)
    monkeypatch.setattr(storage, "CACHE_MEMORY_BUDGET", 1)
    disk = feature_cache.build_feature_cache(run_)
    assert isinstance(memory.train, torch.Tensor) and memory.files == []
    assert isinstance(disk.train, np.memmap) and isinstance(disk.test, np.memmap)
    assert disk.train.dtype == np.float32 and disk.train.shape == tuple(memory.train.shape)
    assert np.array_equal(disk.train, memory.train.numpy())
    assert np.array_equal(disk.test, memory.test.numpy())
    assert all(f.is_file() for f in disk.files)
    disk.close()
    assert not any(f.exists() for f in disk.files) and not disk.folder.exists()


def test_a_phase_two_checkpoint_resumes_with_the_disk_cache_rebuilt(tmp_path, monkeypatch):
    """Stopped after the switch with a memory cache, resumed with a disk cache (storage may change
    on resume: both hold the same features): the uninterrupted run's losses."""
    options = CASES["ee-mlp"]                       # 25 steps, switch at 15
    whole, _, _ = run({**options, "feature_cache": "memory"}, tmp_path / "whole", monkeypatch)
    train(TrainConfig(**options, feature_cache="memory", log_every=1), tmp_path / "b",
          progress=False, stop_after=18)
    resumed = train(TrainConfig(**options, feature_cache="disk", log_every=1), tmp_path / "b",
                    progress=False, resume=True)
    assert resumed["completed"]
    assert abs(resumed["train_loss"] - whole[-1]["loss"]) <= TOL * max(1.0, abs(whole[-1]["loss"]))
    assert not list((tmp_path / "b").glob("feature-cache*"))
    with pytest.raises(UserInputError, match="cache_features: True -> False"):
        train(TrainConfig(**options, feature_cache="off", log_every=1), tmp_path / "b",
              progress=False, resume=True)


@pytest.mark.parametrize("options, message", [
    (dict(feature_cache="ram"), "unknown --feature-cache 'ram'; expected one of auto, memory, disk, off"),
    (dict(data_on_device="maybe"), "unknown --data-on-device 'maybe'; expected one of auto, yes, no"),
    (dict(cache_features=False, feature_cache="disk"),
     "--no-cache-features contradicts --feature-cache disk; give only one of them"),
])
def test_bad_values_are_refused_naming_the_option(options, message):
    with pytest.raises(UserInputError) as err:
        TrainConfig(steps=4, **options).validate()
    assert str(err.value) == message


def test_the_command_line_refuses_a_bad_feature_cache_in_one_line(tmp_path, capsys):
    code = main(["train", "--data", "sine", "--model", "mlp", "--method", "ee", "--steps", "4",
                 "--feature-cache", "ram", "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == ("gconv: error: unknown --feature-cache 'ram'; expected one of auto, memory, "
                   "disk, off\n")
    assert not (tmp_path / "run").exists()


# -- inputs: on the device or in pinned CPU memory ----------------------------------------------
def test_placement_follows_the_choice_and_the_free_device_memory():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")       # cuda is only compared, never used
    for choice in ("auto", "yes", "no"):
        assert storage.inputs_on_device(choice, 10**15, cpu)   # off CUDA nothing changes
    assert storage.inputs_on_device("yes", 10**15, cuda, free_bytes=1)
    assert not storage.inputs_on_device("no", 1, cuda, free_bytes=10**15)
    fraction = storage.DEVICE_DATA_FRACTION
    assert storage.inputs_on_device("auto", int(fraction * 1000), cuda, free_bytes=1000)
    assert not storage.inputs_on_device("auto", int(fraction * 1000) + 1, cuda, free_bytes=1000)


def test_inputs_kept_off_the_device_stay_on_the_cpu_unpinned_without_cuda():
    x = torch.randn(6, 3)
    kept = storage.place_inputs(x, False, torch.device("cpu"))
    assert kept.device.type == "cpu" and torch.equal(kept, x)
    if not torch.cuda.is_available():
        assert not storage.place_inputs(x, False, torch.device("cuda")).is_pinned()


def test_batches_and_chunks_are_gathered_from_tensors_and_memmaps(tmp_path):
    x = torch.randn(10, 2, 3)
    array = storage.open_feature_file(tmp_path / "f.npy", 10, (2, 3))
    array[:] = x.numpy()
    index = torch.tensor([7, 0, 3, 3])
    for source in (x, array):
        assert torch.equal(storage.gather_rows(source, index, torch.device("cpu")), x[index])
        assert torch.equal(storage.read_rows(source, 8, 12, torch.device("cpu")), x[8:])
        assert storage.chunk_count(source, 4) == 3
    assert storage.tensor_bytes(x, None) == 10 * 6 * 4


def test_a_run_told_to_keep_its_data_off_the_device_trains_as_before_on_the_cpu(monkeypatch):
    rows = {choice: run({**CASES["ee-mlp"], "epochs": 2, "data_on_device": choice}, None,
                        monkeypatch)[0] for choice in ("yes", "no")}
    assert [r["loss"] for r in rows["yes"]] == [r["loss"] for r in rows["no"]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_pinned_data_and_disk_cache_train_what_device_data_train(tmp_path, monkeypatch):
    """Not run where this was written (no GPU): data in pinned CPU memory with batches copied
    without blocking, and a disk cache read per batch, against data and cache on the GPU."""
    options = {**CASES["two-phase-lenet"], "device": "cuda"}
    run_ = build_run(TrainConfig(**options, data_on_device="no"))
    assert run_.x.device.type == "cpu" and run_.x.is_pinned() and run_.y.device.type == "cuda"
    on, _, _ = run({**options, "data_on_device": "yes", "feature_cache": "memory"},
                   tmp_path / "on", monkeypatch)
    off, _, _ = run({**options, "data_on_device": "no", "feature_cache": "disk"},
                    tmp_path / "off", monkeypatch)
    for a, b in zip(on, off):
        assert abs(a["loss"] - b["loss"]) <= TOL * max(1.0, abs(b["loss"])), (a, b)
