"""`detector compare`: a candidate version against a baseline, slice by slice, and a gate.

Both models score the same split. A slice is the split's images of one named source
(`source:coco`) or of one generator (`generator:sdxl`), and `all`. A slice holds one class
when a source or generator is one kind of image, so its TPR at 1% FPR and ECE are measured
with the other class's images of the whole split beside it (a generator's fakes against
every real image: what a threshold faces); accuracy and counts are the slice's own. Each
model decides at its own card's threshold.

The gate fails when any slice's accuracy or TPR at 1% FPR drops by more than `tolerance`
from baseline to candidate (slices with fewer than MIN_SLICE images are shown and never
gate: a handful of images cannot tell a regression from noise).

Where the split holds reviewed images (source `review`: labels folded into the shards),
`reviewed-misses` is the slice of those the baseline decided wrongly, what reviewers
corrected. Its baseline accuracy is 0 by definition; the gate also fails when the
candidate gets no more than `tolerance` of them right, however small the slice.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import numpy as np

from detector.config import GATE_TOLERANCE
from detector.data.labels import REVIEW_SOURCE
from detector.io import storage
from detector.model.artifact import resolve
from detector.model.predictor import Predictor
from detector.training.evaluate import score_split, tpr_at_fpr
from detector.verdicts.calibration import expected_calibration_error

TOLERANCE = GATE_TOLERANCE
MIN_SLICE = 20  # images: smaller slices are reported, never gated on
GATED = ("accuracy", "tpr_at_1pct_fpr")
REVIEWED_MISSES = "reviewed-misses"


def slices(labels: np.ndarray, sources: list, generators: list
           ) -> Iterator[tuple[str, np.ndarray]]:
    """(name, mask of the slice's own images) for `all`, each named source and generator."""
    yield "all", np.ones(len(labels), bool)
    for kind, names in (("source", sources), ("generator", generators)):
        if not names:
            continue
        values = np.array([name or "" for name in names])
        for name in sorted(set(values) - {""}):
            yield f"{kind}:{name}", values == name


def reviewed_misses(labels: np.ndarray, scores: np.ndarray, threshold: float,
                    sources: list) -> np.ndarray:
    """Mask of the reviewed images (source `review`) the model decides wrongly."""
    reviewed = np.array([name == REVIEW_SOURCE for name in sources], bool) if sources \
        else np.zeros(len(labels), bool)
    return reviewed & ((scores >= threshold) != labels.astype(bool))


def slice_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float,
                  own: np.ndarray) -> dict:
    """Accuracy and counts on the slice's own images; TPR@1%FPR and ECE with the other
    class of the whole split beside a one-class slice."""
    classes = set(labels[own].tolist())
    measured = own | (labels != labels[own][0]) if len(classes) == 1 else own
    both = len(set(labels[measured].tolist())) == 2
    return {
        "images": int(own.sum()), "ai": int(labels[own].sum()),
        "accuracy": float(np.mean((scores[own] >= threshold) == labels[own].astype(bool))),
        "tpr_at_1pct_fpr": tpr_at_fpr(labels[measured], scores[measured], 0.01)
        if both else None,
        "ece": expected_calibration_error(labels[measured], scores[measured]),
    }


def compare(baseline: str, candidate: str, shards_uri: str, split: str = "test",
            tolerance: float = TOLERANCE, backend: str = "auto") -> dict:
    """The comparison record: each slice's metrics for both models, the changes, and the
    gate's verdict (`passed`, and each regression with its slice and metric)."""
    models = {}
    for role, uri in (("baseline", baseline), ("candidate", candidate)):
        predictor = Predictor.from_uri(resolve(uri), backend=backend)
        models[role] = (predictor.card, score_split(predictor, shards_uri, split))
    (base_card, base), (cand_card, cand) = models["baseline"], models["candidate"]
    if base.sha256 != cand.sha256:  # the same split read twice: never a different order
        raise RuntimeError("the two models scored different images")
    rows, regressions = [], []
    missed = reviewed_misses(base.labels, base.scores, base_card.threshold, base.sources)
    for name, own in [*slices(base.labels, base.sources, base.generators),
                      *([(REVIEWED_MISSES, missed)] if missed.any() else [])]:
        before = slice_metrics(base.labels, base.scores, base_card.threshold, own)
        after = slice_metrics(cand.labels, cand.scores, cand_card.threshold, own)
        change = {key: after[key] - before[key] for key in GATED
                  if before[key] is not None and after[key] is not None}
        gated = before["images"] >= MIN_SLICE or name == REVIEWED_MISSES
        for key, delta in change.items():
            if gated and delta < -tolerance:
                regressions.append({"slice": name, "metric": key, "baseline": before[key],
                                    "candidate": after[key], "change": delta})
        if name == REVIEWED_MISSES and change["accuracy"] <= tolerance:
            regressions.append({"slice": name, "metric": "accuracy", "baseline": 0.0,
                                "candidate": after["accuracy"], "change": change["accuracy"],
                                "why": "no improvement on the images reviewers corrected"})
        rows.append({"slice": name, "gated": gated, "baseline": before, "candidate": after,
                     "change": change})
    return {"baseline": f"{base_card.name}@{base_card.id}",
            "candidate": f"{cand_card.name}@{cand_card.id}", "data": shards_uri,
            "split": split, "tolerance": tolerance, "slices": rows,
            "regressions": regressions, "passed": not regressions}


def write(record: dict, directory: str) -> None:
    """compare.json and compare.md in `directory` (a local path or any storage URI)."""
    storage.write_bytes(storage.join(directory, "compare.json"),
                        json.dumps(record, indent=2).encode())
    storage.write_bytes(storage.join(directory, "compare.md"), markdown(record).encode())


def markdown(record: dict) -> str:
    """The before/after table, one row per slice, and the gate's verdict."""
    def cell(value) -> str:
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
            else f"{value:.4f}"

    lines = [f"Baseline {record['baseline']} -> candidate {record['candidate']} on the "
             f"{record['split']} split of {record['data']}", "",
             "| Slice | Images (AI) | Accuracy | TPR@1%FPR | ECE |", "|---|---|---|---|---|"]
    for row in record["slices"]:
        b, c = row["baseline"], row["candidate"]
        mark = "" if row["gated"] else " (not gated)"
        lines.append(
            f"| {row['slice']}{mark} | {b['images']} ({b['ai']}) | "
            + " | ".join(f"{cell(b[k])} -> {cell(c[k])}"
                         for k in ("accuracy", "tpr_at_1pct_fpr", "ece")) + " |")
    verdict = "passed" if record["passed"] else "FAILED: " + "; ".join(
        f"{r['slice']} {r['metric']} {r['baseline']:.4f} -> {r['candidate']:.4f}"
        for r in record["regressions"])
    misses = any(row["slice"] == REVIEWED_MISSES for row in record["slices"])
    also = "; so does no gain on the reviewed misses" if misses else ""
    lines += ["", f"Gate (a drop of more than {record['tolerance']} in any gated slice's "
              f"accuracy or TPR@1%FPR fails{also}): {verdict}"]
    return "\n".join(lines) + "\n"
