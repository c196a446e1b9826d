"""Synthetic sample buckets: deterministic, laid out as promised, and carrying real traces."""

from __future__ import annotations

import posixpath
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detector.data.sample import SampleSpec, make_image, write_sample
from detector.io import storage
from detector.io.preprocess import ImageError, load_image

pytestmark = pytest.mark.unit


def _files(root: Path) -> dict[str, bytes]:
    """Relative key -> bytes of every object below `root`."""
    prefix = str(root).rstrip("/") + "/"
    return {
        o.uri[len(prefix) :]: storage.read_bytes(o.uri) for o in storage.list_objects(str(root))
    }


def _images(root: Path) -> dict[str, bytes]:
    return {k: v for k, v in _files(root).items() if not posixpath.basename(k).startswith("bad-")}


def _decoded(root: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixels through the one shared decode path, and labels (1 = fake) from the folder."""
    items = sorted(_images(root).items())
    pixels = np.stack([load_image(data, size)[0] for _, data in items])
    labels = np.array([key.startswith("fake/") for key, _ in items], dtype=int)
    return pixels, labels


def test_same_spec_writes_identical_bytes_and_seed_changes_them(tmp_path):
    spec = SampleSpec(per_class=6, size=32, seed=3, corrupt=4)
    write_sample(str(tmp_path / "a"), spec)
    write_sample(str(tmp_path / "b"), spec)
    write_sample(str(tmp_path / "c"), SampleSpec(per_class=6, size=32, seed=4, corrupt=4))
    a, b, c = (_files(tmp_path / name) for name in "abc")
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[key] != c[key] for key in _images(tmp_path / "a"))


def test_counts_layout_and_odd_keys(tmp_path):
    out = f"file://{tmp_path}/bucket"  # URIs, not only plain paths
    summary = write_sample(out, SampleSpec(per_class=20, size=48, corrupt=4))
    assert summary["real"] == summary["fake"] == 20
    assert summary["corrupt"] == 8
    assert summary["out"] == out
    files = _files(tmp_path / "bucket")
    assert len(files) == 48
    per_class = Counter(key.split("/")[0] for key in files)
    assert per_class == {"real": 24, "fake": 24}
    # Nested sub-prefixes: class/batch-NN/name, several folders per class.
    assert all(len(key.split("/")) == 3 for key in files)
    assert len({posixpath.dirname(k) for k in files if k.startswith("real/")}) >= 3
    assert any(" " in key and "ü" in key for key in files)
    for key, data in _images(tmp_path / "bucket").items():
        pixels, info = load_image(data, 48)
        assert pixels.shape == (48, 48, 3)
        assert (info.width, info.height) == (48, 48)
        assert key.lower().endswith({"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}[info.format])


def test_default_mix_is_the_same_for_both_classes(tmp_path):
    summary = write_sample(str(tmp_path), SampleSpec(per_class=12))
    seen: dict[str, Counter] = {"real": Counter(), "fake": Counter()}
    for key, data in _images(tmp_path).items():
        _, info = load_image(data, 32)
        seen[key.split("/")[0]][(info.format, info.width, info.height)] += 1
    assert seen["real"] == seen["fake"]
    assert {fmt for fmt, _, _ in seen["real"]} == {"JPEG", "PNG", "WEBP"}
    assert len({(w, h) for _, w, h in seen["real"]}) >= 3
    assert summary["formats"]["real"] == summary["formats"]["fake"]
    assert summary["sizes"]["real"] == summary["sizes"]["fake"]


@pytest.mark.parametrize(
    ("size", "real_dims", "fake_dims"), [(None, (640, 480), (512, 512)), (40, (40, 40), (40, 40))]
)
def test_biased_reproduces_the_format_shortcut(tmp_path, size, real_dims, fake_dims):
    summary = write_sample(str(tmp_path), SampleSpec(per_class=4, size=size, biased=True))
    assert summary["formats"] == {"real": {"JPEG": 4}, "fake": {"PNG": 4}}
    for key, data in _images(tmp_path).items():
        _, info = load_image(data, 32)
        real = key.startswith("real/")
        assert info.format == ("JPEG" if real else "PNG")
        assert (info.width, info.height) == (real_dims if real else fake_dims)


def test_corrupt_files_are_really_undecodable(tmp_path):
    write_sample(str(tmp_path), SampleSpec(per_class=2, size=32, corrupt=4))
    bad = {k: v for k, v in _files(tmp_path).items() if posixpath.basename(k).startswith("bad-")}
    assert len(bad) == 8
    codes = {}
    for key, data in bad.items():
        with pytest.raises(ImageError) as caught:
            load_image(data, 32)
        codes[posixpath.basename(key)] = caught.value.code
    assert codes["bad-000-empty.jpg"] == "empty"
    assert codes["bad-001-truncated.jpg"] == "truncated"
    assert codes["bad-002-random.jpg"] in {"not-an-image", "corrupt", "unsupported-format"}
    assert codes["bad-003-text.png"] == "not-an-image"


def test_make_image_shape_and_determinism():
    first = make_image(1, np.random.default_rng([7, 1, 0]), (40, 24))
    again = make_image(1, np.random.default_rng([7, 1, 0]), (40, 24))
    assert first.shape == (24, 40, 3)
    assert first.dtype == np.uint8
    assert np.array_equal(first, again)
    odd = make_image(0, np.random.default_rng(1), (33, 17))  # odd sides must work too
    assert odd.shape == (17, 33, 3)


def test_spec_rejects_nonsense():
    with pytest.raises(ValueError):
        SampleSpec(per_class=-1)
    with pytest.raises(ValueError):
        SampleSpec(size=2)


# --- the traces are real: spectral features separate the classes, brightness does not ---------


def _spectral_features(pixels: np.ndarray) -> np.ndarray:
    """Log energies of the noise residual's spectrum: Nyquist peaks, N/8 grid, overall level."""
    grey = pixels.astype(np.float64).mean(axis=-1)
    n = grey.shape[0]
    padded = np.pad(grey, 1, mode="reflect")
    smooth = sum(padded[i : i + n, j : j + n] for i in range(3) for j in range(3)) / 9
    residual = grey - smooth
    power = np.abs(np.fft.fft2(residual)) ** 2
    freq = np.abs(np.fft.fftfreq(n))
    high = np.maximum(freq[:, None], freq[None, :]) > 0.25
    floor = np.median(power[high]) + 1e-9
    half, eighth = n // 2, n // 8
    return np.log(
        [
            power[half, half] / floor + 1e-9,  # checkerboard
            (power[half, 0] + power[0, half]) / floor + 1e-9,  # row/column Nyquist
            (power[0, eighth] + power[eighth, 0]) / floor + 1e-9,  # period-8 grid
            residual.var() + 1e-9,
            floor,  # how much high-frequency noise there is at all
        ]
    )


def _fit_logistic(x: np.ndarray, y: np.ndarray, steps: int = 2000) -> tuple[np.ndarray, float]:
    w, b = np.zeros(x.shape[1]), 0.0
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(x @ w + b)))
        w -= 0.5 * (x.T @ (p - y) / len(y) + 1e-3 * w)
        b -= 0.5 * float(np.mean(p - y))
    return w, b


def _held_out_accuracy(train_x, train_y, test_x, test_y) -> float:
    mean, std = train_x.mean(axis=0), train_x.std(axis=0) + 1e-9
    w, b = _fit_logistic((train_x - mean) / std, train_y)
    predicted = ((test_x - mean) / std) @ w + b > 0
    return float(np.mean(predicted == test_y))


@pytest.fixture(scope="module")
def two_samples(tmp_path_factory):
    """Train on seed 0, test on seed 1: held out by construction. Both use the format mix."""
    root = tmp_path_factory.mktemp("traces")
    for seed in (0, 1):
        write_sample(str(root / f"s{seed}"), SampleSpec(per_class=100, size=64, seed=seed))
    return _decoded(root / "s0", 64), _decoded(root / "s1", 64)


def test_spectral_traces_separate_real_from_fake(two_samples):
    (train_px, train_y), (test_px, test_y) = two_samples
    train_x = np.stack([_spectral_features(p) for p in train_px])
    test_x = np.stack([_spectral_features(p) for p in test_px])
    assert _held_out_accuracy(train_x, train_y, test_x, test_y) >= 0.9


def test_brightness_and_colour_do_not_separate(two_samples):
    (train_px, train_y), (test_px, test_y) = two_samples
    brightness = [p.reshape(len(p), -1).mean(axis=1, keepdims=True) for p in (train_px, test_px)]
    assert _held_out_accuracy(brightness[0], train_y, brightness[1], test_y) < 0.65
    colour = [p.reshape(len(p), -1, 3).mean(axis=1) for p in (train_px, test_px)]
    assert _held_out_accuracy(colour[0], train_y, colour[1], test_y) < 0.65


# --- generator families: each in its own folder, and told apart by their traces -------------


def test_generator_families_get_their_own_folders_formats_and_sizes(tmp_path):
    summary = write_sample(str(tmp_path), SampleSpec(per_class=36, generators=3, corrupt=3))
    assert summary["generators"] == {"upsampler": 12, "decoder-grid": 12, "lowpass-tint": 12}
    assert summary["formats"]["fake"] == summary["formats"]["real"]
    keys = list(_files(tmp_path))
    families = Counter(k.split("/")[1] for k in keys if k.startswith("fake/"))
    assert families == {"upsampler": 13, "decoder-grid": 13, "lowpass-tint": 13}  # 12 + 1 bad each
    for family in summary["generators"]:
        # Every family cycles through the formats and sizes on its own: none keeps to one.
        names = [k for k in _images(tmp_path) if k.startswith(f"fake/{family}/")]
        assert {posixpath.splitext(k)[1] for k in names} == {".jpg", ".png", ".webp"}
        sizes = {Image.open(tmp_path / k).size for k in names}
        assert len(sizes) == 4
    with pytest.raises(ValueError, match="at most 4"):
        SampleSpec(generators=5)


def test_generator_families_are_told_apart_by_their_traces(tmp_path):
    """Held out by seed: a linear model on spectral energies and mean colour names the family
    (or real) of unseen images; the families would be no use to attribution otherwise."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    generators, data = 4, []
    for seed in (0, 1):
        root = tmp_path / f"s{seed}"
        write_sample(str(root), SampleSpec(per_class=80, size=64, seed=seed,
                                           generators=generators))
        items = sorted(_images(root).items())
        pixels = [load_image(blob, 64)[0] for _, blob in items]
        features = np.stack([np.r_[_spectral_features(p), p.reshape(-1, 3).mean(axis=0)]
                             for p in pixels])
        names = [key.split("/")[1] if key.startswith("fake/") else "real" for key, _ in items]
        data.append((features, np.array(names)))
    (train_x, train_y), (test_x, test_y) = data
    assert len(set(test_y)) == generators + 1
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    model.fit(train_x, train_y)
    assert np.mean(model.predict(test_x) == test_y) >= 0.9
