"""`detector retrain` (and `jobs/retrain.py`): the learning loop as one job.

    shards      `prepare --base --labels`: the baseline's training shards (or --base) plus
                every labelled image, each keeping or taking its content-hash split
    fine-tune   `train --init-from`: the baseline version (the name's latest) warm-starts
                a candidate with the settings it was trained with, for fewer epochs at a
                lower learning rate; the candidate is published beside it, latest unmoved
    gate        `promote`: the candidate against the baseline on the new shards' test
                split, per slice, reviewed misses included; latest moves only if it passes

The record (`retrain.json`, with `compare.md` / `compare.json` beside it when --report is
given) says what each step did.
"""

from __future__ import annotations

import dataclasses
import json

from detector.config import PrepareConfig, RetrainConfig, TrainConfig
from detector.io import storage
from detector.model.artifact import load_card, name_of, resolve
from detector.training import compare
from detector.training.promote import promote

# What the fine-tune takes from the retrain job rather than from the parent's settings.
FROM_JOB = ("epochs", "lr", "review_weight", "workers", "cpus_per_worker", "gpus_per_worker")


def fine_tune_config(cfg: RetrainConfig, parent_uri: str, parent_name: str,
                     parent_config: dict) -> TrainConfig:
    """The parent's training settings, continued: its own data and output replaced by the
    new shards and the parent's models folder, warm-started from the parent."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    settings = {key: tuple(value) if isinstance(value, list) else value
                for key, value in parent_config.items() if key in fields}
    models_out = parent_uri.rstrip("/").rsplit("/", 2)[0]
    return TrainConfig(**{
        **settings, **{key: getattr(cfg, key) for key in FROM_JOB},
        "model": (parent_name,), "data": cfg.shards, "out": models_out,
        "init_from": parent_uri, "resume": False,
        "image_size": None})


def retrain(cfg: RetrainConfig, say=print) -> dict:
    """Run the loop on the current Ray cluster; returns the record (also `retrain.json`
    under `cfg.report`)."""
    from detector.data import prepare
    from detector.training.train import train_models

    baseline = resolve(cfg.model)
    if name_of(baseline) is None:
        raise ValueError(f"{cfg.model} is not a model name with a latest version (OUT/<name>)")
    card = load_card(baseline)
    base = cfg.base or card.config.get("data")
    if not base:
        raise ValueError(f"{baseline}: its card names no training shards; pass --base SHARDS")
    say(f"Retraining {card.name}@{card.id}: shards {base} + labels {cfg.labels} -> "
        f"{cfg.shards}")
    manifest = prepare.run(PrepareConfig(out=cfg.shards, base=base, labels=cfg.labels),
                           progress=False)
    labels = manifest["reviewed"]
    say(f"Shards: {manifest['written']} images ({labels['written']} from {labels['images']} "
        f"labelled images, {labels['relabeled']} relabelled by hash, "
        f"{len(manifest['skipped'])} skipped)")
    train_cfg = fine_tune_config(cfg, baseline, card.name, card.config)
    trained = train_models(train_cfg)["models"][0]
    candidate = trained["artifact"]
    say(f"Candidate {card.name}@{trained['id']}: test accuracy "
        f"{trained.get('accuracy', float('nan')):.4f}")
    if cfg.promote:
        result = promote(candidate, cfg.shards, tolerance=cfg.tolerance, backend=cfg.backend)
        gate = result["gate"]
    else:
        gate = compare.compare(baseline, candidate, cfg.shards, tolerance=cfg.tolerance,
                               backend=cfg.backend)
        result = {"promoted": False, "reason": "--no-promote"}
    record = {"baseline": baseline, "candidate": candidate, "shards": cfg.shards,
              "labels": labels, "written": manifest["written"], "passed": gate["passed"],
              "regressions": gate["regressions"], "promoted": result["promoted"],
              "reason": result.get("reason"), "epochs": train_cfg.epochs, "lr": train_cfg.lr,
              "review_weight": train_cfg.review_weight}
    if cfg.report:
        compare.write(gate, cfg.report)
        storage.write_bytes(storage.join(cfg.report, "retrain.json"),
                            json.dumps(record, indent=2).encode())
    return {**record, "gate": gate}
