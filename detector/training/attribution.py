"""Which generators a training run's attribution head learns, and the labels it learns from.

The head's classes are the generators named in the training split (`prepare --fake
NAME=URI`), sorted. With fewer than two there is nothing to choose between, so the model
stays binary. Images whose generator is unknown (an unnamed fake source) and real images
train the binary score only: their generator index is -1, which `fit` masks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from detector.data.shards import UNKNOWN
from detector.verdicts import attribution


def generator_classes(manifest: dict) -> list[str]:
    """The attribution head's classes for shards with this manifest ([]: no head)."""
    train = (manifest.get("generators") or {}).get("train", {})
    names = sorted(name for name, count in train.items() if name != UNKNOWN and count > 0)
    return names if len(names) >= 2 else []


def class_indices(generators: Sequence, classes: Sequence[str]) -> np.ndarray:
    """Each image's index in `classes`, -1 for a generator not among them (or none)."""
    index = {name: i for i, name in enumerate(classes)}
    return np.array([index.get(name, -1) if isinstance(name, str) else -1
                     for name in generators], dtype=np.int64)


def labels_with_generators(labels: np.ndarray, generators: Sequence, classes: Sequence[str]
                           ) -> np.ndarray:
    """(N, 2) float32 rows of (label, index of the generator in `classes`, or -1)."""
    return np.stack([np.asarray(labels, dtype=np.float32),
                     class_indices(generators, classes).astype(np.float32)], axis=1)


def open_set_rule(scored, classes: Sequence[str]) -> dict:
    """The open-set rule fitted on a scored validation split's AI images of known
    generators (`detector.training.evaluate.Scored`)."""
    indices = class_indices(scored.generators, classes)
    known = indices >= 0
    return attribution.fit_threshold(scored.attribution[known], indices[known])


def attribution_metrics(truth: Sequence, probabilities: np.ndarray, classes: Sequence[str],
                        rule: dict | None = None) -> dict:
    """How well the head names the generator of the images whose generator it was trained
    to know: accuracy, macro-F1, each generator's recall and the confusion matrix (rows:
    truth, columns: named, both in `classes` order), and with the open-set `rule` the
    shares named correctly, misattributed and `unknown`. Images of other or unknown
    generators and real images are left out, and counted."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    indices = class_indices(truth, classes)
    known = indices >= 0
    expected, images = indices[known], int(known.sum())
    named = np.argmax(probabilities[known], axis=1) if images else np.zeros(0, np.int64)
    labels = list(range(len(classes)))
    matrix = confusion_matrix(expected, named, labels=labels) if images else \
        np.zeros((len(classes), len(classes)), np.int64)
    per_generator = {name: {"count": int(matrix[i].sum()),
                            "accuracy": float(matrix[i, i] / matrix[i].sum())
                            if matrix[i].sum() else None}
                     for i, name in enumerate(classes)}
    return {
        "classes": list(classes),
        "images": images,
        "left_out": len(truth) - images,
        "accuracy": float(accuracy_score(expected, named)) if images else None,
        "macro_f1": float(f1_score(expected, named, labels=labels, average="macro",
                                   zero_division=0)) if images else None,
        "per_generator": per_generator,
        "confusion_matrix": matrix.tolist(),
        **({"open_set": open_set_shares(probabilities[known], expected, classes, rule)}
           if rule and images else {}),
    }


def open_set_shares(probabilities: np.ndarray, expected: Sequence[int], classes: Sequence[str],
                    rule: dict) -> dict:
    """Shares of images the rule names correctly, names wrongly, or calls `unknown`."""
    answers = [attribution.name(p, classes, rule)[0] for p in probabilities]
    unknown = np.array([a == attribution.UNKNOWN for a in answers])
    right = np.array([a == classes[e] for a, e in zip(answers, expected, strict=True)])
    return {"threshold": rule["threshold"], "named_correctly": float(right.mean()),
            "misattributed": float((~right & ~unknown).mean()), "unknown": float(unknown.mean())}
