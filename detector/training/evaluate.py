"""Metrics, report files and plots for a model on a prepared split.

All numbers come from scikit-learn on the Predictor's scores (the same path serving and
scanning use). The decision threshold is chosen on the validation split, never on the
split being reported.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq

from detector.data import augment, shards
from detector.io import storage
from detector.model.artifact import name_of, new_identity, publish_directory, resolve
from detector.model.predictor import Predictor
from detector.training.attribution import attribution_metrics, open_set_rule
from detector.verdicts import attribution, calibration, residual
from detector.verdicts.verdict import decide_for

TARGET_FPR = 0.01


@dataclass
class Scored:
    """Scores of one split, row-aligned with its metadata."""

    labels: np.ndarray
    scores: np.ndarray
    formats: list[str]
    uris: list[str]
    sha256: list[str]
    robustness: dict[str, np.ndarray] = field(default_factory=dict)
    generators: list[str | None] = field(default_factory=list)  # the shards' (if named)
    sources: list[str | None] = field(default_factory=list)  # named sources (if any)
    attribution: np.ndarray | None = None  # P(generator | AI), in card.generators order
    # the head's outputs on each robustness check's perturbed copies (a model with a head)
    robustness_attribution: dict[str, np.ndarray] = field(default_factory=dict)
    # each image's residual spectrum distance and the card's threshold for it
    # (verdicts/residual.py), when the card has the model
    residual: np.ndarray | None = None
    residual_threshold: float | None = None

    @property
    def unlike_real(self) -> np.ndarray | None:
        """Which images get an `unlike-real` finding (None: the card has no model)."""
        return None if self.residual is None else self.residual > self.residual_threshold


@dataclass
class EvaluationReport:
    threshold: float
    split: str
    metrics: dict
    robustness: dict
    per_format: dict
    report_text: str
    scored: Scored
    history: list[dict] = field(default_factory=list)

    def headline(self) -> dict:
        keys = ("accuracy", "precision", "recall", "f1", "roc_auc", "specificity", "loss",
                "tpr_at_1pct_fpr", "ece", "fpr", "threshold_policy")
        attribution = self.metrics.get("attribution") or {}
        return {"threshold": self.threshold, "split": self.split,
                **{k: self.metrics[k] for k in keys if k in self.metrics},
                **{f"attribution_{k}": attribution[k] for k in ("accuracy", "macro_f1")
                   if k in attribution}}

    def write(self, directory: str) -> None:
        """metrics.json, classification_report.txt, robustness/per-format tables,
        predictions.parquet and PNG plots into a local directory."""
        import pyarrow as pa

        os.makedirs(directory, exist_ok=True)
        files = {
            "metrics.json": {"split": self.split, "threshold": self.threshold, **self.metrics},
            "robustness.json": self.robustness,
            "per_format.json": self.per_format,
            "history.json": self.history,
        }
        for name, payload in files.items():
            with open(os.path.join(directory, name), "w") as handle:
                json.dump(payload, handle, indent=2)
        with open(os.path.join(directory, "classification_report.txt"), "w") as handle:
            handle.write(self.report_text)
        with open(os.path.join(directory, "robustness.md"), "w") as handle:
            handle.write(_robustness_markdown(self.robustness))
        s = self.scored
        columns = {"source_uri": s.uris, "sha256": s.sha256, "source_format": s.formats,
                   "label": s.labels.astype(np.int8), "score_ai": s.scores}
        if s.generators:
            columns["generator"] = pa.array(s.generators, pa.string())
        classes = (self.metrics.get("attribution") or {}).get("classes")
        if classes and s.attribution is not None:  # the head's top choice, and how sure
            columns["generator_named"] = [classes[i] for i in np.argmax(s.attribution, 1)]
            columns["generator_probability"] = np.max(s.attribution, 1).astype(np.float32)
        pq.write_table(pa.table(columns), os.path.join(directory, "predictions.parquet"))
        _plot(self, directory)


def score_split(
    predictor: Predictor, shards_uri: str, split: str, robustness: bool = False
) -> Scored:
    """Score every image of a split, part by part (memory holds one part at a time)."""
    labels, scores, formats, uris, hashes, generators, named = [], [], [], [], [], [], []
    sources: list[str | None] = []
    perturbed: dict[str, list] = {name: [] for name in augment.ROBUSTNESS_CHECKS} \
        if robustness else {}
    perturbed_named: dict[str, list] = {name: [] for name in perturbed}
    size = predictor.image_size
    model = residual.Model.from_card(predictor.card.domain)
    distances = []
    for pixels, table in _iter_parts(shards_uri, split, size):
        if model is not None:
            distances.append(model.distances(pixels))
        labels.append(np.asarray(table.column("label").to_numpy(), dtype=np.int64))
        split_scores, attribution = predictor.score_and_attribute(pixels)
        scores.append(split_scores)
        if attribution is not None:
            named.append(attribution)
        if "generator" in table.column_names:  # shard sets from before names have none
            generators += table.column("generator").to_pylist()
        if "source_name" in table.column_names:
            sources += table.column("source_name").to_pylist()
        formats += table.column("source_format").to_pylist()
        uris += table.column("source_uri").to_pylist()
        hashes += table.column("sha256").to_pylist()
        for name, perturb in augment.ROBUSTNESS_CHECKS.items() if robustness else ():
            copy_scores, copy_named = predictor.score_and_attribute(
                np.stack([perturb(p) for p in pixels]))
            perturbed[name].append(copy_scores)
            if copy_named is not None:
                perturbed_named[name].append(copy_named)
    if not labels:
        raise ValueError(f"split {split!r} of {shards_uri} has no images")
    return Scored(
        labels=np.concatenate(labels), scores=np.concatenate(scores), formats=formats,
        uris=uris, sha256=hashes,
        robustness={k: np.concatenate(v) for k, v in perturbed.items()},
        generators=generators, sources=sources,
        attribution=np.concatenate(named) if named else None,
        robustness_attribution={k: np.concatenate(v) for k, v in perturbed_named.items() if v},
        residual=np.concatenate(distances) if distances else None,
        residual_threshold=model.threshold if model is not None else None,
    )


def _iter_parts(shards_uri: str, split: str, size: int) -> Iterator:
    for uri in shards.part_uris(shards_uri, split):
        fs, path = storage.resolve(uri)
        table = pq.read_table(path, filesystem=fs)
        yield shards.decode_pixels(table.column("image").to_pylist(), size), table


def parse_policy(policy: str) -> float | None:
    """`balanced` -> None; `target-fpr:X` -> X, the false-positive rate to hold on validation
    data (0 < X < 1). Anything else is a ValueError naming both forms."""
    if policy == "balanced":
        return None
    kind, _, value = policy.partition(":")
    try:
        target = float(value)
    except ValueError:
        target = -1.0
    if kind != "target-fpr" or not 0 < target < 1:
        raise ValueError(f"threshold policy {policy!r}: use balanced or target-fpr:X with "
                         "0 < X < 1 (e.g. target-fpr:0.01)")
    return target


def choose_threshold(labels: np.ndarray, scores: np.ndarray, policy: str = "balanced"
                     ) -> float:
    """The decision threshold on validation data, by `policy`:

    - `balanced`: the cut maximising Youden's J (TPR - FPR), placed midway between the
      scores on either side of it: when the classes separate, any cut in the gap is
      optimal and the middle one leaves new images the widest margin;
    - `target-fpr:X`: the lowest cut whose false-positive rate (real photos called
      AI-generated) is at most X, so the most AI images are caught at that rate.
    """
    from sklearn.metrics import roc_curve

    target = parse_policy(policy)
    if len(np.unique(labels)) < 2:
        return 0.5
    if target is not None:  # every cut considered: the lowest that holds the rate
        fpr, _, thresholds = roc_curve(labels, scores, drop_intermediate=False)
        allowed = np.flatnonzero(fpr <= target)  # fpr rises as the cut falls
        return float(np.clip(thresholds[allowed.max()], 0.0, 1.0))
    fpr, tpr, thresholds = roc_curve(labels, scores)
    j = tpr - fpr
    cut = float(thresholds[np.flatnonzero(j == j.max()).max()])  # lowest cut with max J
    below = scores[scores < cut]
    return float(np.clip((cut + below.max()) / 2 if below.size else cut, 0.0, 1.0))


def compute_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """Accuracy, precision, recall, F1, ROC AUC, specificity, log loss, TPR at 1% FPR, ECE."""
    from sklearn import metrics as skm

    predicted = (scores >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(labels, predicted, labels=[0, 1]).ravel()
    both = len(np.unique(labels)) == 2
    result = {
        "count": len(labels),
        "accuracy": float(skm.accuracy_score(labels, predicted)),
        "precision": float(skm.precision_score(labels, predicted, zero_division=0)),
        "recall": float(skm.recall_score(labels, predicted, zero_division=0)),
        "f1": float(skm.f1_score(labels, predicted, zero_division=0)),
        "specificity": float(tn / (tn + fp)) if tn + fp else float("nan"),
        "roc_auc": float(skm.roc_auc_score(labels, scores)) if both else float("nan"),
        "loss": float(skm.log_loss(labels, np.clip(scores, 1e-7, 1 - 1e-7), labels=[0, 1])),
        "tpr_at_1pct_fpr": tpr_at_fpr(labels, scores, TARGET_FPR) if both else float("nan"),
        "ece": calibration.expected_calibration_error(labels, scores),
        "confusion_matrix": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
    }
    return result


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, target: float) -> float:
    """The highest true-positive rate at a false-positive rate of at most `target`."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)
    return float(tpr[fpr <= target].max(initial=0.0))


def build_report(
    scored: Scored, threshold: float, split: str, history: list[dict] | None = None,
    generators: list[str] | None = None, rule: dict | None = None,
) -> EvaluationReport:
    """The report on a scored split; `generators`: the attribution head's classes, and
    `rule` its open-set rule (verdicts/attribution.py)."""
    from sklearn.metrics import classification_report

    metrics = compute_metrics(scored.labels, scored.scores, threshold)
    if generators and scored.attribution is not None and scored.generators:
        metrics["attribution"] = attribution_metrics(scored.generators, scored.attribution,
                                                     generators, rule)
    if scored.unlike_real is not None:  # what the residual check costs reals, and catches
        metrics["residual"] = {"threshold": scored.residual_threshold, **{
            f"{name}_flagged": float(scored.unlike_real[scored.labels == label].mean())
            for name, label in (("real", 0), ("ai", 1)) if (scored.labels == label).any()}}
    robustness = {"original": _summary(metrics)}
    for name, scores in scored.robustness.items():
        robustness[name] = _summary(compute_metrics(scored.labels, scores, threshold))
    if "attribution" in metrics:  # the head under the same perturbations
        robustness["original"]["attribution_accuracy"] = metrics["attribution"]["accuracy"]
        for name, named in scored.robustness_attribution.items():
            robustness[name]["attribution_accuracy"] = attribution_metrics(
                scored.generators, named, generators, rule)["accuracy"]
    per_format = {}
    formats = np.array(scored.formats)
    for fmt in sorted(set(scored.formats)):
        mask = formats == fmt
        labels = scored.labels[mask]
        per_format[fmt] = {
            "count": int(mask.sum()),
            "real": int((labels == 0).sum()),
            "fake": int((labels == 1).sum()),
            "accuracy": float(((scored.scores[mask] >= threshold) == labels).mean()),
        }
    text = classification_report(
        scored.labels, (scored.scores >= threshold).astype(int), labels=[0, 1],
        target_names=["real", "ai-generated"], digits=4, zero_division=0,
    )
    return EvaluationReport(threshold, split, metrics, robustness, per_format, text, scored,
                            history or [])


def _summary(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("accuracy", "roc_auc", "tpr_at_1pct_fpr", "recall",
                                    "specificity")}


def evaluate_model(
    predictor: Predictor, shards_uri: str, split: str = "test",
    history: list[dict] | None = None, threshold: float | None = None,
    policy: str = "balanced",
) -> EvaluationReport:
    """Choose the threshold on `val` by `policy` (unless given; it is set on the
    predictor's card), then report on `split`."""
    card = predictor.card
    chosen_by = policy if threshold is None else card.config.get("threshold_policy",
                                                                 "balanced")
    if threshold is None:  # training: calibrate, then threshold and band, all on val
        card.calibration = {}  # score raw
        val = score_split(predictor, shards_uri, "val")
        fitted, card.calibration = calibration.fit(val.labels, val.scores)
        probabilities = fitted.apply(val.scores)
        threshold = calibration.clamp_threshold(choose_threshold(val.labels, probabilities,
                                                                 policy))
        card.uncertain_margin = calibration.uncertain_margin(val.labels, probabilities,
                                                             threshold)
        if card.generators and val.attribution is not None:
            card.attribution = open_set_rule(val, card.generators)
    card.threshold = threshold
    scored = score_split(predictor, shards_uri, split, robustness=True)  # calibrated
    report = build_report(scored, threshold, split, history, card.generators, card.attribution)
    report.metrics["nll"] = calibration.quality(scored.labels, scored.scores)["nll"]
    report.metrics["uncertain_margin"] = card.uncertain_margin
    report.metrics["calibration"] = card.calibration
    report.metrics["threshold_policy"] = chosen_by
    # At this threshold, on this split: what a target-FPR policy promised, measured.
    report.metrics["fpr"] = 1.0 - report.metrics["specificity"]
    return report


def training_history(model_uri: str) -> list[dict]:
    """The epochs a version's weights were trained in (`history.json`; none if absent)."""
    history_uri = storage.join(model_uri, "history.json")
    return json.loads(storage.read_bytes(history_uri)) if storage.exists(history_uri) else []


def evaluate_artifact(model_uri: str, shards_uri: str, split: str, out_dir: str,
                      backend: str = "auto", precision: str = "float32") -> dict:
    """`detector evaluate`: re-evaluate a saved artifact with its own threshold, on the
    runtime `backend`/`precision` resolve to."""

    model_uri = resolve(model_uri)
    predictor = Predictor.from_uri(model_uri, backend=backend, precision=precision)
    report = evaluate_model(predictor, shards_uri, split, threshold=predictor.card.threshold)
    report.history = training_history(model_uri)
    if storage.is_s3(out_dir):
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            report.write(tmp)
            storage.upload_dir(tmp, out_dir)
    else:
        report.write(storage.local_path(out_dir))
    return {**report.headline(), "runtime": predictor.runtime}


def evaluate_holdout(model_uri: str, shards_uri: str, generator: str, split: str = "test",
                     backend: str = "auto", precision: str = "float32") -> dict:
    """`detector evaluate --holdout-generator NAME`: what a model with an attribution head
    answers for images of a generator it never saw (the split's images whose `generator`
    is NAME). Trains nothing: hold NAME out when preparing the model's training shards.
    Each image is called real, `unknown`, or misattributed to a generator the model knows,
    by the rules predict, serve and scan apply (`detector.verdicts.verdict` with the
    residual check, then `detector.verdicts.attribution`); the shares say how honest it is."""
    model_uri = resolve(model_uri)
    predictor = Predictor.from_uri(model_uri, backend=backend, precision=precision)
    card = predictor.card
    if not card.generators:
        raise ValueError(f"{card.name}@{card.id} has no attribution head (its training "
                         "shards named fewer than two generators)")
    if generator in card.generators:
        raise ValueError(f"{card.name}@{card.id} was trained on {generator!r}: hold it out "
                         "of the training shards (prepare without it), train, then evaluate")
    scored = score_split(predictor, shards_uri, split)
    rows = [i for i, name in enumerate(scored.generators) if name == generator]
    if not rows:
        raise ValueError(f"no images of generator {generator!r} in the {split} split of "
                         f"{shards_uri}")
    called_real, unknown, misattributed_as, verdicts = 0, 0, Counter(), Counter()
    for i in rows:
        found = None if scored.residual is None else residual.finding(
            scored.residual[i], scored.residual_threshold)
        evidence = [found] if found else []
        verdict = decide_for(card, float(scored.scores[i]), evidence)[0]
        verdicts[verdict] += 1
        answer = attribution.attribute_for(card, verdict, evidence, scored.attribution[i])
        if answer.generator is None:
            called_real += 1
        elif answer.generator == attribution.UNKNOWN:
            unknown += 1
        else:
            misattributed_as[answer.generator] += 1
    called_ai = len(rows) - called_real
    return {
        "model": f"{card.name}@{card.id}", "generator": generator, "split": split,
        "images": len(rows), "called_real": called_real / len(rows),
        "unknown": unknown / len(rows), "misattributed": sum(misattributed_as.values()) /
        len(rows), "misattributed_as": dict(misattributed_as.most_common()),
        # Of the images not called real: how often the generator is honestly unknown.
        "unknown_when_called_ai": unknown / called_ai if called_ai else None,
        "verdicts": {k: v / len(rows) for k, v in sorted(verdicts.items())},
        "unlike_real": float(scored.unlike_real[rows].mean())
        if scored.unlike_real is not None else None,
        "rule": card.attribution, "runtime": predictor.runtime,
    }


def recalibrate_artifact(model_uri: str, shards_uri: str, backend: str = "auto",
                         precision: str = "float32", policy: str | None = None) -> dict:
    """`detector evaluate --recalibrate`: fit calibration, threshold and uncertain band
    again on `shards_uri`'s validation split (as training does), evaluate on its test
    split, and publish the result as a new version beside the old one (same weights and
    exports, a new card), moving `latest.json` to it. Returns its headline and URI."""
    import dataclasses
    import tempfile


    model_uri = resolve(model_uri)
    name_uri = name_of(model_uri)
    if name_uri is None:
        raise ValueError(f"{model_uri} is not a version under OUT/<name>/ (no latest.json "
                         "beside it): --recalibrate publishes the new card as a version there")
    predictor = Predictor.from_uri(model_uri, backend=backend, precision=precision)
    before = predictor.card.id
    policy = policy or predictor.card.config.get("threshold_policy", "balanced")
    report = evaluate_model(predictor, shards_uri, "test", policy=policy)  # refits on val
    report.history = training_history(model_uri)  # the weights' own, carried over
    card = dataclasses.replace(
        predictor.card, **new_identity(), metrics=report.headline(),
        config={**predictor.card.config, "threshold_policy": policy,
                "recalibrated_from": before, "recalibration_data": shards_uri})
    with tempfile.TemporaryDirectory() as tmp:
        storage.download_dir(model_uri, tmp)  # weights, exports, history
        report.write(tmp)  # this evaluation replaces the old one's files
        version = publish_directory(tmp, card, name_uri)
    return {**card.metrics, "model": f"{card.name}@{card.id}", "artifact": version,
            "recalibrated_from": before, "runtime": predictor.runtime}


def _robustness_markdown(robustness: dict) -> str:
    head = any("attribution_accuracy" in m for m in robustness.values())
    lines = ["| Perturbation | Accuracy | ROC AUC | TPR@1%FPR |"
             + (" Attribution accuracy |" if head else ""),
             "|---|---|---|---|" + ("---|" if head else "")]
    for name, m in robustness.items():
        extra = f" {m['attribution_accuracy']:.4f} |" if head and \
            m.get("attribution_accuracy") is not None else (" |" if head else "")
        lines.append(f"| {name} | {m['accuracy']:.4f} | {m['roc_auc']:.4f} | "
                     f"{m['tpr_at_1pct_fpr']:.4f} |{extra}")
    return "\n".join(lines) + "\n"


def _plot(report: EvaluationReport, directory: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay

    s = report.scored
    predicted = (s.scores >= report.threshold).astype(int)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ConfusionMatrixDisplay.from_predictions(
        s.labels, predicted, labels=[0, 1], display_labels=["real", "ai-generated"], ax=ax,
        colorbar=False,
    )
    ax.set_title(f"Confusion matrix ({report.split}, t={report.threshold:.3f})")
    fig.tight_layout()
    fig.savefig(os.path.join(directory, "confusion_matrix.png"), dpi=110)
    plt.close(fig)
    if len(np.unique(s.labels)) == 2:
        fig, ax = plt.subplots(figsize=(4.5, 4))
        RocCurveDisplay.from_predictions(s.labels, s.scores, ax=ax, name="score_ai")
        ax.set_title(f"ROC ({report.split})")
        fig.tight_layout()
        fig.savefig(os.path.join(directory, "roc.png"), dpi=110)
        plt.close(fig)
        _plot_reliability(report, directory)
    attribution = report.metrics.get("attribution")
    if attribution and attribution["images"]:
        fig, ax = plt.subplots(figsize=(1.2 * len(attribution["classes"]) + 2.5,
                                        1.1 * len(attribution["classes"]) + 2))
        ConfusionMatrixDisplay(np.array(attribution["confusion_matrix"]),
                               display_labels=attribution["classes"]).plot(
            ax=ax, colorbar=False, xticks_rotation=30)
        ax.set_title(f"Attribution ({report.split}, {attribution['images']} AI images)")
        fig.tight_layout()
        fig.savefig(os.path.join(directory, "attribution_confusion_matrix.png"), dpi=110)
        plt.close(fig)
    if report.history:
        epochs = [h["epoch"] for h in report.history]
        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
        left.plot(epochs, [h["loss"] for h in report.history], label="train loss")
        left.plot(epochs, [h["val_loss"] for h in report.history], label="val loss")
        left.set_xlabel("epoch")
        left.legend()
        right.plot(epochs, [h["val_accuracy"] for h in report.history], label="val accuracy")
        right.set_xlabel("epoch")
        right.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(directory, "history.png"), dpi=110)
        plt.close(fig)


def _plot_reliability(report: EvaluationReport, directory: str) -> None:
    """reliability.png: observed share of AI images against mean score_ai, in the ECE's
    equal-width bins; the diagonal is a calibrated model."""
    import matplotlib.pyplot as plt
    from sklearn.calibration import CalibrationDisplay

    s = report.scored
    fig, ax = plt.subplots(figsize=(4.5, 4))
    CalibrationDisplay.from_predictions(s.labels, s.scores, n_bins=calibration.CALIBRATION_BINS,
                                        strategy="uniform", ax=ax, name="score_ai")
    ax.set_title(f"Reliability ({report.split}, ECE {report.metrics['ece']:.3f})")
    fig.tight_layout()
    fig.savefig(os.path.join(directory, "reliability.png"), dpi=110)
    plt.close(fig)
