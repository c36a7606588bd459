"""Tests of global_convergence.data: generated sets, digits, .npz, validation, augmentation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from global_convergence.data import (DATASET_NAMES, Dataset, augment_batch, load_dataset,
                                     validate_arrays)
from global_convergence.errors import UserInputError


def raises_one_line(match: str, func, *args, **kwargs) -> str:
    """Call ``func`` expecting a UserInputError whose single-line message matches ``match``."""
    with pytest.raises(UserInputError, match=match) as info:
        func(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- generated sets

@pytest.mark.parametrize("name", ["sine", "random"])
def test_generated_reproducible_and_seed_dependent(name):
    a, b = load_dataset(name, seed=3), load_dataset(name, seed=3)
    c = load_dataset(name, seed=4)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert not torch.equal(a.x_train, c.x_train)
    assert a.x_test is None and a.y_test is None
    assert a.num_classes == 2 and a.output_dim == 1 and a.augment is None


def test_two_moons_matches_make_moons():
    from sklearn.datasets import make_moons

    ds = load_dataset("two-moons", seed=5)
    x, y = make_moons(n_samples=100, noise=None, random_state=5)
    assert ds.x_train.dtype == torch.float32 and ds.x_train.shape == (100, 2)
    assert np.allclose(ds.x_train.numpy(), x.astype(np.float32))
    assert torch.equal(ds.y_train, torch.from_numpy(y).long())
    noisy = load_dataset("two-moons", n=40, noise=0.2, seed=5)
    other = load_dataset("two-moons", n=40, noise=0.2, seed=6)
    assert noisy.n == 40 and not torch.equal(noisy.x_train, other.x_train)
    assert set(noisy.y_train.tolist()) == {0, 1}


def test_sine_labels_follow_formula():
    ds = load_dataset("sine", n=500, seed=1)
    x = ds.x_train
    assert x.shape == (500, 1) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    expected = (torch.sin(20 * x[:, 0].double()) < 0).long()
    assert torch.equal(ds.y_train, expected)
    assert 0.3 < ds.y_train.float().mean() < 0.7
    assert load_dataset("sine").n == 100


def test_random_images():
    ds = load_dataset("random", seed=0)
    assert ds.x_train.shape == (1000, 1, 16, 16) and ds.input_shape == (1, 16, 16)
    assert abs(ds.x_train.mean().item()) < 0.02 and abs(ds.x_train.std().item() - 1) < 0.02
    assert set(ds.y_train.unique().tolist()) == {0, 1}
    assert load_dataset("random", n=10).n == 10


def test_noise_only_for_two_moons_and_valid():
    raises_one_line("noise applies only to 'two-moons'", load_dataset, "sine", noise=0.1)
    raises_one_line(r"noise=-0\.1 is not valid", load_dataset, "two-moons", noise=-0.1)


# ----------------------------------------------------------------------------- digits stand-in

def test_digits_split_and_range():
    from sklearn.datasets import load_digits

    ds = load_dataset("digits")
    assert ds.x_train.shape == (1000, 1, 16, 16) and ds.x_test.shape == (797, 1, 16, 16)
    assert ds.x_train.min() >= 0 and ds.x_train.max() <= 1 and ds.x_train.max() > 0.9
    assert ds.num_classes == 10 and ds.output_dim == 10 and ds.augment == "crop"
    assert "stand-in" in ds.note and "Semeion" in ds.note
    counts = torch.bincount(torch.cat([ds.y_train, ds.y_test]), minlength=10)
    assert counts.tolist() == np.bincount(load_digits().target).tolist()
    other = load_dataset("digits", seed=9)
    assert torch.equal(ds.x_test, other.x_test), "the split must not depend on seed"


def test_digits_upsampled_bilinearly():
    from sklearn.datasets import load_digits

    images = torch.from_numpy(load_digits().images.astype(np.float32) / 16).unsqueeze(1)
    up = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
    ds = load_dataset("digits")
    rows = {tuple(r) for r in up.flatten(1).numpy().round(5).tolist()}
    assert all(tuple(r) in rows for r in ds.x_train[:20].flatten(1).numpy().round(5).tolist())


def test_n_subsetting():
    full = load_dataset("digits")
    a = load_dataset("digits", n=50, seed=1)
    b = load_dataset("digits", n=50, seed=1)
    c = load_dataset("digits", n=50, seed=2)
    assert a.n == 50 and a.x_test.shape[0] == 797
    assert torch.equal(a.x_train, b.x_train) and not torch.equal(a.x_train, c.x_train)
    full_rows = {tuple(r) for r in full.x_train.flatten(1).tolist()}
    assert all(tuple(r) in full_rows for r in a.x_train.flatten(1).tolist())
    raises_one_line(r"n=1001 exceeds the 1000 training points of dataset 'digits'",
                    load_dataset, "digits", n=1001)
    raises_one_line(r"n=1 is too small", load_dataset, "digits", n=1)
    raises_one_line(r"n=1 is too small", load_dataset, "sine", n=1)


# ----------------------------------------------------------------------------- names, options

def test_unknown_name_lists_valid_names():
    message = raises_one_line("dataset 'imagenet' is not known", load_dataset, "imagenet")
    assert all(name in message for name in DATASET_NAMES) and ".npz" in message


def test_bad_options():
    raises_one_line(r"loss='hinge' is not known; expected one of ce, mse", load_dataset, "sine",
                    loss="hinge")
    raises_one_line(r"seed=-1 is not valid", load_dataset, "sine", seed=-1)
    raises_one_line(r"n='5' is not an integer", load_dataset, "sine", n="5")


def test_dataset_output_dim():
    x = torch.zeros(4, 3)
    assert Dataset("a", x, torch.tensor([0, 1, 0, 1]), None, None, 2).output_dim == 1
    assert Dataset("b", x, torch.tensor([0, 1, 2, 1]), None, None, 5).output_dim == 5
    reg = Dataset("c", x, torch.zeros(4, 7), None, None, None)
    assert reg.output_dim == 7 and reg.n == 4 and reg.input_shape == (3,)


# ----------------------------------------------------------------------------- user .npz files

def write_npz(tmp_path, **arrays) -> str:
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return str(path)


def test_npz_classification_with_test_split(tmp_path):
    rng = np.random.default_rng(0)
    path = write_npz(tmp_path, x=rng.normal(size=(30, 5)), y=np.arange(30) % 3,
                     x_test=rng.normal(size=(6, 5)), y_test=np.array([0, 1, 2, 2, 1, 0]))
    ds = load_dataset(path)
    assert ds.name.startswith("npz:") and ds.name.endswith("data.npz")
    assert ds.x_train.dtype == torch.float32 and ds.x_train.shape == (30, 5)
    assert ds.y_train.dtype == torch.int64 and ds.num_classes == 3 and ds.output_dim == 3
    assert ds.x_test.shape == (6, 5) and ds.y_test.tolist() == [0, 1, 2, 2, 1, 0]
    sub = load_dataset(path, n=10, seed=4)
    assert sub.n == 10 and sub.num_classes == 3 and sub.x_test.shape == (6, 5)


def test_npz_images_and_float_integral_labels(tmp_path):
    path = write_npz(tmp_path, x=np.ones((4, 1, 6, 6), np.float32),
                     y=np.array([0.0, 1.0, 1.0, 0.0]))
    ds = load_dataset(path)
    assert ds.input_shape == (1, 6, 6) and ds.y_train.dtype == torch.int64
    assert ds.num_classes == 2 and ds.output_dim == 1 and ds.augment is None


def test_npz_mse_targets(tmp_path):
    path = write_npz(tmp_path, x=np.zeros((5, 2)), y=np.linspace(-1, 1, 5))
    ds = load_dataset(path, loss="mse")
    assert ds.y_train.shape == (5, 1) and ds.y_train.dtype == torch.float32
    assert ds.num_classes is None and ds.output_dim == 1
    assert np.allclose(ds.y_train[:, 0].numpy(), np.linspace(-1, 1, 5))
    wide = load_dataset(write_npz(tmp_path, x=np.zeros((5, 2)), y=np.ones((5, 3)) / 3),
                        loss="mse")
    assert wide.output_dim == 3 and wide.num_classes is None
    labels = load_dataset(write_npz(tmp_path, x=np.zeros((4, 2)), y=np.array([0, 1, 3, 1])),
                          loss="mse")
    assert labels.num_classes == 4 and labels.y_train.dtype == torch.int64


@pytest.mark.parametrize("arrays, loss, match", [
    (dict(x=np.array([[np.nan, 1.0], [np.nan, 2.0]]), y=np.array([0, 1])), "ce",
     r"x has 2 NaN and 0 inf values; expected only finite numbers"),
    (dict(x=np.array([[np.inf, 1.0], [0.0, 2.0]]), y=np.array([0, 1])), "ce",
     r"x has 0 NaN and 1 inf values"),
    (dict(x=np.zeros((2, 2)), y=np.array([0.5, np.inf])), "mse", r"y has 0 NaN and 1 inf values"),
    (dict(x=np.zeros((3, 2)), y=np.array([0, -1, 1])), "ce", r"label -1 is outside 0\.\.1"),
    (dict(x=np.zeros((3, 2)), y=np.array([0.0, 0.5, 1.0])), "ce", r"non-integer label 0\.5"),
    (dict(x=np.zeros((3, 2)), y=np.array([0, 0, 0])), "ce", r"needs at least 2 classes"),
    (dict(x=np.zeros((5, 2)), y=np.array([0, 1, 0, 1])), "ce",
     r"x has 5 samples but y has 4; expected the same number"),
    (dict(x=np.zeros((0, 2)), y=np.zeros(0, np.int64)), "ce",
     r"the dataset is empty \(0 samples\)"),
    (dict(x=np.zeros((4, 2, 2)), y=np.array([0, 1, 0, 1])), "ce",
     r"x has shape \(4, 2, 2\) \(3-D\); expected 2-D \(n, features\) or 4-D"),
    (dict(x=np.zeros((4, 2)), y=np.zeros((4, 2), np.int64)), "ce", r"expects a 1-D vector"),
    (dict(x=np.zeros((3, 2)), y=np.array([0, 1, 2]), x_test=np.zeros((2, 2)),
          y_test=np.array([1, 5])), "ce", r"test set: label 5 is outside 0\.\.2"),
    (dict(x=np.zeros((3, 2)), y=np.array([0, 1, 2]), x_test=np.zeros((2, 3)),
          y_test=np.array([1, 0])), "ce", r"x_test has samples of shape \(3,\); expected \(2,\)"),
    (dict(x=np.zeros((3, 2))), "ce", r"array 'y' is missing"),
    (dict(x=np.zeros((3, 2)), y=np.array([0, 1, 2]), x_test=np.zeros((2, 2))), "ce",
     r"only one of 'x_test' and 'y_test'"),
])
def test_npz_validation_errors(tmp_path, arrays, loss, match):
    path = write_npz(tmp_path, **arrays)
    message = raises_one_line(match, load_dataset, path, loss=loss)
    assert message.startswith(f"npz:{path}")


def test_npz_missing_file(tmp_path):
    raises_one_line("does not exist", load_dataset, str(tmp_path / "nope.npz"))


def test_validate_arrays_accepts_tensors():
    validate_arrays(torch.zeros(3, 2), torch.tensor([0, 1, 1]), loss="ce", name="t")
    validate_arrays(np.zeros((3, 1, 4, 4)), np.zeros((3, 2)), loss="mse", name="t")
    raises_one_line(r"^t: label 3 is outside 0\.\.2", validate_arrays, torch.zeros(2, 2),
                    torch.tensor([0, 3]), loss="ce", name="t", num_classes=3)
    raises_one_line(r"x has dtype <U1; expected real numbers", validate_arrays,
                    np.array([["a"], ["b"]]), np.array([0, 1]), loss="ce", name="t")


# ----------------------------------------------------------------------------- augmentation

def windows(image: torch.Tensor, padding: int) -> list[torch.Tensor]:
    """All crops of ``image`` (C, H, W) padded with ``padding`` zeros."""
    _, h, w = image.shape
    padded = F.pad(image, (padding,) * 4)
    return [padded[:, i:i + h, j:j + w] for i in range(2 * padding + 1)
            for j in range(2 * padding + 1)]


def is_window(out: torch.Tensor, image: torch.Tensor, padding: int) -> bool:
    return any(torch.equal(out, win) for win in windows(image, padding))


@pytest.mark.parametrize("shape, padding", [((24, 1, 16, 16), 2), ((24, 3, 32, 32), 4)])
def test_augment_crop_is_a_padded_window_never_flipped(shape, padding):
    x = torch.rand(shape) + 0.5                       # no zeros, so padding is recognisable
    out = augment_batch(x, "crop", torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert all(is_window(out[i], x[i], padding) for i in range(len(x)))
    assert not torch.equal(out, x), "some sample must have moved"
    assert (out == 0).any(), "zero padding must show for some shifted sample"


def test_augment_crop_flip_flips_some():
    x = torch.rand(32, 3, 32, 32) + 0.5
    out = augment_batch(x, "crop-flip", torch.Generator().manual_seed(1))
    plain = [is_window(out[i], x[i], 4) for i in range(32)]
    mirrored = [is_window(out[i].flip(-1), x[i], 4) for i in range(32)]
    assert all(p or m for p, m in zip(plain, mirrored))
    assert 0 < sum(mirrored) < 32


def test_augment_deterministic_with_generator():
    x = torch.randn(16, 3, 32, 32)
    a = augment_batch(x, "crop-flip", torch.Generator().manual_seed(7))
    b = augment_batch(x, "crop-flip", torch.Generator().manual_seed(7))
    c = augment_batch(x, "crop-flip", torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert augment_batch(x, "crop").shape == x.shape          # global RNG without a generator


def test_augment_bad_input():
    raises_one_line(r"augmentation 'rotate' is not known; expected one of crop-flip, crop",
                    augment_batch, torch.zeros(2, 1, 8, 8), "rotate")
    raises_one_line(r"got a batch of shape \(2, 8\); expected images", augment_batch,
                    torch.zeros(2, 8), "crop")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_augment_on_cuda_matches_cpu_with_cpu_generator():
    x = torch.randn(8, 3, 32, 32)
    cpu = augment_batch(x, "crop-flip", torch.Generator().manual_seed(3))
    gpu = augment_batch(x.cuda(), "crop-flip", torch.Generator().manual_seed(3))
    assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)
