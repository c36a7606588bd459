"""The torchvision data sets, loaded through load_dataset from small files written here.

Each writer produces the real on-disk format torchvision reads (idx-ubyte, CIFAR pickle batches,
SVHN .mat, semeion.data text); check_integrity=False skips only the md5 comparison.
"""
from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest
import scipy.io
import torch

from global_convergence.data import NORMALIZATION, load_dataset
from global_convergence.errors import UserInputError

VISION_NAMES = ("semeion", "mnist", "kmnist", "cifar10", "cifar100", "svhn")


def normalised(pixels: np.ndarray, name: str) -> torch.Tensor:
    """uint8 NCHW pixels as load_dataset should return them."""
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in NORMALIZATION[name])
    return (torch.from_numpy(pixels).float() / 255 - mean) / std


# ----------------------------------------------------------------------------- file writers

def write_idx(path, array: np.ndarray) -> None:
    """An idx-ubyte file: magic 0x0000 08 <ndim>, big-endian sizes, then the uint8 data."""
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root, folder: str, rng, n_train: int = 12, n_test: int = 5):
    """MNIST-layout files under ``root/folder/raw``; returns the arrays written."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        out[prefix] = (images, labels)
    return out


def pickle_to(path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def cifar_images(n: int, offset: int) -> np.ndarray:
    """Rows of 3072 bytes (R plane, G plane, B plane); sample i lights channel (i+offset) % 3."""
    data = np.zeros((n, 3, 1024), np.uint8)
    for i in range(n):
        data[i, (i + offset) % 3] = 255
        data[i, :, 0] = 7                             # pixel (0, 0) of every channel
    return data.reshape(n, 3072)


def write_cifar10(root, per_batch: int = 4, n_test: int = 3) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for b in range(1, 6):
        labels = [(b + i) % 10 for i in range(per_batch)]
        pickle_to(folder / f"data_batch_{b}",
                  {"batch_label": f"batch {b}", "labels": labels,
                   "data": cifar_images(per_batch, (b - 1) * per_batch)})
    pickle_to(folder / "test_batch",
              {"labels": [9, 0, 1][:n_test], "data": cifar_images(n_test, 0)})
    pickle_to(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})


def write_cifar100(root, n_train: int = 6, n_test: int = 2) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test)):
        fine = [(17 * i + 99) % 100 for i in range(n)]
        pickle_to(folder / split, {"fine_labels": fine, "coarse_labels": [f // 5 for f in fine],
                                   "data": cifar_images(n, 0)})
    pickle_to(folder / "meta", {"fine_label_names": [f"f{i}" for i in range(100)],
                                "coarse_label_names": [f"c{i}" for i in range(20)]})


def write_svhn(root, rng, n_train: int = 7, n_test: int = 3):
    """train_32x32.mat / test_32x32.mat: X (32, 32, 3, N) uint8, y (N, 1) with 10 for digit 0."""
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).astype(np.uint8).reshape(n, 1)       # 1..10
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})
        out[split] = (x, y)
    return out


def write_semeion(root, n: int = 1593) -> np.ndarray:
    """semeion.data: 256 pixel values (0/1) and a one-hot label of 10 per line; pixel k = label."""
    labels = np.arange(n) % 10
    rows = np.zeros((n, 266))
    rows[np.arange(n), labels] = 1.0
    rows[np.arange(n), 100 + np.arange(n) % 150] = 1.0
    rows[np.arange(n), 256 + labels] = 1
    np.savetxt(root / "semeion.data", rows, fmt=["%.4f"] * 256 + ["%d"] * 10)
    return labels


# ----------------------------------------------------------------------------- loaders

@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("kmnist", "KMNIST")])
def test_mnist_like(tmp_path, name, folder):
    written = write_mnist(tmp_path, folder, np.random.default_rng(0))
    ds = load_dataset(name, data_root=str(tmp_path))
    images, labels = written["train"]
    assert ds.x_train.shape == (12, 1, 28, 28) and ds.x_train.dtype == torch.float32
    assert torch.allclose(ds.x_train, normalised(images[:, None], name), atol=1e-5)
    assert ds.y_train.dtype == torch.int64 and ds.y_train.tolist() == labels.tolist()
    assert ds.x_test.shape == (5, 1, 28, 28)
    assert ds.y_test.tolist() == written["t10k"][1].tolist()
    assert ds.num_classes == 10 and ds.output_dim == 10 and ds.augment == "crop"
    assert ds.input_shape == (1, 28, 28)


def test_mnist_subset(tmp_path):
    write_mnist(tmp_path, "MNIST", np.random.default_rng(1))
    full = load_dataset("mnist", data_root=str(tmp_path))
    sub = load_dataset("mnist", data_root=str(tmp_path), n=4, seed=2)
    again = load_dataset("mnist", data_root=str(tmp_path), n=4, seed=2)
    assert sub.n == 4 and sub.x_test.shape[0] == 5 and torch.equal(sub.x_train, again.x_train)
    for x, y in zip(sub.x_train, sub.y_train):
        match = [i for i in range(full.n) if torch.equal(full.x_train[i], x)]
        assert len(match) == 1 and full.y_train[match[0]] == y
    with pytest.raises(UserInputError, match="n=13 exceeds the 12 training points"):
        load_dataset("mnist", data_root=str(tmp_path), n=13)


def test_cifar10_layout_labels_and_values(tmp_path):
    write_cifar10(tmp_path)
    ds = load_dataset("cifar10", data_root=str(tmp_path), check_integrity=False)
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (3, 3, 32, 32)
    assert ds.y_train.tolist() == [(b + i) % 10 for b in range(1, 6) for i in range(4)]
    assert ds.y_test.tolist() == [9, 0, 1] and ds.augment == "crop-flip" and ds.num_classes == 10
    mean, std = NORMALIZATION["cifar10"]
    for i in range(20):
        lit = i % 3
        for c in range(3):
            value = 1.0 if c == lit else 0.0
            assert torch.allclose(ds.x_train[i, c, 5, 5], torch.tensor((value - mean[c]) / std[c]))
            corner = (7 / 255 - mean[c]) / std[c]
            assert torch.allclose(ds.x_train[i, c, 0, 0], torch.tensor(corner))


def test_cifar100(tmp_path):
    write_cifar100(tmp_path)
    ds = load_dataset("cifar100", data_root=str(tmp_path), check_integrity=False)
    assert ds.x_train.shape == (6, 3, 32, 32) and ds.x_test.shape == (2, 3, 32, 32)
    assert ds.y_train.tolist() == [(17 * i + 99) % 100 for i in range(6)]
    assert ds.num_classes == 100 and ds.output_dim == 100 and ds.augment == "crop-flip"
    assert torch.allclose(ds.x_train, normalised(cifar_images(6, 0).reshape(6, 3, 32, 32),
                                                 "cifar100"), atol=1e-5)


def test_md5_checked_by_default(tmp_path):
    write_cifar10(tmp_path)
    with pytest.raises(UserInputError, match=r"could not be read.*md5") as info:
        load_dataset("cifar10", data_root=str(tmp_path))
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


def test_svhn_labels_and_layout(tmp_path):
    written = write_svhn(tmp_path, np.random.default_rng(3))
    ds = load_dataset("svhn", data_root=str(tmp_path), check_integrity=False)
    x, y = written["train"]
    assert ds.x_train.shape == (7, 3, 32, 32) and ds.x_test.shape == (3, 3, 32, 32)
    assert torch.allclose(ds.x_train, normalised(x.transpose(3, 2, 0, 1), "svhn"), atol=1e-5)
    assert ds.y_train.tolist() == [1, 2, 3, 4, 5, 6, 7] and ds.y_test.tolist() == [1, 2, 3]
    assert ds.augment == "crop" and ds.num_classes == 10


def test_svhn_label_10_is_digit_0(tmp_path):
    write_svhn(tmp_path, np.random.default_rng(4), n_train=12)
    ds = load_dataset("svhn", data_root=str(tmp_path), check_integrity=False)
    assert ds.y_train.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2]


def test_semeion_split_and_values(tmp_path):
    write_semeion(tmp_path)
    ds = load_dataset("semeion", data_root=str(tmp_path), check_integrity=False)
    assert ds.x_train.shape == (1000, 1, 16, 16) and ds.x_test.shape == (593, 1, 16, 16)
    assert set(torch.cat([ds.x_train, ds.x_test]).unique().tolist()) == {0.0, 1.0}
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        assert torch.equal(x.flatten(1)[:, :10].argmax(1), y)
    assert torch.bincount(torch.cat([ds.y_train, ds.y_test])).tolist() == [160] * 3 + [159] * 7
    assert ds.augment == "crop" and "1000 train / 593 test" in ds.note
    again = load_dataset("semeion", data_root=str(tmp_path), check_integrity=False, seed=5)
    assert torch.equal(ds.y_test, again.y_test), "the split must not depend on seed"


# ----------------------------------------------------------------------------- missing files

@pytest.mark.parametrize("name", VISION_NAMES)
def test_missing_dataset_names_root(tmp_path, name):
    with pytest.raises(UserInputError) as info:
        load_dataset(name, data_root=str(tmp_path), check_integrity=False)
    message = str(info.value)
    assert "\n" not in message and f"dataset '{name}' not found in data root" in message
    assert str(tmp_path) in message and "--download" in message


def test_data_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("GCONV_DATA_ROOT", str(tmp_path / "env-root"))
    with pytest.raises(UserInputError, match="env-root"):
        load_dataset("mnist")
    monkeypatch.delenv("GCONV_DATA_ROOT")
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(UserInputError, match=r"\.cache/global-convergence/data"):
        load_dataset("mnist")
    write_mnist(tmp_path / "env-root", "MNIST", np.random.default_rng(0))
    monkeypatch.setenv("GCONV_DATA_ROOT", str(tmp_path / "env-root"))
    assert load_dataset("mnist").n == 12


def test_unparsable_file_is_a_user_error(tmp_path):
    write_mnist(tmp_path, "MNIST", np.random.default_rng(0))
    (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"\xff" * 16)
    with pytest.raises(UserInputError, match=r"dataset 'mnist' in data root .* could not be read"):
        load_dataset("mnist", data_root=str(tmp_path))
