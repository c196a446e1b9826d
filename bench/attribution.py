"""What the attribution head costs and gives: the same model trained binary-only (the
plain baseline) and with the head, on `detector sample` generator families.

    .venv/bin/python bench/attribution.py [--arch resnet50v2_tiny] [--size 48]
        [--per-family 120] [--epochs 16] [--seeds 0,1] [--json OUT]

For each seed, on real images and three families (JPEG, PNG and WebP, decoded through the
one preprocessing path), trains in one process:

1. binary-only: test ROC AUC, training seconds (the baseline);
2. with the head over the three families: test ROC AUC (the issue asks it to stay within
   0.01 of the baseline), attribution accuracy and macro-F1 on the test fakes, the open-set
   rule fitted on validation and its test shares (named correctly, misattributed, unknown),
   and training seconds as a ratio of the baseline's;
3. with the head over two families, the third held out: what its test images get
   (called real, `unknown`, misattributed), as `evaluate --holdout-generator` reports it;
   and whether a feature-space distance would flag them instead: the Mahalanobis distance
   of the features the heads read to the nearest class (real, each training family), past
   the distance 95% of validation images stay within, against the share of unseen real
   images it flags (the false alarms a user would get).
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np
from _measure import batches, machine, print_machine, save_json

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up banners
# Keras warns on every call of a functional model with a bare tensor; the calls are ours.
warnings.filterwarnings("ignore", message=".*structure of `inputs`.*")

FAMILIES = ("upsampler", "decoder-grid", "lowpass-tint")


def family_arrays(seed: int, per_family: int, families: tuple[str, ...], size: int):
    """Pixels, binary labels and generator indices (-1 for real): as many real images as
    fakes, each family cycling through the three formats."""
    from detector.data.sample import encode, make_image
    from detector.io.preprocess import load_image

    xs, labels, indices = [], [], []
    for index, family in enumerate((None, *families)):
        count = per_family * (len(families) if family is None else 1)
        for i in range(count):
            rng = np.random.default_rng([seed, index, i])
            pixels = make_image(0 if family is None else 1, rng, (size, size), family=family)
            xs.append(load_image(encode(pixels, ("JPEG", "PNG", "WEBP")[i % 3], rng), size)[0])
            labels.append(0 if family is None else 1)
            indices.append(-1 if family is None else index - 1)
    return np.stack(xs), np.array(labels, np.float32), np.array(indices, np.int64)


def train(arch: str, size: int, generators: int, data: dict, epochs: int, seed: int):
    """(model, seconds) trained on data["train"], early-stopped on data["val"]."""
    import keras

    from detector.model.architectures import build_model
    from detector.training.fit import FitSettings, fit

    def targets(split):
        _, labels, indices = data[split]
        return np.column_stack([labels, indices]).astype(np.float32) if generators else labels

    keras.utils.set_random_seed(seed)
    model = build_model(arch, image_size=size, generators=generators)
    started = time.perf_counter()
    fit(model, batches(data["train"][0], targets("train"), 16, seed=seed),
        batches(data["val"][0], targets("val"), 64),
        FitSettings(epochs=epochs, lr=1e-3, patience=epochs, lr_patience=4))
    return model, time.perf_counter() - started


def outputs(model, pixels: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(model(pixels[i:i + 64].astype("float32"), training=False))
                           .reshape(len(pixels[i:i + 64]), -1) for i in range(0, len(pixels), 64)])


def feature_distance(model, data: dict, unseen: np.ndarray, real: np.ndarray,
                     quantile: float = 0.95) -> dict:
    """Shares of `unseen` (a held-out family) and `real` (real images the model never saw)
    flagged as far from the training data: Mahalanobis distance of the features the heads
    read (the input of the `score_ai` layer) to the nearest class mean, with one covariance
    shrunk by Ledoit-Wolf and fitted on the training split, past its `quantile` on the
    validation split."""
    import keras
    from sklearn.covariance import LedoitWolf

    from detector.model.architectures.heads import SCORE_LAYER

    base = keras.Model(model.input, model.get_layer(SCORE_LAYER).input)

    def features(pixels):
        return outputs(base, pixels)  # (N, features), in the same batches

    def classes(split):  # 0 real, 1 + i family i
        _, labels, indices = data[split]
        return np.where(labels == 0, 0, 1 + indices).astype(int)

    train, kinds = features(data["train"][0]), classes("train")
    means = np.stack([train[kinds == k].mean(axis=0) for k in np.unique(kinds)])
    precision = LedoitWolf().fit(train - means[kinds]).precision_

    def distance(feats):
        gaps = feats[:, None, :] - means[None]
        return np.einsum("nkd,de,nke->nk", gaps, precision, gaps).min(axis=1)

    limit = float(np.quantile(distance(features(data["val"][0])), quantile))
    return {"quantile": quantile,
            "held_out_flagged": round(float(np.mean(distance(features(unseen)) > limit)), 4),
            "real_flagged": round(float(np.mean(distance(features(real)) > limit)), 4)}


def run_seed(args, seed: int) -> dict:
    from sklearn.metrics import roc_auc_score

    from detector.training.attribution import attribution_metrics
    from detector.verdicts.attribution import fit_threshold, name

    def split_data(families):
        return {split: family_arrays(base + seed * 1000, count, families, args.size)
                for split, base, count in (("train", 100, args.per_family),
                                           ("val", 300, args.per_family // 3),
                                           ("test", 500, args.per_family // 3))}

    data = split_data(FAMILIES)
    test_x, test_labels, test_indices = data["test"]
    result: dict = {"seed": seed}

    binary, seconds = train(args.arch, args.size, 0, data, args.epochs, seed)
    result["binary_only"] = {"roc_auc": round(float(roc_auc_score(
        test_labels, outputs(binary, test_x)[:, 0])), 4), "seconds": round(seconds, 1)}

    headed, seconds = train(args.arch, args.size, len(FAMILIES), data, args.epochs, seed)
    val = outputs(headed, data["val"][0])
    known = data["val"][2] >= 0
    rule = fit_threshold(val[known, 1:], data["val"][2][known])
    test = outputs(headed, test_x)
    truth = [FAMILIES[i] if i >= 0 else None for i in test_indices]
    metrics = attribution_metrics(truth, test[:, 1:], FAMILIES, rule)
    result["with_head"] = {
        "roc_auc": round(float(roc_auc_score(test_labels, test[:, 0])), 4),
        "seconds": round(seconds, 1),
        "attribution_accuracy": round(metrics["accuracy"], 4),
        "macro_f1": round(metrics["macro_f1"], 4), "open_set": metrics["open_set"],
        "rule_threshold": rule["threshold"]}

    held_out, kept = FAMILIES[-1], FAMILIES[:-1]
    partial = split_data(kept)
    model, _ = train(args.arch, args.size, len(kept), partial, args.epochs, seed)
    val = outputs(model, partial["val"][0])
    known = partial["val"][2] >= 0
    rule = fit_threshold(val[known, 1:], partial["val"][2][known])
    threshold = 0.5  # the uncalibrated decision threshold, as scores are raw here
    pixels = family_arrays(700 + seed * 1000, args.per_family // 3, (held_out,), args.size)[0]
    real_pixels, unseen_pixels = np.split(pixels, 2)  # as many real images as the family's
    unseen = outputs(model, unseen_pixels)
    answers = ["real" if row[0] < threshold else name(row[1:], kept, rule)[0]
               for row in unseen]
    result["held_out"] = {"generator": held_out, "images": len(answers),
                          "called_real": round(answers.count("real") / len(answers), 4),
                          "unknown": round(answers.count("unknown") / len(answers), 4),
                          "misattributed": round(sum(a in kept for a in answers)
                                                 / len(answers), 4),
                          "feature_distance": feature_distance(model, partial, unseen_pixels,
                                                               real_pixels)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50v2_tiny")
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--per-family", type=int, default=120)
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--json", default="bench/results/attribution.json")
    args = parser.parse_args()

    info = machine()
    print_machine(info)
    runs = []
    for seed in map(int, args.seeds.split(",")):
        run = run_seed(args, seed)
        runs.append(run)
        base, head, out = run["binary_only"], run["with_head"], run["held_out"]
        print(f"seed {seed}: ROC AUC binary-only {base['roc_auc']:.4f}, with head "
              f"{head['roc_auc']:.4f} ({head['roc_auc'] - base['roc_auc']:+.4f}); training "
              f"time {head['seconds'] / base['seconds']:.2f}x the baseline's; attribution "
              f"accuracy {head['attribution_accuracy']:.3f}, macro-F1 {head['macro_f1']:.3f};"
              f" open set {head['open_set']}; held-out {out['generator']}: "
              f"{out['called_real']:.0%} real, {out['unknown']:.0%} unknown, "
              f"{out['misattributed']:.0%} misattributed; feature distance flags "
              f"{out['feature_distance']['held_out_flagged']:.0%} of it and "
              f"{out['feature_distance']['real_flagged']:.0%} of unseen real images",
              flush=True)
    save_json(args.json, {"machine": info, "args": vars(args), "runs": runs})


if __name__ == "__main__":
    main()
