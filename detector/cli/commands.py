"""The `detector` console script. Subcommands mirror the Ray job entry points in jobs/."""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import sys
from collections.abc import Sequence

from detector import config as cfg
from detector.cli.common import (
    init_ray,
    predict_files,
    print_exports,
    print_prepare_summary,
    print_scan_summary,
)
from detector.data.labels import LABEL_VALUES
from detector.io import console

log = logging.getLogger("detector")


def main(argv: Sequence[str] | None = None, *, owns_process: bool | None = None) -> int:
    """The `detector` command. `owns_process` (default: when argv comes from the command
    line) lets it quiet the process's output (see console.py); a caller that only borrows
    it, such as a test or the demo's nested predict, keeps its own stderr."""
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ banner is noise
    if argv is None if owns_process is None else owns_process:
        log_file = console.configure(args.command, getattr(args, "verbose", False))
        if log_file is not None and args.command in CHATTY_COMMANDS:
            print(f"(Ray and TensorFlow output: {log_file}; --verbose shows it here)",
                  file=sys.stderr)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        return int(args.run(args) or 0)
    except (FileNotFoundError, ValueError, KeyError) as exc:  # the user's input, not a bug
        print(f"detector {args.command}: error: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detector", description="Tell real photographs from AI-generated images."
    )
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's and TensorFlow's output (default: a log file)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sample = commands.add_parser("sample", help="write a synthetic sample bucket")
    sample.add_argument("out", help="output URI (path, file:// or s3://)")
    sample.add_argument("--per-class", type=int, default=100)
    sample.add_argument("--size", type=int, default=None, help="exact square size (default: mix)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--biased", action="store_true", help="real=JPEG, fake=PNG, on purpose")
    sample.add_argument("--corrupt", type=int, default=0, help="bad files per class to add")
    sample.add_argument("--generators", type=int, default=0,
                        help="fakes from N distinct generator families, each in its own folder "
                             "fake/<family>/ (0: one unnamed kind of fake)")
    sample.set_defaults(run=run_sample)

    prepare = commands.add_parser("prepare", help="object storage -> training shards (Ray Data)")
    cfg.add_arguments(prepare, cfg.PrepareConfig)
    prepare.set_defaults(run=run_prepare)

    train = commands.add_parser("train", help="train models data-parallel (Ray Train)")
    cfg.add_arguments(train, cfg.TrainConfig)
    train.set_defaults(run=run_train)

    evaluate = commands.add_parser("evaluate", help="evaluate a model artifact on shards")
    evaluate.add_argument("--model", required=True, help="model artifact URI")
    evaluate.add_argument("--data", required=True, help="prepared shards URI")
    evaluate.add_argument("--split", default="test", choices=("train", "val", "test"))
    evaluate.add_argument("--out", help="directory URI for the report files")
    evaluate.add_argument("--recalibrate", action="store_true",
                          help="fit calibration, threshold and band again on --data's "
                          "validation split and publish them as a new version of the model "
                          "(same weights), moving OUT/<name>/latest.json")
    evaluate.add_argument("--holdout-generator", metavar="NAME", default=None,
                          help="report what the model answers for --split's images of "
                          "generator NAME, which it never saw: called real, unknown, or "
                          "misattributed (trains nothing; hold NAME out when preparing the "
                          "model's training shards)")
    evaluate.add_argument("--threshold-policy", default=None,
                          help="with --recalibrate: balanced or target-fpr:X (default: the "
                          "model's own)")
    add_runtime_flags(evaluate)
    evaluate.set_defaults(run=run_evaluate)

    ensemble = commands.add_parser(
        "ensemble", help="combine trained models into one evaluated ensemble artifact")
    ensemble.add_argument("--models", required=True,
                          type=lambda text: [uri for uri in text.split(",") if uri],
                          help="member model URIs, comma-separated (each resolved to its "
                          "version now)")
    ensemble.add_argument("--weights", type=lambda text: [float(w) for w in text.split(",")],
                          help="one weight per member, comma-separated (default: equal)")
    ensemble.add_argument("--data", required=True, help="prepared shards URI: calibration, "
                          "threshold and band on val, evaluation on test")
    ensemble.add_argument("--out", required=True, help="models URI: publishes OUT/<name>/<id>/ "
                          "and adds a row to OUT/comparison.md")
    ensemble.add_argument("--name", default="ensemble")
    ensemble.add_argument("--threshold-policy", default="balanced",
                          help="balanced or target-fpr:X")
    add_runtime_flags(ensemble)
    ensemble.set_defaults(run=run_ensemble)

    compare = commands.add_parser(
        "compare", help="a candidate model against a baseline, slice by slice, with a gate "
        "(exit 1 when a slice regresses)")
    compare.add_argument("--baseline", required=True, help="model URI (a name: its latest)")
    compare.add_argument("--candidate", required=True, help="model URI")
    compare.add_argument("--data", required=True, help="shards URI")
    compare.add_argument("--split", default="test", choices=("train", "val", "test"))
    compare.add_argument("--tolerance", type=float, default=None,
                         help="the largest drop in a slice's accuracy or TPR@1%%FPR allowed "
                         "(default 0.01)")
    compare.add_argument("--out", help="local directory for compare.md and compare.json")
    compare.add_argument("--backend", default="auto", choices=cfg.BACKENDS)
    compare.set_defaults(run=run_compare)

    promote = commands.add_parser(
        "promote", help="point a model name's latest at a version, if it passes the gate")
    promote.add_argument("version", help="the candidate version URI (OUT/<name>/<id>)")
    promote.add_argument("--data", help="shards to gate on (default: the candidate's)")
    promote.add_argument("--tolerance", type=float, default=None,
                         help="as for compare (default 0.01)")
    promote.add_argument("--force", action="store_true",
                         help="promote even if the gate fails (recorded in the pointer)")
    promote.add_argument("--backend", default="auto", choices=cfg.BACKENDS)
    promote.set_defaults(run=run_promote)

    retrain = commands.add_parser(
        "retrain", help="labels -> shards -> fine-tune -> gate -> promote (exit 1 when the "
        "gate refuses the candidate)")
    cfg.add_arguments(retrain, cfg.RetrainConfig)
    retrain.set_defaults(run=run_retrain)

    export = commands.add_parser("export", help="add ONNX / OpenVINO int8 exports to a model")
    export.add_argument("--model", required=True, help="model artifact URI")
    export.add_argument("--int8", action="store_true",
                        help="also an OpenVINO int8 model, quantized by NNCF")
    export.add_argument("--data", default=None,
                        help="prepared shards for calibration (val) and parity (test); "
                        "default: the model's training data")
    export.add_argument("--max-auc-drop", type=float, default=cfg.MAX_AUC_DROP,
                        help="refuse an int8 model whose test ROC AUC drops more than this")
    export.set_defaults(run=run_export)

    predict = commands.add_parser("predict", help="score image files locally (no cluster)")
    predict.add_argument("--model", required=True, help="model artifact URI")
    predict.add_argument("images", nargs="+", help="image paths or URIs")
    predict.add_argument("--json", action="store_true", help="one JSON object per line")
    predict.add_argument("--consistency", action="store_true",
                         help="also score a JPEG-75 re-save and a 0.5x resize of each image; "
                         "uncertain when their verdicts disagree (3x the model work)")
    predict.add_argument("--explain", metavar="DIR",
                         help="write where the model looked (Grad-CAM / attention rollout) "
                         "over each image as DIR/<name>.explain.png")
    add_runtime_flags(predict)
    predict.set_defaults(run=run_predict)

    models = commands.add_parser(
        "models", help="list registered architectures, or (`models list OUT`) the trained "
        "versions under OUT")
    models.add_argument("action", nargs="?", choices=("list",), help="list trained versions")
    models.add_argument("out", nargs="?", help="training output URI (OUT, or OUT/<name>)")
    models.add_argument("--params", action="store_true", help="build each and count parameters")
    models.set_defaults(run=run_models)

    scan = commands.add_parser("scan", help="score every image under a prefix into a report")
    cfg.add_arguments(scan, cfg.ScanConfig)
    scan.set_defaults(run=run_scan)

    label = commands.add_parser("label", help="store reviewers' labels in a labels dataset")
    label.add_argument("--labels", required=True, help="labels dataset URI (a prefix)")
    label.add_argument("images", nargs="*", help="image URIs, all labelled --label")
    label.add_argument("--csv", help="CSV with uri or sha256, label[, generator, note]")
    label.add_argument("--report", help="a scan report (OUT); with --verdict: its rows")
    label.add_argument("--verdict", choices=("ai-generated", "real", "uncertain"),
                       help="which of the report's rows to label")
    label.add_argument("--label", choices=LABEL_VALUES,
                       help="the label for images given as URIs or by --report")
    label.add_argument("--generator", help="which generator made them (ai-generated only)")
    label.add_argument("--note")
    label.add_argument("--reviewer", default=getpass.getuser(), help="default: your login")
    label.set_defaults(run=run_label)

    srv = commands.add_parser("serve", help="HTTP endpoint on Ray Serve (blocks until Ctrl-C)")
    srv.add_argument("--model", required=True, help="model artifact URI")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--min-replicas", type=int, default=cfg.ServeConfig.min_replicas)
    srv.add_argument("--max-replicas", type=int, default=cfg.ServeConfig.max_replicas)
    add_runtime_flags(srv)
    srv.add_argument("--scan-allow", nargs="*", default=[],
                     help="URI prefixes POST /v1/scans may read and write (default: none)")
    srv.add_argument("--labels", default="", help="labels dataset URI POST /v1/labels "
                     "appends to (default: labels off); labelled URIs must lie under "
                     "--scan-allow")
    srv.set_defaults(run=run_serve)

    demo = commands.add_parser("demo", help="the whole product end to end on sample data")
    demo.add_argument("--workdir", default="demo-output")
    demo.set_defaults(run=run_demo)
    for command in commands.choices.values():  # `detector train --verbose ...` works too
        command.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="show Ray's and TensorFlow's output (default: a log file)")
    return parser


# Commands that start Ray or TensorFlow, so have chatter to hide.
CHATTY_COMMANDS = ("prepare", "train", "evaluate", "ensemble", "compare", "promote", "retrain",
                   "export", "predict", "scan", "serve", "demo")


def run_sample(args: argparse.Namespace) -> int:
    from detector.data.sample import SampleSpec, write_sample

    spec = SampleSpec(per_class=args.per_class, size=args.size, seed=args.seed,
                      biased=args.biased, corrupt=args.corrupt, generators=args.generators)
    print(json.dumps(write_sample(args.out, spec), indent=2))
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    from detector.data import prepare

    config = cfg.from_args(cfg.PrepareConfig, args)
    init_ray()
    manifest = prepare.run(config)
    print_prepare_summary(manifest, config.out)
    return 0


def run_train(args: argparse.Namespace) -> int:
    from detector.training.train import settle, train_models

    config = cfg.from_args(cfg.TrainConfig, args)
    settle(config, say=lambda _: None)  # bad settings fail before Ray starts
    init_ray()
    result = train_models(config)
    print("\n" + result["comparison"])
    print_exports(result["models"])
    return 0


def run_scan(args: argparse.Namespace) -> int:
    from detector.scanning.scan import ScanCannotFit, ScanStalled, scan

    config = cfg.from_args(cfg.ScanConfig, args)
    init_ray()
    try:
        print_scan_summary(scan(config), explain=config.explain_selection)
    except (ScanStalled, ScanCannotFit) as exc:
        print(f"detector scan: error: {exc}", file=sys.stderr)
        return 1
    return 0


def add_runtime_flags(parser: argparse.ArgumentParser) -> None:
    """--backend and --precision, as every command that scores images takes them."""
    parser.add_argument("--backend", default="auto", choices=cfg.BACKENDS,
                        help=cfg.BACKEND_HELP)
    parser.add_argument("--precision", default="float32", choices=cfg.PRECISIONS,
                        help=cfg.PRECISION_HELP)


def run_export(args: argparse.Namespace) -> int:
    from detector.model.export import ExportRefused, add_exports

    try:
        exports = add_exports(args.model, int8=args.int8, shards_uri=args.data,
                              max_auc_drop=args.max_auc_drop)
    except ExportRefused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for kind, record in exports.items():
        print(f"{kind}: {record['file']} on {record['runtime']}: max |score diff| "
              f"{record['max_abs_diff']:.2g}, verdicts agree {record['verdict_agreement']:.1%}, "
              f"ROC AUC change {record['auc_change']:+.4f} ({record['images']} test images)")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    import ray

    from detector.serving.app import run

    init_ray()
    try:
        run(cfg.ServeConfig(model_uri=args.model, min_replicas=args.min_replicas,
                        max_replicas=args.max_replicas, backend=args.backend,
                        precision=args.precision,
                        scan_allow=tuple(args.scan_allow), labels_uri=args.labels),
            host=args.host, port=args.port)
    finally:  # a Ray this process started goes with it: no agents left behind
        ray.shutdown()
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from detector.training.evaluate import evaluate_artifact

    if args.holdout_generator:
        from detector.training.evaluate import evaluate_holdout

        print(json.dumps(evaluate_holdout(args.model, args.data, args.holdout_generator,
                                          args.split, args.backend, args.precision), indent=2))
        return 0
    if args.recalibrate:
        from detector.training.evaluate import recalibrate_artifact

        print(json.dumps(recalibrate_artifact(args.model, args.data, args.backend,
                                              args.precision, args.threshold_policy), indent=2))
        return 0
    if not args.out:
        raise ValueError("--out is required (or --recalibrate, which publishes a version)")
    headline = evaluate_artifact(args.model, args.data, args.split, args.out,
                                 backend=args.backend, precision=args.precision)
    print(json.dumps(headline, indent=2))
    return 0


def run_ensemble(args: argparse.Namespace) -> int:
    from detector.io import storage
    from detector.training import ensemble
    from detector.training.evaluate import parse_policy

    parse_policy(args.threshold_policy)
    row = ensemble.build(args.models, args.data, args.out, weights=args.weights,
                         name=args.name, policy=args.threshold_policy, backend=args.backend,
                         precision=args.precision)
    print(f"{row['model']}@{row['id']} of {' + '.join(row['members'])}: test ROC AUC "
          f"{row['roc_auc']:.4f}, accuracy {row['accuracy']:.4f} -> {row['artifact']}")
    print(storage.read_bytes(storage.join(args.out, "comparison.md")).decode(), end="")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from detector.training import compare

    tolerance = compare.TOLERANCE if args.tolerance is None else args.tolerance
    record = compare.compare(args.baseline, args.candidate, args.data, args.split,
                             tolerance, args.backend)
    if args.out:
        compare.write(record, args.out)
    print(compare.markdown(record), end="")
    return 0 if record["passed"] else 1


def run_promote(args: argparse.Namespace) -> int:
    from detector.training import compare, promote

    tolerance = compare.TOLERANCE if args.tolerance is None else args.tolerance
    result = promote.promote(args.version, args.data, args.force, tolerance, args.backend)
    if result["gate"] is not None:
        print(compare.markdown(result["gate"]), end="")
    if result["promoted"]:
        forced = " (forced past a failed gate)" if result["forced"] else ""
        print(f"promoted: {result['name']} latest {result['previous']} -> "
              f"{result['candidate']}{forced}")
        return 0
    print(f"not promoted: {result['reason']}; {result['name']} latest stays "
          f"{result['previous']}")
    return 0 if result["reason"] == "already the latest" else 1


def run_retrain(args: argparse.Namespace) -> int:
    from detector.training import compare
    from detector.training.retrain import retrain

    config = cfg.from_args(cfg.RetrainConfig, args)
    init_ray()
    record = retrain(config)
    print(compare.markdown(record["gate"]), end="")
    if record["promoted"]:
        print(f"promoted: {config.model} latest -> {record['candidate']}")
        return 0
    print(f"not promoted ({record['reason']}): {config.model} latest stays {record['baseline']}")
    return 0 if not config.promote and record["passed"] else 1


def run_label(args: argparse.Namespace) -> int:
    from detector.cli import label

    return label.run(args)


def run_predict(args: argparse.Namespace) -> int:
    predict_files(args.model, args.images, args.backend, args.precision, args.consistency,
                  args.explain, args.json)
    return 0


def run_models(args: argparse.Namespace) -> int:
    if args.action == "list":
        return list_trained(args.out)
    from detector.model.architectures import build_model, get_spec, list_models

    for name in list_models():
        spec = get_spec(name)
        line = f"{name:18s} family={spec.family:10s} image_size={spec.image_size:4d}"
        if args.params:
            model = build_model(name)
            trainable = sum(int(w.numpy().size) for w in model.trainable_weights)
            line += f" params={model.count_params():>11,d} trainable={trainable:>11,d}"
        print(f"{line}  {spec.description}")
    return 0


def list_trained(out: str | None) -> int:
    """One line per version under OUT/<name>/ (or OUT itself), oldest first, `*` latest."""
    from detector.io import storage
    from detector.model.artifact import POINTER_FILE, list_versions

    if not out:
        raise ValueError("detector models list OUT: name the training output URI")
    names = [out] if storage.exists(storage.join(out, POINTER_FILE)) else sorted(
        {storage.join(out, item.uri.rstrip("/").split("/")[-2])
         for item in storage.list_objects(out, patterns=[POINTER_FILE])})
    if not names:
        raise FileNotFoundError(f"no trained models under {out} (no {POINTER_FILE})")
    for name in names:
        for version in list_versions(name):
            metrics = "  ".join(f"{key}={version[key]:.4f}" for key in
                                ("accuracy", "roc_auc", "tpr_at_1pct_fpr", "ece")
                                if isinstance(version.get(key), float))
            mark = "*" if version["latest"] else " "
            trust = f"threshold={version['threshold']:.4f}"
            if version["threshold_policy"]:
                trust += f" ({version['threshold_policy']})"
            if version["calibration"]:
                trust += f"  calibration={version['calibration']}"
                if isinstance(version["ece_before"], float):
                    trust += (f" (val ECE {version['ece_before']:.4f} -> "
                              f"{version['ece_after']:.4f})")
            if version["generators"]:
                trust += f"  generators={','.join(version['generators'])}"
            if version["parent"]:
                trust += f"  parent={version['parent']}"
            print(f"{mark} {version['name']}@{version['id']}  {version['created_at']}  "
                  f"{metrics}  {trust}  {version['uri']}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from detector.cli.demo import run

    return run(args.workdir)
