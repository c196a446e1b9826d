"""Bias audit of a labelled image set: could a trivial rule separate the classes?

COCO (JPEG photos of many sizes) vs DiffusionDB (512x512 PNGs) lets a model learn
"JPEG = real" instead of anything about generation; such detectors collapse to ~50%
once images are re-saved. This measures that risk before any training happens.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

WARN_ABOVE = 0.90


def bias_audit(rows: list[dict]) -> dict:
    """Per-class format/size statistics and cross-validated accuracy of trivial rules.

    `rows` need `label`, `source_format`, `width`, `height`, `size_bytes`.
    """
    if not rows:
        return {"classes": {}, "trivial_rule_accuracy": {}, "warnings": []}
    labels = np.array([r["label"] for r in rows])
    classes = {}
    for label, name in ((0, "real"), (1, "fake")):
        mine = [r for r in rows if r["label"] == label]
        classes[name] = _class_stats(mine)
    formats = sorted({r["source_format"] or "" for r in rows})
    features = {
        "format": np.array([[formats.index(r["source_format"] or "")] for r in rows]),
        "width_height": np.array([[r["width"], r["height"]] for r in rows]),
        # -1: unknown (rows copied from a shard set older than format 3)
        "file_size": np.array([[-1 if r["size_bytes"] is None else r["size_bytes"]]
                               for r in rows]),
    }
    accuracy = {name: _rule_accuracy(x, labels) for name, x in features.items()}
    warnings = [
        f"a trivial rule on {name} alone separates real from fake with {acc:.0%} accuracy: "
        "the model can learn this shortcut instead of generation traces "
        "(use --augment robust and check the robustness table)"
        for name, acc in accuracy.items()
        if acc > WARN_ABOVE
    ]
    return {"classes": classes, "trivial_rule_accuracy": accuracy, "warnings": warnings}


def _class_stats(rows: list[dict]) -> dict:
    if not rows:
        return {"count": 0}
    sizes = np.array([r["size_bytes"] for r in rows if r["size_bytes"] is not None],
                     dtype=np.float64)
    dims = Counter(f"{r['width']}x{r['height']}" for r in rows)
    return {
        "count": len(rows),
        "formats": dict(Counter(r["source_format"] for r in rows).most_common()),
        "top_dimensions": dict(dims.most_common(5)),
        "distinct_dimensions": len(dims),
        "file_size_bytes": {
            "p10": int(np.percentile(sizes, 10)),
            "median": int(np.median(sizes)),
            "p90": int(np.percentile(sizes, 90)),
        } if len(sizes) else None,
    }


def _rule_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    """Held-out accuracy of a depth-3 decision tree on `features` alone."""
    from sklearn.model_selection import cross_val_score
    from sklearn.tree import DecisionTreeClassifier

    folds = min(5, int(np.bincount(labels, minlength=2).min()))
    if folds < 2:
        return 1.0  # one class (or one example of a class): trivially separable
    tree = DecisionTreeClassifier(max_depth=3, random_state=0)
    return round(float(cross_val_score(tree, features, labels, cv=folds).mean()), 4)
