"""Does an image carry a real photograph's fine-scale noise? The open-set check a binary
classifier cannot make on its own.

A classifier learns the traces of the generators it was trained on. An image from a
generator it never saw lacks those traces and scores as `real`: measured on the sample
data, 78-98% of a held-out family's test images did, whichever family was held out, with
nothing else to flag them (the attribution head only speaks for images called AI, and
distances in the classifier's own feature space flagged the held-out family no more often
than unseen real images).

What the real training images share is the fine-scale noise of a camera pipeline (sensor
noise, demosaicing, the compression they went through), and generators that render at a
lower resolution and upsample, or denoise, leave a different residual spectrum (Durall et
al., CVPR 2020; Corvi et al., ICASSP 2023): too little energy in the top octave, or peaks
at the periods of their upsampling. So training fits a one-class model of the real
images' residual spectra (`fit`: a Gaussian, Ledoit-Wolf shrunk, over FEATURES numbers per
image), with a threshold that keeps QUANTILE of the validation split's real images inside;
the card stores it (`domain["residual"]`).

An image outside it gets an `unlike-real` finding. The verdict rule
(`detector.verdicts.verdict`) then refuses the classifier a `real` verdict (`uncertain`
instead, generator `unknown`); `ai-generated` stands, as the finding agrees with it.
Real photographs that lost their noise come out `uncertain` too. Measured on real sample
images (tests/verdicts/test_residual.py): smoothed by a 1 px Gaussian blur, as denoisers
do, 0.92 are flagged; upscaled 2x, 0.58; re-saved as JPEG at quality 30, 0.02, and at
quality 10, 0.13. The card's `metrics["residual"]` says how many of the test split's real
images were flagged. A card without the model (trained before this) flags nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from detector.verdicts.provenance import Evidence

SOURCE, KIND = "familiarity", "unlike-real"
QUANTILE = 0.99  # of validation real images the threshold keeps inside
BANDS = 8  # radial bands of the residual's power spectrum, centre to corner
PERIODS = (2, 4, 8)  # upsampling periods: 2x, 4x and 8x grids (latent decoders use 8)
FEATURES = BANDS + 3 * len(PERIODS)
_FLOOR = 1e-3  # power floor before the log: flat regions stay finite
# Images per pass, whatever the batch a scan or a server hands over: memory stays a few
# float64 copies of 4 images, and per image 4 measured fastest at 224 px (1, 8 and 16
# slower: bench/residual.py).
CHUNK = 4


def features(pixels: np.ndarray) -> np.ndarray:
    """(N, FEATURES) float64 for uint8 images (N, S, S, 3): the log power of the grey
    residual (image minus its 3x3 binomial blur) averaged over BANDS radial bands, then at
    each period's frequency along x, along y and on the diagonal."""
    pixels = np.asarray(pixels)
    if len(pixels) <= CHUNK:
        return _features(pixels)
    return np.concatenate([_features(pixels[i:i + CHUNK])
                           for i in range(0, len(pixels), CHUNK)])


def _features(pixels: np.ndarray) -> np.ndarray:
    # float64 throughout: NumPy's float32 FFT measured 4x slower than its float64 one here,
    # and channel slices convert faster than a mean over the last axis.
    grey = (pixels[..., 0] + pixels[..., 1].astype(np.float64) + pixels[..., 2]) / 3
    size = grey.shape[1]
    padded = np.pad(grey, ((0, 0), (1, 1), (1, 1)), mode="reflect")
    rows = (padded[:, :-2] + 2 * padded[:, 1:-1] + padded[:, 2:]) / 4  # [1 2 1] / 4, then
    blurred = (rows[:, :, :-2] + 2 * rows[:, :, 1:-1] + rows[:, :, 2:]) / 4  # across
    # A real signal's spectrum is symmetric: the half that rfft2 gives holds all of it.
    power = np.abs(np.fft.rfft2(grey - blurred)) ** 2 / size**2
    radial = power.reshape(len(power), -1) @ _band_means(size)
    points = [power[:, y, x] for period in PERIODS
              for y, x in ((0, size // period), (size // period, 0),
                           (size // period, size // period))]
    return np.log(np.concatenate([radial, np.stack(points, axis=1)], axis=1) + _FLOOR)


@functools.lru_cache(maxsize=8)
def _band_means(size: int) -> np.ndarray:
    """(S * (S // 2 + 1), BANDS): the matrix that averages an rfft2 power spectrum
    over each radial band of the full spectrum (0 the lowest, BANDS - 1 the corner, where
    both axes reach Nyquist), counting each column the half spectrum stands in for twice."""
    fy, fx = np.meshgrid(np.fft.fftfreq(size), np.fft.rfftfreq(size), indexing="ij")
    radius = np.sqrt(fx**2 + fy**2) / np.sqrt(0.5)
    band = np.minimum((radius * BANDS).astype(int), BANDS - 1).ravel()
    column = np.broadcast_to(np.arange(fx.shape[1]), fx.shape).ravel()
    twice = np.where((column > 0) & (2 * column < size), 2.0, 1.0)
    weights = (band[:, None] == np.arange(BANDS)) * twice[:, None]
    return weights / weights.sum(axis=0)


@dataclass(frozen=True)
class Model:
    """The real images' residual spectra: mean, precision (inverse covariance) and the
    squared Mahalanobis distance beyond which an image is unlike them."""

    mean: np.ndarray
    precision: np.ndarray
    threshold: float
    record: Mapping  # the card's dict, with how it was fitted

    @classmethod
    def from_card(cls, domain: Mapping | None) -> Model | None:
        """The model a card's domain holds, or None (a card from before, or no reals)."""
        fitted = (domain or {}).get("residual")
        if not fitted:
            return None
        return cls(np.asarray(fitted["mean"]), np.asarray(fitted["precision"]),
                   float(fitted["threshold"]), fitted)

    def distances(self, pixels: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance of each image's residual spectrum from the reals'."""
        if not len(pixels):
            return np.zeros((0,))
        return _squared_distances(features(pixels), self.mean, self.precision)

    def findings(self, pixels: np.ndarray) -> list[Evidence | None]:
        """An `unlike-real` finding per image outside the model, else None."""
        return [finding(d, self.threshold) for d in self.distances(pixels)]


def finding(distance: float, threshold: float) -> Evidence | None:
    """The `unlike-real` finding for an image at `distance` (None within `threshold`)."""
    if distance <= threshold:
        return None
    return Evidence(SOURCE, KIND, "info", "its fine-scale noise is unlike the real training "
                    f"images' (residual spectrum distance {distance:.0f}, over {threshold:.0f})")


def fit(train: np.ndarray, val: np.ndarray) -> dict:
    """The card's record from FEATURES rows of real training and validation images; {}
    with too few of either to fit (then nothing is flagged)."""
    from sklearn.covariance import LedoitWolf

    if len(train) < 2 * FEATURES or len(val) < 10:
        return {}
    estimate = LedoitWolf().fit(train)
    distances = _squared_distances(val, estimate.location_, estimate.precision_)
    threshold = float(np.quantile(distances, QUANTILE, method="higher"))
    return {"mean": estimate.location_.tolist(), "precision": estimate.precision_.tolist(),
            "threshold": threshold, "quantile": QUANTILE, "fitted_on": "train",
            "threshold_on": "val", "images": len(train), "val_images": len(val)}


def _squared_distances(rows: np.ndarray, mean: np.ndarray, precision: np.ndarray
                       ) -> np.ndarray:
    """Squared Mahalanobis distance of each feature row from `mean`."""
    centred = rows - mean
    return np.einsum("ij,jk,ik->i", centred, precision, centred)


def check(card_domain: Mapping | None, pixels: np.ndarray) -> list[Evidence | None]:
    """`Model.findings` for a card's recorded model; all None when it has none."""
    model = Model.from_card(card_domain)
    return model.findings(pixels) if model is not None else [None] * len(pixels)


def same(domains: Sequence[Mapping | None]) -> dict:
    """The one residual model every domain holds (an ensemble of models trained on the
    same shards), or {} when they differ or one has none."""
    fitted = [(d or {}).get("residual") or {} for d in domains]
    return fitted[0] if fitted and all(f and f == fitted[0] for f in fitted) else {}


def unlike_real(evidence) -> bool:
    """True when `evidence` holds an `unlike-real` finding."""
    return any(e.source == SOURCE and e.kind == KIND for e in evidence)
