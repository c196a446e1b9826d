"""How honest `score_ai` is, in distribution and under shift: raw model scores (the plain
baseline) against the calibrated, bounded scores the Predictor reports.

    .venv/bin/python bench/calibration.py [--arch resnet50v2_tiny] [--size 48]
        [--per-class 360] [--epochs 12] [--out bench/results/calibration]

Trains one binary model in-process on `detector sample`'s default fakes and real images,
fits Platt scaling on validation (`detector.verdicts.calibration.fit`), and scores three
test sets: the same distribution; a shifted one (the same kinds of image made at twice the
size and downscaled to the model's, which resamples the traces away); and fakes of three
generator families the model never saw, beside new real images. For each it prints ECE and
NLL raw and calibrated (and their ratio), the extremes of the scores, and writes a
reliability diagram (raw and calibrated curves) to OUT/reliability-<set>.png.
"""

from __future__ import annotations

import argparse
import io
import os
import warnings

import numpy as np
from _measure import batches, machine, print_machine, save_json

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up banners
warnings.filterwarnings("ignore", message=".*structure of `inputs`.*")


def images(seed: int, per_class: int, size: int, family: str | None = None,
           made_at: int | None = None):
    """(pixels, labels): real then fake images through the one preprocessing path; made at
    `made_at` px and downscaled with Pillow when given (a resized repost)."""
    from PIL import Image

    from detector.data.sample import encode, make_image
    from detector.io.preprocess import load_image

    xs, ys = [], []
    for label in (0, 1):
        for i in range(per_class):
            rng = np.random.default_rng([seed, label, i])
            side = made_at or size
            pixels = make_image(label, rng, (side, side), family=family if label else None)
            if made_at:
                buffer = io.BytesIO()
                Image.fromarray(pixels).resize((size, size), Image.BICUBIC).save(buffer, "PNG")
                blob = buffer.getvalue()
            else:
                blob = encode(pixels, ("JPEG", "PNG", "WEBP")[i % 3], rng)
            xs.append(load_image(blob, size)[0])
            ys.append(label)
    return np.stack(xs), np.array(ys, np.float32)


def scores_of(model, pixels: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(model(pixels[i:i + 64].astype("float32"), training=False))
                           [:, 0] for i in range(0, len(pixels), 64)])


def plot(name: str, labels: np.ndarray, raw: np.ndarray, calibrated: np.ndarray,
         out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.calibration import CalibrationDisplay

    from detector.verdicts.calibration import CALIBRATION_BINS

    fig, ax = plt.subplots(figsize=(4.5, 4))
    for scores, label in ((raw, "raw"), (calibrated, "calibrated")):
        CalibrationDisplay.from_predictions(labels, scores, n_bins=CALIBRATION_BINS,
                                            strategy="uniform", ax=ax, name=label)
    ax.set_title(f"Reliability: {name}")
    fig.tight_layout()
    path = os.path.join(out, f"reliability-{name}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50v2_tiny")
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--per-class", type=int, default=360)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--out", default="bench/results/calibration")
    args = parser.parse_args()

    import keras

    from detector.model.architectures import build_model
    from detector.training.fit import FitSettings, fit
    from detector.verdicts.calibration import SCORE_FLOOR, quality
    from detector.verdicts.calibration import fit as fit_platt

    info = machine()
    print_machine(info)
    os.makedirs(args.out, exist_ok=True)
    train_x, train_y = images(100, args.per_class, args.size)
    val_x, val_y = images(300, args.per_class // 3, args.size)

    keras.utils.set_random_seed(0)
    model = build_model(args.arch, image_size=args.size)
    fit(model, batches(train_x, train_y, 16, seed=1), batches(val_x, val_y, 64),
        FitSettings(epochs=args.epochs, lr=1e-3, patience=args.epochs, lr_patience=4))
    calibration, record = fit_platt(val_y, scores_of(model, val_x))
    print(f"calibration on validation: {record['method']} a={record['a']:.3f} "
          f"b={record['b']:.3f}, ECE {record['ece_before']:.4f} -> {record['ece_after']:.4f}",
          flush=True)
    test_sets = {
        "in-distribution": images(500, args.per_class // 3, args.size),
        "resized": images(600, args.per_class // 3, args.size, made_at=2 * args.size),
        "unseen-generators": tuple(np.concatenate(parts) for parts in zip(
            *(images(700 + i, args.per_class // 9, args.size, family=family)
              for i, family in enumerate(("upsampler", "decoder-grid", "lowpass-tint"))),
            strict=True)),
    }
    results = {"calibration": record}
    for name, (x, y) in test_sets.items():
        raw = scores_of(model, x).astype(np.float64)
        calibrated = calibration.apply(raw).astype(np.float64)
        before, after = quality(y, raw), quality(y, calibrated)
        floor = float(np.mean((calibrated <= SCORE_FLOOR) | (calibrated >= 1 - SCORE_FLOOR)))
        results[name] = {"images": len(y), "raw": {**before, "min": float(raw.min()),
                                                    "max": float(raw.max())},
                         "calibrated": {**after, "min": float(calibrated.min()),
                                        "max": float(calibrated.max()),
                                        "at_floor_or_ceiling": floor},
                         "diagram": plot(name, y, raw, calibrated, args.out)}
        ratio = after["ece"] / before["ece"] if before["ece"] else float("nan")
        print(f"{name}: {len(y)} images; ECE raw {before['ece']:.4f}, calibrated "
              f"{after['ece']:.4f} ({ratio:.2f}x); NLL {before['nll']:.3f} -> "
              f"{after['nll']:.3f}; raw scores {raw.min():.2e}..{raw.max():.6f}, "
              f"calibrated {calibrated.min():.2e}..{calibrated.max():.6f} "
              f"({floor:.0%} at the floor or ceiling)", flush=True)
    save_json(os.path.join(args.out, "calibration.json"), {"machine": info, **results})


if __name__ == "__main__":
    main()
